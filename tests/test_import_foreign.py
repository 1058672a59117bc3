"""torchmd-net checkpoints (`openmm_stable.models.foreign`) and `openmm-stable import`.

The checkpoints are written the way torchmd-train writes them (torchmd-net 3.1,
scripts/train.py + module.LNNP + Lightning 2's checkpoint connector): the Lightning
module's state_dict (the network under ``model.``), ``hyper_parameters`` = torchmd-train's
arguments with ``prior_args`` from the priors' ``get_init_args()``, mean/std buffers from
standardisation, and the trainer's own entries. The reference is torchmd-net's own
``load_model`` of the same file.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

torchmdnet_model = pytest.importorskip("torchmdnet.models.model")

from openmm_stable.errors import InputError  # noqa: E402
from openmm_stable.models import energy_and_forces, get_family, load_model, read_model_record, save_model  # noqa: E402
from openmm_stable.models.foreign import FAMILY, import_torchmdnet_checkpoint  # noqa: E402
from openmm_stable.models.registry import register_family, unregister_family  # noqa: E402
from openmm_stable.units import KCAL_PER_MOL_IN_EV  # noqa: E402

# vars(get_argparse().parse_args([])) of torchmd-net 3.1.0's torchmd-train (80 arguments),
# the dict LNNP saves as its hyper-parameters; tests change the model's size and options.
TORCHMD_TRAIN_DEFAULTS = {
    "load_model": None, "conf": None, "num_epochs": 300, "batch_size": 32, "inference_batch_size": 32, "lr": 0.0001,
    "lr_patience": 10, "lr_metric": "val", "lr_min": 1e-06, "lr_factor": 0.8, "lr_warmup_steps": 0,
    "early_stopping_patience": 30, "early_stopping_monitor": "val_total_mse_loss", "reset_trainer": False,
    "weight_decay": 0.0, "ema_alpha_y": 1.0, "ema_alpha_neg_dy": 1.0, "ngpus": -1, "num_nodes": 1, "precision": 32,
    "log_dir": "logs", "splits": None, "train_size": None, "val_size": 0.05, "test_size": 0.1, "test_interval": -1,
    "save_interval": 10, "seed": 1, "num_workers": 4, "redirect": False, "gradient_clipping": 0.0,
    "remove_ref_energy": False, "checkpoint_monitor": "val_total_mse_loss", "load_weights": None, "dataset": "HDF5",
    "dataset_root": "data", "dataset_arg": None, "coord_files": None, "embed_files": None, "energy_files": None,
    "force_files": None, "dataset_preload_limit": 1024, "y_weight": 1.0, "neg_dy_weight": 1.0,
    "train_loss": "mse_loss", "train_loss_arg": None, "model": "graph-network", "output_model": "Scalar",
    "output_mlp_num_layers": 0, "prior_model": None, "charge": False, "spin": False, "embedding_dimension": 256,
    "num_layers": 6, "num_rbf": 64, "activation": "silu", "rbf_type": "expnorm", "trainable_rbf": False,
    "neighbor_embedding": False, "aggr": "add", "distance_influence": "both", "attn_activation": "silu",
    "num_heads": 8, "vector_cutoff": False, "equivariance_invariance_group": "O(3)", "box_vecs": None,
    "static_shapes": False, "derivative": False, "cutoff_lower": 0.0, "cutoff_upper": 5.0, "atom_filter": -1,
    "max_z": 100, "max_num_neighbors": 32, "standardize": False, "reduce_op": "add", "wandb_use": False,
    "wandb_name": "training", "wandb_project": "training_", "wandb_resume_from_id": None, "tensorboard_use": False,
}
SMALL = dict(embedding_dimension=16, num_layers=2, num_rbf=8, cutoff_upper=4.0, neighbor_embedding=True,
             derivative=True, y_weight=0.2, neg_dy_weight=0.8)


class AttributeDict(dict):
    """Like Lightning's AttributeDict, the type of `LightningModule.hparams` (imported
    from Lightning it costs seconds): a checkpoint holding one is a pickle of a class."""

    def __getattr__(self, key):
        return self[key]


@pytest.fixture(scope="module", autouse=True)
def torchmdnet_family():
    """The `torchmd-net` family, registered in this process when no entry point names it."""
    try:
        get_family(FAMILY.name)
        yield
    except InputError:
        register_family(FAMILY)
        yield
        unregister_family(FAMILY.name)


def torchmd_train_hparams(**changes) -> dict:
    hparams = copy.deepcopy(TORCHMD_TRAIN_DEFAULTS)
    hparams.update(SMALL)
    hparams.update(changes)
    if hparams["remove_ref_energy"]:  # what torchmd-train's main() adds for delta learning
        hparams["prior_model"] = list(hparams["prior_model"] or []) + [{"Atomref": {"max_z": 100, "enable": False}}]
    return hparams


def write_torchmd_train_checkpoint(path, hparams: dict, seed: int = 0, standardize: bool = True,
                                   hyper_parameters_object=None) -> None:
    """A checkpoint laid out as torchmd-train writes it, of a freshly made model whose
    priors, mean and std hold non-trivial values (so a missing piece changes the energy)."""
    torch.manual_seed(seed)
    args = copy.deepcopy(hparams)
    priors = torchmdnet_model.create_prior_models(args)  # as train.py, without a dataset
    for prior in priors:  # the atomref a dataset would provide
        if hasattr(prior, "atomref"):
            with torch.no_grad():
                prior.initial_atomref.copy_(torch.randn_like(prior.initial_atomref))
                prior.atomref.weight.copy_(prior.initial_atomref)
    args["prior_args"] = [p.get_init_args() for p in priors] if priors else None
    mean, std = (torch.tensor(-1.7), torch.tensor(0.6)) if standardize else (None, None)
    model = torchmdnet_model.create_model(copy.deepcopy(args), priors or None, mean, std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args["lr"])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=args["lr_factor"])
    args["standardize"] = standardize
    checkpoint = {
        "epoch": 9, "global_step": 90, "pytorch-lightning_version": "2.6.6",
        "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 10, "completed": 9}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_total_mse_loss', 'mode': 'min'}": {
            "monitor": "val_total_mse_loss", "best_model_score": torch.tensor(0.01),
            "best_model_path": "logs/best.ckpt",
            "best_k_models": {"logs/best.ckpt": torch.tensor(0.01)}, "dirpath": "logs"}},
        "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "hparams",
        "hyper_parameters": args if hyper_parameters_object is None else hyper_parameters_object(args),
    }
    torch.save(checkpoint, path)


def structures(z, positions, n=2, seed=3):
    """n displaced copies of a molecule, batched as the model protocol takes them."""
    rng = np.random.default_rng(seed)
    pos = np.concatenate([positions + 0.1 * rng.standard_normal(positions.shape) for _ in range(n)])
    return (torch.as_tensor(np.tile(z, n)), torch.as_tensor(pos, dtype=torch.float64),
            torch.arange(n).repeat_interleave(len(z)))


def torchmdnet_reference(path, z, pos, batch, **kwargs):
    """Energies and forces of torchmd-net's own load_model of the file, in float64."""
    reference = torchmdnet_model.load_model(str(path), derivative=True, **kwargs).double().eval()
    energy, forces = reference(z, pos.clone(), batch)
    return energy.detach().reshape(-1), forces.detach()


def ours(model, z, pos, batch):
    model.net.double()
    energy, forces = energy_and_forces(model, z, pos, batch)
    return energy.detach(), forces.detach()


def test_checkpoint_imports_with_torchmdnets_forces_and_reloads_without_pickle(tmp_path, ethanol):
    z, positions = ethanol
    path = tmp_path / "epoch=9-val_loss=0.0100.ckpt"
    write_torchmd_train_checkpoint(path, torchmd_train_hparams(prior_model=[{"Atomref": {"max_z": 100}}]))
    zt, pos, batch = structures(z, positions)
    ref_energy, ref_forces = torchmdnet_reference(path, zt, pos, batch)

    model = import_torchmdnet_checkpoint(path)  # plain tensors and numbers: no pickle needed
    assert model.spec["architecture"] == "torchmd-net" and model.spec["hparams"]["cutoff"] == 4.0
    energy, forces = ours(model, zt, pos, batch)
    assert float(ref_forces.abs().max()) > 1e-3  # a real, non-trivial force field
    torch.testing.assert_close(energy, ref_energy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(forces, ref_forces, rtol=1e-9, atol=1e-10)

    out = tmp_path / "model.pt"
    save_model(model, out, atomic_numbers=z)
    record = read_model_record(out)  # weights-only reader
    assert record.architecture == "torchmd-net" and record.cutoff == 4.0
    assert (record.atomic_numbers == z).all()
    again = load_model(out)
    energy2, forces2 = ours(again, zt, pos, batch)
    torch.testing.assert_close(forces2, ref_forces, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(energy2, ref_energy, rtol=1e-10, atol=1e-10)


def test_pickled_checkpoint_needs_allow_pickle(tmp_path, ethanol):
    """A checkpoint holding a Python object (here its hyper-parameters as an AttributeDict,
    as Lightning's `hparams` are) is refused unopened without the opt-in, and imported with it."""
    z, positions = ethanol
    path = tmp_path / "pickled.ckpt"
    hparams = torchmd_train_hparams(model="equivariant-transformer", num_heads=2)
    write_torchmd_train_checkpoint(path, hparams, seed=1, hyper_parameters_object=AttributeDict)
    with pytest.raises(InputError, match="allow_pickle=True"):
        import_torchmdnet_checkpoint(path)
    model = import_torchmdnet_checkpoint(path, allow_pickle=True)
    zt, pos, batch = structures(z, positions, n=1)
    ref_energy, ref_forces = torchmdnet_reference(path, zt, pos, batch)
    energy, forces = ours(model, zt, pos, batch)
    torch.testing.assert_close(energy, ref_energy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(forces, ref_forces, rtol=1e-9, atol=1e-10)


def test_energy_unit_and_delta_learning_reference_energies(tmp_path, ethanol):
    """kcal/mol data become eV; a --remove-ref-energy model gives torchmd-net's delta
    energies by default and its total energies with total_energy=True."""
    z, positions = ethanol
    path = tmp_path / "delta.ckpt"
    write_torchmd_train_checkpoint(path, torchmd_train_hparams(remove_ref_energy=True), seed=2, standardize=False)
    zt, pos, batch = structures(z, positions, n=1)
    delta_energy, delta_forces = torchmdnet_reference(path, zt, pos, batch)
    total_energy, _ = torchmdnet_reference(path, zt, pos, batch, remove_ref_energy=False)
    assert abs(float(total_energy - delta_energy)) > 1e-3  # the reference energies are in play

    energy, forces = ours(import_torchmdnet_checkpoint(path, energy_unit="kcal/mol"), zt, pos, batch)
    torch.testing.assert_close(energy, delta_energy * KCAL_PER_MOL_IN_EV, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(forces, delta_forces * KCAL_PER_MOL_IN_EV, rtol=1e-9, atol=1e-12)
    energy, _ = ours(import_torchmdnet_checkpoint(path, total_energy=True), zt, pos, batch)
    torch.testing.assert_close(energy, total_energy, rtol=1e-10, atol=1e-10)


def test_imported_model_runs_as_the_exported_torchscript_force(tmp_path, ethanol):
    """simulate, refine and export run the model as TorchScript (`openmm_stable.export`):
    an equivariant transformer with Atomref, ZBL and D2 priors compiles and gives the
    eager energies (kJ/mol from positions in nm, two replicas)."""
    from openmm_stable.export import script_force_module
    from openmm_stable.units import EV_IN_KJ_PER_MOL

    z, positions = ethanol
    path = tmp_path / "priors.ckpt"
    priors = [{"Atomref": {"max_z": 100}},
              {"ZBL": {"cutoff_distance": 3.0, "max_num_neighbors": 10, "atomic_number": list(range(100)),
                       "distance_scale": 1e-10, "energy_scale": 1.602176634e-19}},
              {"D2": {"cutoff_distance": 4.0, "max_num_neighbors": 16, "atomic_number": list(range(100)),
                      "distance_scale": 1e-10, "energy_scale": 1.602176634e-19}}]
    write_torchmd_train_checkpoint(path, torchmd_train_hparams(model="equivariant-transformer", num_heads=2,
                                                               prior_model=priors), seed=5)
    model = import_torchmdnet_checkpoint(path)
    zt, pos, batch = structures(z, positions, n=2)
    energy, _ = ours(model, zt, pos, batch)
    ref_energy, _ = torchmdnet_reference(path, zt, pos, batch)
    torch.testing.assert_close(energy, ref_energy, rtol=1e-10, atol=1e-10)
    module = script_force_module(model, z.tolist(), n_replicas=2, dtype=torch.float64)
    exported = float(module(pos / 10.0))
    assert exported == pytest.approx(float(energy.sum()) * EV_IN_KJ_PER_MOL, rel=1e-10)


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    not_ckpt = tmp_path / "weights.ckpt"
    torch.save({"weights": torch.zeros(3)}, not_ckpt)
    with pytest.raises(InputError, match="not a torchmd-train checkpoint"):
        import_torchmdnet_checkpoint(not_ckpt)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="not a readable checkpoint"):
        import_torchmdnet_checkpoint(garbage)
    charged = tmp_path / "charged.ckpt"
    hparams = torchmd_train_hparams(charge=True)
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, charged)
    with pytest.raises(InputError, match="total charge or spin"):
        import_torchmdnet_checkpoint(charged)
    with pytest.raises(InputError, match="unknown energy unit"):
        import_torchmdnet_checkpoint(charged, energy_unit="furlongs")
    with pytest.raises(FileNotFoundError):
        import_torchmdnet_checkpoint(tmp_path / "missing.ckpt")


def test_cli_import_writes_our_record(tmp_path, ethanol, capsys):
    """`openmm-stable import FILE.ckpt --out model.pt --data frames.npz`: our record, with
    the dataset's molecule and fingerprint, the same forces; the pickled file needs
    --allow-pickle (exit code 2 and the reason otherwise)."""
    from openmm_stable.cli import main
    from openmm_stable.data.dataset import QMDataset
    from openmm_stable.data.formats import save_dataset

    z, positions = ethanol
    ckpt = tmp_path / "trained.ckpt"
    write_torchmd_train_checkpoint(ckpt, torchmd_train_hparams(), seed=4,
                                   hyper_parameters_object=AttributeDict)
    frames = QMDataset(atomic_numbers=z, positions=np.stack([positions, positions + 0.01]), source="frames")
    data = save_dataset(frames, tmp_path / "frames.npz")
    out = tmp_path / "imported.pt"

    assert main(["import", str(ckpt), "--out", str(out), "--data", str(data)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists()
    assert main(["import", str(ckpt), "--out", str(out), "--data", str(data), "--allow-pickle"]) == 0
    assert "torchmd-net" in capsys.readouterr().out

    record = read_model_record(out)
    assert record.architecture == "torchmd-net" and (record.atomic_numbers == z).all()
    assert record.dataset_fingerprint == frames.fingerprint()
    assert record.payload["bonds"] is not None and len(record.payload["bonds"]) == 8
    zt, pos, batch = structures(z, positions, n=1)
    ref_energy, ref_forces = torchmdnet_reference(ckpt, zt, pos, batch)
    energy, forces = ours(load_model(out), zt, pos, batch)
    torch.testing.assert_close(forces, ref_forces, rtol=1e-9, atol=1e-10)
    exported = tmp_path / "imported_openmm.pt"  # the next stage takes the file like one of pretrain's
    assert main(["export", str(out), "--out", str(exported), "--dtype", "float64"]) == 0 and exported.exists()

    assert main(["import", str(data), "--out", str(tmp_path / "x.pt")]) == 2  # not a checkpoint kind we know
    assert ".ckpt" in capsys.readouterr().err
    mace_file = tmp_path / "mine.model"  # dispatched to the MACE importer, which refuses a pickle unasked
    torch.save(torch.nn.Linear(2, 2), mace_file)
    assert main(["import", str(mace_file), "--out", str(tmp_path / "m.pt")]) == 2
    assert "allow_pickle" in capsys.readouterr().err and not (tmp_path / "m.pt").exists()

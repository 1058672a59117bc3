"""What `refine` trains on, which seed it runs with, and what it does with its folder:
the QM regulariser never sees the frames a model was tested on, one seed reaches the
thermostat, a folder is never silently reused, a resume is the run it continues, and
every learning phase leaves a model behind."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from openmm_stable.cli import build_parser, main
from openmm_stable.engine import EngineConfig
from openmm_stable.errors import InputError
from openmm_stable.io import load_torch_file
from openmm_stable.models import load_model, read_model_record, save_model
from openmm_stable.training.stable import StableConfig, StableTrainer, refine


def _config(**overrides) -> StableConfig:
    """Learning from the first epoch (a 0.02 A threshold flags every replica); short epochs."""
    values = dict(n_replicas=4, epoch_ps=0.05, frame_interval_ps=0.01, equilibration_ps=0.01, max_epochs=2,
                  learning_epochs=10, bond_threshold=0.02, unstable_fraction=0.1, lr=1e-3, seed=0,
                  observable={"name": "bond_lengths"}, energy_force_weight=1.0, log_signal=False,
                  engine=EngineConfig(temperature_K=500.0, timestep_fs=0.5, friction_per_ps=10.0, platform="CPU"))
    values.update(overrides)
    return StableConfig(**values)


def _frame_keys(dataset) -> set:
    return {np.round(p, 6).tobytes() for p in dataset.positions}


@pytest.fixture(scope="module")
def model_with_split(xtb_ethanol, pretrained_ethanol_model, tmp_path_factory):
    """A model file whose record says it was trained on frames 0-39, validated on 40-49 and
    tested on 50-59 of `xtb_ethanol` (the form `pretrain` writes)."""
    path = tmp_path_factory.mktemp("with_split") / "model.pt"
    split = {"train": list(range(40)), "val": list(range(40, 50)), "test": list(range(50, 60))}
    save_model(pretrained_ethanol_model, path, atomic_numbers=xtb_ethanol.atomic_numbers,
               dataset_fingerprint=xtb_ethanol.fingerprint(), split=split)
    return path, split


def test_regulariser_uses_the_model_records_split(xtb_ethanol, model_with_split, tmp_path):
    path, split = model_with_split
    _, summary = refine(path, xtb_ethanol, _config(max_epochs=1), tmp_path / "run", progress=False)
    assert summary["qm_frames"]["source"] == "model record"
    assert (summary["qm_frames"]["train"], summary["qm_frames"]["val"]) == (40, 10)
    recorded = read_model_record(tmp_path / "run" / "model.pt").payload["split"]
    assert recorded["train"] == split["train"] and recorded["test"] == split["test"]
    # The trainer's frames themselves: pre-training's train and validation frames, no test frame.
    trainer = StableTrainer(load_model(path), xtb_ethanol, _config(), tmp_path / "t", progress=False,
                            model_split=split, model_fingerprint=xtb_ethanol.fingerprint())
    test_frames = _frame_keys(xtb_ethanol.subset(split["test"]))
    assert _frame_keys(trainer.train_set) == _frame_keys(xtb_ethanol.subset(split["train"]))
    assert _frame_keys(trainer.val_set) == _frame_keys(xtb_ethanol.subset(split["val"]))
    assert not (_frame_keys(trainer.train_set) | _frame_keys(trainer.val_set)) & test_frames


def test_other_data_gets_a_random_split_and_says_so(xtb_ethanol, model_with_split, tmp_path):
    path, split = model_with_split
    other = xtb_ethanol.subset(np.arange(0, 60, 2))  # another file: another fingerprint
    trainer = StableTrainer(load_model(path), other, _config(), tmp_path, progress=False, model_split=split,
                            model_fingerprint=xtb_ethanol.fingerprint())
    assert trainer.qm_split["source"] == "random split of --data"
    assert "another fingerprint" in trainer.qm_split["note"]
    assert len(trainer.train_set) + len(trainer.val_set) == 30


def test_unlabelled_or_tiny_data_is_refused_before_any_simulation(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    unlabelled = dataclasses.replace(xtb_ethanol, forces=None)
    with pytest.raises(InputError, match="no forces"):
        StableTrainer(copy.deepcopy(pretrained_ethanol_model), unlabelled, _config(), tmp_path, progress=False)
    with pytest.raises(InputError, match="4 frames"):
        StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol.subset([0, 1, 2, 3]), _config(),
                      tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_the_seed_reaches_the_thermostat(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    """The same start and velocities under seeds 0, 0 and 1: the same seed is the same run,
    another seed another Langevin noise (before, every refinement ran thermostat seed 1)."""
    runs = []
    for k, seed in enumerate((0, 0, 1)):
        trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, _config(seed=seed),
                                tmp_path / str(k), progress=False)
        assert trainer.engine.seed == seed
        trainer.engine.set_states(xtb_ethanol.positions[:4], np.zeros((4, xtb_ethanol.n_atoms, 3)))
        trainer.engine.step(50)
        runs.append(trainer.engine.get_states()[0])
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - runs[2]).max() > 1e-3


def test_folder_rules(xtb_ethanol, pretrained_ethanol_model_file, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(InputError, match="no checkpoint"):
        refine(pretrained_ethanol_model_file, xtb_ethanol, _config(), out, resume=True, progress=False)
    refine(pretrained_ethanol_model_file, xtb_ethanol, _config(max_epochs=1), out, progress=False)
    with pytest.raises(InputError, match="already holds a finished refinement.*--resume.*--overwrite"):
        refine(pretrained_ethanol_model_file, xtb_ethanol, _config(max_epochs=1), out, progress=False)
    with pytest.raises(InputError, match="other settings.*lr: 0.001 -> 0.002"):
        refine(pretrained_ethanol_model_file, xtb_ethanol, _config(lr=2e-3), out, resume=True, progress=False)
    assert load_torch_file(out / "checkpoint.pt")["config"]["lr"] == 1e-3  # nothing overwritten by the refusal
    args = ["refine", str(pretrained_ethanol_model_file), "--data", str(xtb_ethanol.source), "--out", str(out),
            "--no-progress", "--epochs", "1", "--replicas", "2", "--epoch-ps", "0.05", "--equilibration-ps", "0.01"]
    assert main(args) == 2 and "already holds" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert load_torch_file(out / "checkpoint.pt")["config"]["n_replicas"] == 2


def test_equilibration_flag(tmp_path):
    args = build_parser().parse_args(["refine", "m.pt", "--data", "d.npz", "--out", "o", "--epoch-ps", "0.05",
                                      "--equilibration-ps", "0.02"])
    from openmm_stable.cli.refine import config_from_args

    assert (config_from_args(args).epoch_ps, config_from_args(args).equilibration_ps) == (0.05, 0.02)
    with pytest.raises(InputError, match="--equilibration-ps"):
        StableConfig(epoch_ps=0.05)  # the default 0.1 ps equilibration: the message names the flag


def test_langevin_resume_is_the_run_it_continues(xtb_ethanol, pretrained_ethanol_model_file, tmp_path):
    """1 epoch, then --resume to 3, against 3 straight: the same log and weights, to float32
    round-off (the engine checkpoint carries OpenMM's Langevin random stream); a second seed
    shows the size of a real difference."""
    def run(out, epochs, resume=False, seed=0):
        return refine(pretrained_ethanol_model_file, xtb_ethanol, _config(max_epochs=epochs, seed=seed), out,
                      resume=resume, progress=False)[0]

    run(tmp_path / "resumed", 1)
    resumed = run(tmp_path / "resumed", 3, resume=True)
    straight = run(tmp_path / "straight", 3)
    other = run(tmp_path / "other", 3, seed=1)
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(resumed.parameters(), straight.parameters()))
    real = max(float((a - b).detach().abs().max()) for a, b in zip(other.parameters(), straight.parameters()))
    print("resume gap", gap, "seed gap", real)
    assert gap < 1e-3 * real, (gap, real)


def test_every_learning_phase_leaves_a_snapshot_and_best_is_the_most_accurate_stable_one(
        xtb_ethanol, pretrained_ethanol_model, tmp_path):
    trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, _config(learning_epochs=1,
                                                                                          max_epochs=4),
                            tmp_path, progress=False)
    trainer.fit()
    snapshots = sorted((tmp_path / "snapshots").glob("cycle_*.pt"))
    assert [p.name for p in snapshots][:2] == ["cycle_000.pt", "cycle_001.pt"]
    info = read_model_record(snapshots[0]).payload["snapshot"]
    assert info["cycle"] == 0 and info["ended_stable"] is False  # the 0.02 A threshold: every re-run fails
    assert trainer.best is None and not (tmp_path / "best.pt").exists()
    # The rule itself: of the phases that ended stable, the lowest validation force MAE.
    maes = {}
    for cycle, scale in enumerate((0.0, 0.05, 0.01)):
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.mul_(1 + scale)
        trainer.state.cycle = 10 + cycle
        trainer._save_snapshot(ended_stable=cycle != 0)
        maes[10 + cycle] = read_model_record(tmp_path / "snapshots" / f"cycle_{10 + cycle:03d}.pt"
                                             ).payload["snapshot"]["val_force_mae_meV_per_A"]
    expected = min((11, 12), key=maes.get)
    assert trainer.best["cycle"] == expected
    assert read_model_record(tmp_path / "best.pt").payload["snapshot"]["cycle"] == expected


def test_simulate_and_refine_refuse_a_model_of_another_molecule_with_the_same_formula(tmp_path, xtb_ethanol,
                                                                                      pretrained_ethanol_model):
    """The model record holds its molecule's bonds (pretrain and refine write them), so a
    dataset of dimethyl ether (C2H6O, like ethanol) is refused before any simulation."""
    from openmm_stable.cli.common import check_model_matches
    from openmm_stable.data.dataset import QMDataset
    from openmm_stable.data.molecules import build_molecule
    from openmm_stable.export import record_bonds
    from openmm_stable.geometry import find_bonds

    path = tmp_path / "refined"
    refine(pretrained_ethanol_model, xtb_ethanol, _config(max_epochs=1), path, progress=False)
    record = read_model_record(path / "model.pt")
    expected = find_bonds(xtb_ethanol.atomic_numbers, xtb_ethanol.positions[0])
    assert record_bonds(record).tolist() == np.asarray(expected).tolist()
    z, positions = build_molecule("COC")
    ether = QMDataset(atomic_numbers=z, positions=positions[None], source="ether.npz")
    with pytest.raises(InputError, match="another molecule.*bonded differently"):
        check_model_matches(path / "model.pt", ether)
    check_model_matches(path / "model.pt", xtb_ethanol)  # the same molecule passes


def test_a_setting_added_since_the_run_started_does_not_strand_it(xtb_ethanol, pretrained_ethanol_model_file,
                                                                  tmp_path):
    """A checkpoint written before a setting existed (its config lacks the key) resumes when
    the setting still has its default, and is refused when it does not."""
    from openmm_stable.io import save_torch_file

    out = tmp_path / "run"
    refine(pretrained_ethanol_model_file, xtb_ethanol, _config(max_epochs=1), out, progress=False)
    payload = load_torch_file(out / "checkpoint.pt")
    del payload["config"]["probe_ps"]  # as an earlier version wrote it
    save_torch_file(payload, out / "checkpoint.pt")
    with pytest.raises(InputError, match="probe_ps"):
        refine(pretrained_ethanol_model_file, xtb_ethanol, _config(max_epochs=2, probe_ps=1.0), out, resume=True,
               progress=False)
    _, summary = refine(pretrained_ethanol_model_file, xtb_ethanol, _config(max_epochs=2), out, resume=True,
                        progress=False)
    assert summary["epochs"] == 2

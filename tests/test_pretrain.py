"""QM pre-training: offsets, loss/metrics, training, checkpoints and resume, CLI.

The data are a synthetic ethanol: harmonic bonds plus per-element offsets, with analytic
forces, so every test is fast and exactly reproducible (xTB data are exercised by the
benchmarks, not here).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from openmm_stable.data.dataset import QMDataset
from openmm_stable.models import create_model, load_model
from openmm_stable.training import (
    FrameTensors,
    PretrainConfig,
    energy_force_loss,
    evaluate,
    fit_atom_energies,
    fit_energy_scale,
    loss_from_metrics,
    pretrain,
)

OFFSETS_EV = {1: -13.6, 6: -1029.5, 8: -2041.2}
BOND_K = 20.0  # eV/A^2


def toy_dataset(ethanol_z, ethanol_pos, bonds, n_frames=64, noise=0.06, seed=0, shift=0.0) -> QMDataset:
    """Ethanol frames jittered around the reference, with harmonic-bond energies and forces."""
    rng = np.random.default_rng(seed)
    pos = ethanol_pos[None] + noise * rng.standard_normal((n_frames, len(ethanol_z), 3))
    i, j = np.array(bonds).T
    r0 = np.linalg.norm(ethanol_pos[j] - ethanol_pos[i], axis=-1)
    vec = pos[:, j] - pos[:, i]
    r = np.linalg.norm(vec, axis=-1)
    energies = 0.5 * BOND_K * ((r - r0) ** 2).sum(-1) + sum(OFFSETS_EV[z] for z in ethanol_z) + shift
    # dE/dr_j = k (r - r0) vec/r; forces are minus the gradient.
    g = (BOND_K * (r - r0) / r)[..., None] * vec
    forces = np.zeros_like(pos)
    np.add.at(forces, (slice(None), j), -g)
    np.add.at(forces, (slice(None), i), g)
    return QMDataset(ethanol_z, pos, energies, forces, source="toy-ethanol")


@pytest.fixture
def toy(ethanol, ethanol_bonds):
    z, pos = ethanol
    return lambda **kw: toy_dataset(z, pos, ethanol_bonds, **kw)


def quick_config(**kw) -> PretrainConfig:
    values = dict(architecture="schnet", preset="tiny", train=32, val=8, test=16, batch_size=8,
                  max_epochs=2, device="cpu", lr=3e-3)
    values.update(kw)
    return PretrainConfig(**values)


# --- offsets, scale, loss --------------------------------------------------------------------
def test_atom_energies_recover_a_linear_model_exactly():
    rng = np.random.default_rng(0)
    truth = {1: -13.6, 6: -1029.5, 7: -1485.0, 8: -2041.2}
    elements = np.array(list(truth))
    compositions = [rng.choice(elements, size=rng.integers(3, 12)) for _ in range(30)]
    energies = [sum(truth[z] for z in comp) for comp in compositions]
    fitted = fit_atom_energies(compositions, energies)
    for z, value in truth.items():
        assert fitted[z] == pytest.approx(value, abs=1e-8)
    assert np.count_nonzero(fitted) == len(truth)  # absent elements stay 0


def test_atom_energies_single_composition_is_mean_energy_per_atom(ethanol):
    z, _ = ethanol
    energies = np.array([-3000.0, -3001.0, -2999.5])
    fitted = fit_atom_energies([z] * 3, energies)
    assert np.allclose(fitted[np.unique(z)], energies.mean() / len(z))
    assert fitted[z].sum() == pytest.approx(energies.mean())


def test_energy_scale_is_force_rms(toy):
    ds = toy()
    assert fit_energy_scale(ds, np.zeros(119)) == pytest.approx(np.sqrt(np.mean(ds.forces**2)))


def test_loss_and_evaluate_agree(toy):
    ds = toy(n_frames=12)
    torch.manual_seed(0)
    model = create_model("schnet", "tiny")
    model.energy_scale.fill_(1.3)
    frames = FrameTensors(ds)
    loss, batch_metrics = energy_force_loss(model, frames.batch(range(len(ds))), energy_weight=1.0, force_weight=10.0)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    metrics = evaluate(model, ds)
    assert set(metrics) >= {"energy_mae_meV", "force_mae_meV_per_A", "force_rmse_meV_per_A"}
    assert metrics["force_mae_meV_per_A"] == pytest.approx(batch_metrics["force_mae_meV_per_A"], rel=1e-5)
    assert loss_from_metrics(metrics, 1.3, 1.0, 10.0) == pytest.approx(loss.item(), rel=1e-5)


def test_config_is_validated_once():
    with pytest.raises(ValueError, match="architecture"):
        PretrainConfig(architecture="nope")
    with pytest.raises(ValueError, match="lr_factor"):
        PretrainConfig(lr_factor=1.5)
    with pytest.raises(ValueError, match="train"):
        PretrainConfig(train="lots")
    with pytest.raises(ValueError, match="unknown key"):
        PretrainConfig.from_dict({"learning_rate": 1e-3})
    config = PretrainConfig.from_dict({"lr": "2e-3", "test": "rest"})  # YAML reads 2e-3 as a string
    assert config.lr == 2e-3 and config.test is None


# --- training -------------------------------------------------------------------------------------
def test_pretraining_reduces_force_error_and_writes_the_run(toy, tmp_path):
    ds = toy(n_frames=120)
    config = quick_config(train=96, val=8, test=16, batch_size=16, max_epochs=12, lr=5e-3)
    model, metrics = pretrain(ds, config, tmp_path, progress=False)

    # The same initial weights and offsets, untrained.
    torch.manual_seed(config.seed)
    untrained = create_model("schnet", "tiny")
    untrained.load_state_dict({**untrained.state_dict(), "atom_energies": model.atom_energies,
                               "energy_scale": model.energy_scale})
    test_ds = ds.subset(torch.load(tmp_path / "model.pt", weights_only=False)["split"]["test"])
    before = evaluate(untrained, test_ds)["force_mae_meV_per_A"]
    assert metrics["force_mae_meV_per_A"] < 0.5 * before  # ~5x lower in practice

    for name in ("model.pt", "checkpoint_last.pt", "checkpoint_best.pt", "log.csv", "learning_curve.png",
                 "metrics.json", "config.yaml"):
        assert (tmp_path / name).exists(), name
    written = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("energy_mae_meV", "force_mae_meV_per_A", "force_rmse_meV_per_A", "n_train", "n_val", "n_test",
                "train_time_s", "epochs", "architecture", "preset"):
        assert key in written, key
    assert (written["n_train"], written["n_val"], written["n_test"], written["epochs"]) == (96, 8, 16, 12)
    assert written["force_mae_meV_per_A"] == pytest.approx(metrics["force_mae_meV_per_A"])
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,lr,train_loss") and len(log) == 13

    # model.pt and both checkpoints load with the ordinary loader; model.pt is the best epoch.
    reloaded = load_model(tmp_path / "model.pt")
    assert evaluate(reloaded, test_ds)["force_mae_meV_per_A"] == pytest.approx(metrics["force_mae_meV_per_A"], rel=1e-6)
    best = torch.load(tmp_path / "checkpoint_best.pt", weights_only=False)
    assert best["epoch"] == metrics["best_epoch"]
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        assert torch.allclose(load_model(tmp_path / name).atom_energies, model.atom_energies)
    z = np.unique(ds.atomic_numbers)
    assert model.atom_energies[z].sum().item() != 0.0


def test_resume_continues_the_epoch_count_and_optimizer(toy, tmp_path):
    ds = toy(n_frames=56)
    straight, _ = pretrain(ds, quick_config(max_epochs=4), tmp_path / "straight", progress=False)

    pretrain(ds, quick_config(max_epochs=2), tmp_path / "run", progress=False)
    first = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=False)
    assert first["epoch"] == 2
    with pytest.raises(ValueError, match="already holds"):
        pretrain(ds, quick_config(max_epochs=4), tmp_path / "run", progress=False)
    resumed, metrics = pretrain(ds, quick_config(max_epochs=4), tmp_path / "run", progress=False, resume=True)

    last = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=False)
    steps_per_epoch = math.ceil(32 / 8)
    assert last["epoch"] == metrics["epochs"] == 4
    assert [row["epoch"] for row in last["run_state"]["history"]] == [1, 2, 3, 4]
    adam_step = next(iter(last["optimizer"]["state"].values()))["step"]
    assert int(adam_step) == 4 * steps_per_epoch
    # Same weights as the uninterrupted run: Adam moments, scheduler and data order all carried over.
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_refuses_other_data(toy, tmp_path):
    pretrain(toy(n_frames=56), quick_config(max_epochs=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        pretrain(toy(n_frames=56, shift=0.5), quick_config(max_epochs=2), tmp_path, progress=False, resume=True)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        pretrain(toy(n_frames=56), quick_config(), tmp_path / "empty", progress=False, resume=True)


def test_time_budget_stops_cleanly_and_ema_model_is_saved(toy, tmp_path):
    ds = toy(n_frames=56)
    model, metrics = pretrain(ds, quick_config(max_epochs=50, time_budget_min=1e-6, ema_decay=0.9), tmp_path, progress=False)
    assert metrics["stopped_reason"] == "time_budget" and metrics["epochs"] == 1
    saved = torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"]
    last = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)
    ema = last["ema"]["shadow"]
    for name, value in saved.items():
        if name in ema:
            assert torch.equal(value, ema[name]), name  # the saved model is the EMA one
    assert any(not torch.equal(last["state_dict"][k], ema[k]) for k in ema)


@pytest.mark.parametrize("architecture", ["graph-network", "equivariant-transformer"])
def test_torchmdnet_architectures_train_one_step(toy, tmp_path, architecture):
    ds = toy(n_frames=12)
    torch.manual_seed(0)
    initial = create_model(architecture, "tiny").state_dict()
    config = quick_config(architecture=architecture, train=4, val=4, test=4, batch_size=4, max_epochs=1)
    model, metrics = pretrain(ds, config, tmp_path, progress=False)
    assert math.isfinite(metrics["force_mae_meV_per_A"]) and metrics["epochs"] == 1
    changed = [not torch.equal(initial[k], v) for k, v in model.state_dict().items() if k.startswith("net.")]
    assert any(changed)


# --- command line ----------------------------------------------------------------------------------
def test_cli_end_to_end(toy, tmp_path, capsys):
    from openmm_stable.cli import main
    from openmm_stable.data.formats import save_dataset

    data = save_dataset(toy(n_frames=40), tmp_path / "toy.npz")
    (tmp_path / "config.yaml").write_text("preset: tiny\nbatch_size: 8\nlr: 2e-3\nmax_epochs: 5\n")
    out = tmp_path / "run"
    argv = ["pretrain", str(data), "--out", str(out), "--config", str(tmp_path / "config.yaml"), "--epochs", "2",
            "--train", "24", "--val", "8", "--test", "rest", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test: energy MAE" in printed and "force MAE" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["n_test"] == 8 and metrics["preset"] == "tiny"
    assert main(argv[:-1] + ["--epochs", "3", "--resume", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3
    # User errors are one-line messages with exit code 2.
    assert main(argv) == 2
    assert "already holds" in capsys.readouterr().err
    assert main(["pretrain", str(tmp_path / "missing.npz"), "--out", str(out)]) == 2
    assert main(["pretrain", str(data), "--out", str(tmp_path / "r2"), "--train", "1k"]) == 2
    assert "exceed" in capsys.readouterr().err

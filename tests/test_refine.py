"""StABlE refinement end to end on tiny xTB ethanol data: the loop, its outputs, resume."""
import copy
import dataclasses
import csv
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from openmm_stable.cli import main
from openmm_stable.config import config_from_dict
from openmm_stable.engine import EngineConfig, ReplicaEngine
from openmm_stable.io import load_torch_file
from openmm_stable.stability import BondDeviationCriterion
from openmm_stable.training.stable import StableConfig, StableTrainer, refine


def _learning_config(**overrides) -> StableConfig:
    """Learning from the first epoch: a training threshold of 0.02 A flags every replica.
    Friction 10/ps keeps the tiny test model's replicas intact over these short runs. The
    CPU platform is pinned: the bounds below were measured there."""
    values = dict(n_replicas=8, epoch_ps=0.3, frame_interval_ps=0.01, equilibration_ps=0.05, max_epochs=6,
                  learning_epochs=10, bond_threshold=0.02, unstable_fraction=0.1, lr=1e-3, seed=0,
                  observable={"name": "bond_lengths"}, energy_force_weight=1.0,
                  engine=EngineConfig(temperature_K=500.0, timestep_fs=0.5, friction_per_ps=10.0, platform="CPU"))
    values.update(overrides)
    return StableConfig(**values)


def _log(folder):
    with open(folder / "log.csv") as handle:
        return list(csv.DictReader(handle))


def _expanded(dataset, factor):
    """The dataset's molecules blown up by `factor` about their centroids: a reference
    the model clearly misses (against the true reference the tiny test model already sits
    at the sampling-noise floor, where no trend can be tested)."""
    centre = dataset.positions.mean(axis=1, keepdims=True)
    return dataclasses.replace(dataset, positions=centre + factor * (dataset.positions - centre))


def _observable_loss_of_a_fixed_run(trainer, model) -> float:
    """The trainer's observable loss over the stable frames of one fixed-seed run of
    `model` (same starts, same velocities): a like-for-like before/after measure, far less
    noisy than the per-epoch training losses."""
    engine = ReplicaEngine(model, trainer.z, 8, trainer.config.engine)
    engine.set_states(trainer.initial_positions, seed=123)
    criterion = BondDeviationCriterion.from_dataset(trainer.dataset, 0.5)
    frames, alive = [], np.ones(8, dtype=bool)
    for t in range(60):
        engine.step(20)
        positions, _ = engine.get_states()
        alive &= ~criterion.unstable(criterion(torch.as_tensor(positions))).numpy()
        if t >= 10:
            frames.append(positions[alive])
    return trainer.observable_loss_of(np.concatenate(frames))


def test_refine_lowers_observable_loss_and_keeps_force_error(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    """Target: mean bond lengths of a 3 % expanded reference. Bounds: the refined model's
    observable loss must fall below 0.8x the starting model's (measured: 0.67x here; 0.65x
    and 0.48x with seeds 1 and 3), and the validation force MAE may grow by at most 50 % while the
    observable pulls the model away from the QM data (measured: +1 % here, +11 to +15 % with seeds 1 and 3)."""
    start = copy.deepcopy(pretrained_ethanol_model)
    trainer = StableTrainer(copy.deepcopy(start), xtb_ethanol, _learning_config(), tmp_path,
                            reference=_expanded(xtb_ethanol, 1.03), progress=False)
    summary = trainer.fit()
    rows = _log(tmp_path)
    assert [r["phase"] for r in rows] == ["simulation"] + ["learning"] * 5
    before = _observable_loss_of_a_fixed_run(trainer, start)
    after = _observable_loss_of_a_fixed_run(trainer, trainer.model)
    print(f"observable loss before {before:.3g} after {after:.3g}; force MAE {rows[0]['val_force_mae_meV_per_A']} -> {rows[-1]['val_force_mae_meV_per_A']}")
    assert after < 0.8 * before
    force_mae = [float(r["val_force_mae_meV_per_A"]) for r in rows]
    assert force_mae[-1] < 1.5 * force_mae[0]
    energy_mae = [float(r["val_energy_mae_meV"]) for r in rows]
    assert energy_mae[-1] < 2 * energy_mae[0]  # the energy shift is re-fitted after each step
    for name in ("model.pt", "checkpoint.pt", "log.csv", "learning_curves.png", "metrics.json"):
        assert (tmp_path / name).exists(), name
    assert summary["epochs"] == 6 and summary["replica_steps"] == 6 * 8 * 600
    assert all(float(r["observable_grad_norm"]) > 0 and float(r["energy_force_grad_norm"]) > 0 for r in rows[1:])


def test_parameters_change_only_in_learning_phase(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    model = copy.deepcopy(pretrained_ethanol_model)
    before = [p.detach().clone() for p in model.parameters()]
    config = _learning_config(bond_threshold=5.0, max_epochs=2, epoch_ps=0.1)  # nothing fails: no learning
    refined, _ = refine(model, xtb_ethanol, config, tmp_path, progress=False)
    assert [r["phase"] for r in _log(tmp_path)] == ["simulation", "simulation"]
    assert all(torch.equal(a, b) for a, b in zip(before, refined.parameters()))


TIMING_COLUMNS = ("sim_time_s", "grad_time_s")


def test_kill_and_resume(xtb_ethanol, pretrained_ethanol_model_file, tmp_path):
    """kill -9 in the middle of a CLI run, then --resume: a gap-free log, and the run an
    uninterrupted one of as many epochs gives: the same weights, optimizer state and log
    values (model, optimizer, scheduler, replica states and RNG states all come back from
    the checkpoint; a resume from the pre-trained weights would not match).

    Nose-Hoover dynamics, because the comparison is exact: every learning epoch restarts the
    replicas from seeded states and resets the thermostats, so nothing outside the checkpoint
    shapes the run. (A Langevin resume is the same run too, to float32 round-off: the
    checkpoint carries OpenMM's Context checkpoint; tests/test_refine_files.py.)"""
    data = xtb_ethanol.source
    config = tmp_path / "refine.yaml"
    config.write_text("n_replicas: 4\nepoch_ps: 0.1\nframe_interval_ps: 0.01\nequilibration_ps: 0.02\n"
                      "bond_threshold: 0.02\nunstable_fraction: 0.1\nlearning_epochs: 50\nlr: 0.001\n"
                      "engine: {platform: CPU, integrator: nose-hoover}\n")

    def args(out):
        return ["refine", str(pretrained_ethanol_model_file), "--data", str(data), "--config", str(config),
                "--out", str(out), "--no-progress"]

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "openmm_stable", *args(out), "--epochs", "40"], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # no clock: wait for the third logged epoch, or for the process to end (then say why)
    while not ((out / "log.csv").exists() and len(_log(out)) >= 3):
        if proc.poll() is not None:
            pytest.fail(f"refine ended (code {proc.returncode}) before its third epoch: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done_before = len(_log(out))
    assert 3 <= done_before < 40
    total = done_before + 2
    assert main([*args(out), "--epochs", str(total), "--resume"]) == 0
    rows = _log(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, total + 1))

    straight = tmp_path / "straight"
    assert main([*args(straight), "--epochs", str(total)]) == 0
    expected = _log(straight)
    assert [r["phase"] for r in expected] == ["simulation"] + ["learning"] * (total - 1)
    for got, want in zip(rows, expected):
        assert {k: v for k, v in got.items() if k not in TIMING_COLUMNS} == \
            {k: v for k, v in want.items() if k not in TIMING_COLUMNS}, got["epoch"]
    resumed = load_torch_file(out / "checkpoint.pt")
    uninterrupted = load_torch_file(straight / "checkpoint.pt")
    for name, value in uninterrupted["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    for key, state in uninterrupted["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(resumed["optimizer"]["state"][key][name]), torch.as_tensor(value)), name
    assert resumed["np_rng"] == uninterrupted["np_rng"]
    from openmm_stable.models import load_model

    saved = load_model(out / "model.pt").state_dict()
    assert all(torch.equal(saved[k].cpu(), v.cpu()) for k, v in uninterrupted["state_dict"].items())
    start = load_model(pretrained_ethanol_model_file).state_dict()  # learning did move the weights
    assert not all(torch.equal(start[k].cpu(), v.cpu()) for k, v in saved.items())


def test_config_errors_are_clear(tmp_path, xtb_ethanol, pretrained_ethanol_model_file, capsys):
    with pytest.raises(ValueError, match="unknown key.*n_replica"):
        config_from_dict(StableConfig, {"n_replica": 4})
    with pytest.raises(ValueError, match="samples_from"):
        StableConfig(samples_from="some")
    with pytest.raises(ValueError, match="learning_restart.*last_window"):
        StableConfig(learning_restart="window")
    bad = tmp_path / "bad.yaml"
    bad.write_text("observable: {name: hr, bins: 3}\n")
    code = main(["refine", str(pretrained_ethanol_model_file), "--data", str(xtb_ethanol.source),
                 "--config", str(bad), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "bins" in capsys.readouterr().err


def test_refine_leaves_the_callers_model_alone(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    before = [p.detach().clone() for p in pretrained_ethanol_model.parameters()]
    refined, _ = refine(pretrained_ethanol_model, xtb_ethanol, _learning_config(max_epochs=2), tmp_path,
                        progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, pretrained_ethanol_model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before, refined.parameters()))


def test_last_window_restart_reruns_the_failing_window(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    """learning_restart="last_window": every learning epoch starts from the exact states
    (positions and velocities) the replicas had at the start of the simulation epoch that
    triggered learning; "initial" restarts from the dataset frames with fresh velocities."""
    starts = {}
    for mode in ("last_window", "initial"):
        trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol,
                                _learning_config(learning_restart=mode, max_epochs=3, epoch_ps=0.1),
                                tmp_path / mode, progress=False)
        trainer._restart_replicas()
        window = trainer.engine.get_states()
        recorded = []
        original = trainer.engine.set_states

        def spy(positions, velocities=None, seed=None, original=original, recorded=recorded):
            original(positions, velocities, seed)
            recorded.append(trainer.engine.get_states())

        trainer.engine.set_states = spy
        phases = [trainer.run_epoch()["phase"] for _ in range(3)]
        assert phases == ["simulation", "learning", "learning"]
        starts[mode] = (window, recorded)
    window, recorded = starts["last_window"]
    assert len(recorded) == 2  # one restart per learning epoch
    for positions, velocities in recorded:
        np.testing.assert_allclose(positions, window[0], atol=1e-5)
        np.testing.assert_allclose(velocities, window[1], atol=1e-5)
    _, recorded = starts["initial"]
    assert not np.allclose(recorded[0][1], recorded[1][1])  # fresh velocities each learning epoch


def test_until_stable_ends_learning_when_no_replica_fails(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    """With until_stable a learning epoch in which no replica fails ends the learning phase
    (before learning_epochs); while replicas keep failing, learning goes on."""
    trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol,
                            _learning_config(until_stable=True, learning_epochs=10, epoch_ps=0.1), tmp_path,
                            progress=False)
    trainer._restart_replicas()
    rows = [trainer.run_epoch() for _ in range(3)]  # the 0.02 A threshold flags every replica
    assert [r["phase"] for r in rows] == ["simulation", "learning", "learning"]
    assert trainer.state.phase == "learning"
    trainer.criterion.threshold = 5.0  # from now on no replica fails
    row = trainer.run_epoch()
    assert row["phase"] == "learning" and row["unstable_fraction"] == 0.0
    assert trainer.state.phase == "simulation" and trainer.state.cycle == 1

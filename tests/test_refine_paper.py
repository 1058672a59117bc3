"""The paper's learning loop, faithfully: a replay that replays (thermostat and random
stream included), a window that holds every failing replica's own epoch start, the
simulation phase's failure frames as samples, no equilibration cut on replays, loss
scales from many windows, a restore with its own optimizer, and `learning: paper`."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from openmm_stable.config import config_from_yaml
from openmm_stable.engine import EngineConfig
from openmm_stable.errors import InputError
from openmm_stable.training.stable import StableTrainer, refine
from openmm_stable.training.stable_config import PAPER_SETTINGS, StableConfig


def _config(**overrides) -> StableConfig:
    """A 0.02 A training threshold flags every replica within a few frames: learning from
    the first epoch. No gradient unless a test asks for one (observable and energy/force
    weights 0, so a learning step leaves the model as it was)."""
    values = dict(n_replicas=4, epoch_ps=0.05, frame_interval_ps=0.01, equilibration_ps=0.02, max_epochs=4,
                  learning_epochs=10, bond_threshold=0.02, unstable_fraction=0.1, lr=1e-3, seed=0,
                  observable={"name": "bond_lengths"}, observable_weight=0.0, energy_force_weight=0.0,
                  log_signal=False, random_reset_fraction=0.0, until_stable=False,
                  engine=EngineConfig(temperature_K=500.0, timestep_fs=0.5, friction_per_ps=10.0, platform="CPU"))
    values.update(overrides)
    return StableConfig(**values)


def _trainer(model, data, path, **overrides) -> StableTrainer:
    trainer = StableTrainer(copy.deepcopy(model), data, _config(**overrides), path, progress=False)
    trainer._restart_replicas()
    return trainer


def _record_frames(trainer) -> list:
    recorded = []
    original = trainer._simulate_epoch

    def spy():
        frames, flags = original()
        recorded.append(frames.copy())
        return frames, flags

    trainer._simulate_epoch = spy
    return recorded


@pytest.mark.parametrize("integrator", ["langevin", "nose-hoover"])
def test_exact_replay_reruns_the_same_dynamics(xtb_ethanol, pretrained_ethanol_model, tmp_path, integrator):
    """With the model unchanged, two learning epochs of ``replay: exact`` are the same
    trajectory (Langevin noise and Nose-Hoover chains restored); ``replay: states`` under
    Langevin draws new noise each time (what the recipe did, and why it rarely saw a failure again)."""
    engine = EngineConfig(temperature_K=500.0, timestep_fs=0.5, friction_per_ps=10.0, platform="CPU",
                          integrator=integrator)
    runs = {}
    for replay in ("exact", "states"):
        trainer = _trainer(pretrained_ethanol_model, xtb_ethanol, tmp_path / replay, replay=replay, engine=engine)
        recorded = _record_frames(trainer)
        phases = [trainer.run_epoch()["phase"] for _ in range(3)]
        assert phases == ["simulation", "learning", "learning"]
        runs[replay] = recorded
    exact = runs["exact"]
    np.testing.assert_allclose(exact[1], exact[2], atol=1e-4)  # float32 round-off of the restored Context
    np.testing.assert_allclose(exact[1][0], runs["exact"][0][0], atol=0.2)  # it is the window's start that reruns
    if integrator == "langevin":
        states = runs["states"]
        assert np.abs(states[1] - states[2]).max() > 100 * 1e-4


def test_learning_window_holds_each_failing_replicas_own_epoch(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    trainer = _trainer(pretrained_ethanol_model, xtb_ethanol, tmp_path, learning_window="failing_epochs")
    st = trainer.state
    st.window_positions, st.window_velocities = trainer.engine.get_states()
    earlier = st.window_positions + 0.01  # replica 1 failed in an earlier epoch, from here
    st.failing_window_positions, st.failing_window_velocities = st.window_positions.copy(), st.window_velocities.copy()
    st.failing_window_positions[1], st.failing_window_velocities[1] = earlier[1], -st.window_velocities[1]
    st.failed_this_cycle = np.array([True, True, False, False])  # replica 0 failed in this (triggering) epoch
    trainer._enter_learning()
    assert st.phase == "learning" and st.own_window.tolist() == [False, True, False, False]
    np.testing.assert_array_equal(st.learning_positions[1], earlier[1])
    np.testing.assert_array_equal(st.learning_velocities[1], -st.window_velocities[1])
    np.testing.assert_array_equal(st.learning_positions[[0, 2, 3]], st.window_positions[[0, 2, 3]])
    trainer._restart_replicas(for_learning=True)
    positions, _ = trainer.engine.get_states()
    np.testing.assert_allclose(positions[1], earlier[1], atol=1e-5)
    # The triggering epoch only (the recipe): replica 1 starts where everyone else does.
    plain = _trainer(pretrained_ethanol_model, xtb_ethanol, tmp_path / "plain")
    plain.state.window_positions, plain.state.window_velocities = st.window_positions, st.window_velocities
    plain.state.failing_window_positions, plain.state.failing_window_velocities = (st.failing_window_positions,
                                                                                   st.failing_window_velocities)
    plain.state.failed_this_cycle = st.failed_this_cycle
    plain._enter_learning()
    np.testing.assert_array_equal(plain.state.learning_positions, st.window_positions)


def test_simulation_failures_become_samples_and_replays_keep_their_first_frames(
        xtb_ethanol, pretrained_ethanol_model, tmp_path):
    """Every replica fails in the simulation epoch (0.02 A): its frames up to the failure go
    to the first learning step, and with equilibrate_replays false no replayed frame is cut."""
    trainer = _trainer(pretrained_ethanol_model, xtb_ethanol, tmp_path, simulation_failure_samples=True,
                       equilibrate_replays=False, observable_weight=1.0)
    first = trainer.run_epoch()
    assert first["phase"] == "simulation"
    kept = trainer.state.failure_samples
    assert kept is not None and len(kept) >= 4 and trainer.state.failure_sample_replicas.tolist() == sorted(
        trainer.state.failure_sample_replicas.tolist())
    learning = trainer.run_epoch()
    window = trainer.config.frames_per_epoch * trainer.config.n_replicas  # no frame cut from the replay
    assert learning["n_failure_samples"] == len(kept)
    assert learning["n_samples"] == len(kept) + window
    assert trainer.state.failure_samples is None  # used once
    # With the equilibration cut (the default), the first 0.02 ps of the replay are dropped.
    cut = _trainer(pretrained_ethanol_model, xtb_ethanol, tmp_path / "cut", observable_weight=1.0)
    cut.run_epoch()
    assert cut.run_epoch()["n_samples"] == window - 2 * cut.config.n_replicas


def test_observable_scale_from_the_simulation_epochs(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    trainer = _trainer(pretrained_ethanol_model, xtb_ethanol, tmp_path, observable_scale_from="simulation_epochs",
                       unstable_fraction=1.0, bond_threshold=5.0)  # nothing fails: simulation epochs only
    rows = [trainer.run_epoch() for _ in range(3)]
    assert all(r["phase"] == "simulation" and r["observable_loss"] > 0 for r in rows)
    expected = np.mean([r["observable_loss"] for r in rows])
    assert trainer._observable_scale(123.0) == pytest.approx(expected)
    first = _trainer(pretrained_ethanol_model, xtb_ethanol, tmp_path / "first")
    assert first._observable_scale(123.0) == 123.0


def test_lbfgs_restore_leaves_the_learning_optimizer_alone(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    """The force budget restored by its own L-BFGS: the model comes back within budget, and
    Adam's moments are those of the learning step only (the shared restore changes them)."""
    moments = {}
    for restore in ("lbfgs", "shared"):
        trainer = _trainer(pretrained_ethanol_model, xtb_ethanol, tmp_path / restore, restore_optimizer=restore,
                           force_mae_budget=1.0001, max_restore_steps=4, observable_weight=1.0,
                           energy_force_weight=0.0, lr=5e-3, warmup_steps=0)
        trainer.run_epoch()
        trainer.state.start_force_mae = None
        original = trainer._keep_force_budget
        seen = {}

        def spy(original=original, seen=seen, trainer=trainer):
            seen["adam"] = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
            return original()

        trainer._keep_force_budget = spy
        row = trainer.run_epoch()
        assert row["restore_steps"] >= 1
        after = [s["exp_avg"] for s in trainer.optimizer.state.values()]
        moments[restore] = all(torch.equal(a, b) for a, b in zip(seen["adam"], after))
        budget = trainer.config.force_mae_budget * trainer.state.start_force_mae
        assert row["train_force_mae_meV_per_A"] <= budget or row["restore_steps"] == 4
    assert moments == {"lbfgs": True, "shared": False}


def test_learning_paper_preset(tmp_path, xtb_ethanol, pretrained_ethanol_model):
    config = StableConfig.paper(lr=2e-3)
    assert config.learning == "paper" and config.lr == 2e-3  # a key given beside the preset wins
    assert {k: getattr(config, k) for k in PAPER_SETTINGS if k != "lr"} == \
        {k: v for k, v in PAPER_SETTINGS.items() if k != "lr"}
    path = tmp_path / "paper.yaml"
    path.write_text("learning: paper\nn_replicas: 4\n")
    from_file = config_from_yaml(StableConfig, path)
    assert (from_file.optimizer, from_file.replay, from_file.n_replicas) == ("sgd", "exact", 4)
    with pytest.raises(InputError, match="replay: must be one of states, exact"):
        StableConfig(replay="perfect")
    # It runs: the paper's loop on the test molecule, learning from the first epoch.
    overrides = {k: v for k, v in vars(_config()).items() if k not in PAPER_SETTINGS and k != "learning"}
    overrides.update(max_epochs=3, observable_weight=1.0, energy_force_weight=10.0)
    _, summary = refine(pretrained_ethanol_model, xtb_ethanol, StableConfig.paper(**overrides), tmp_path / "run",
                        progress=False)
    assert summary["epochs"] == 3 and summary["learning_steps"] == 2

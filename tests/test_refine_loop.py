"""The refinement loop's failure handling, regulariser and signal diagnostics, each checked on
inputs the test builds (no assertion depends on where an MD trajectory goes)."""
import copy

import numpy as np
import pytest
import torch

from openmm_stable.engine import EngineConfig
from openmm_stable.training.batching import energy_force_loss
from openmm_stable.training.stable import StableConfig, StableTrainer, refine


def _config(**overrides) -> StableConfig:
    values = dict(n_replicas=4, epoch_ps=0.05, frame_interval_ps=0.01, equilibration_ps=0.0, max_epochs=2,
                  learning_epochs=10, lr=1e-4, seed=0, observable={"name": "bond_lengths"},
                  engine=EngineConfig(temperature_K=500.0, friction_per_ps=10.0, platform="CPU"))
    values.update(overrides)
    return StableConfig(**values)


def test_failed_replicas_go_back_to_the_start_of_their_epoch(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    # A 1e-6 A threshold flags every replica at every frame; unstable_fraction 1 keeps the
    # loop in the simulation phase, so every frame resets every replica.
    trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol,
                            _config(failure_reset="epoch_start", bond_threshold=1e-6, unstable_fraction=1.0,
                                    max_epochs=1), tmp_path, progress=False)
    trainer._restart_replicas()
    start_pos, start_vel = trainer.engine.get_states()
    resets = []
    original = trainer.engine.reset_replicas
    trainer.engine.reset_replicas = lambda idx, pos, vel=None, seed=0: (resets.append((idx, pos.copy())),
                                                                        original(idx, pos, vel, seed))[1]
    trainer.run_epoch()
    assert len(resets) == trainer.config.frames_per_epoch
    for idx, positions in resets:
        assert idx.tolist() == [0, 1, 2, 3]
        np.testing.assert_array_equal(positions, start_pos)  # the epoch's start, not the last stable frame


def test_split_half_cosine_is_one_for_identical_halves_and_the_step_is_logged(xtb_ethanol, pretrained_ethanol_model,
                                                                             tmp_path):
    trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, _config(), tmp_path,
                            progress=False)
    frames = xtb_ethanol.positions[:6]
    x = torch.as_tensor(np.concatenate([frames, frames]))  # replicas 0 and 1 hold the same frames
    replica = np.repeat([0, 1], 6)
    assert trainer.objective.split_half_cosine(trainer.model, x, replica) == pytest.approx(1.0, abs=1e-9)
    other = torch.as_tensor(np.concatenate([frames, xtb_ethanol.positions[30:36]]))
    assert trainer.objective.split_half_cosine(trainer.model, other, replica) < 0.999
    row = trainer._learning_step(np.concatenate([frames, frames]), replica)
    assert row["split_half_cosine"] == pytest.approx(1.0, abs=1e-9)
    # The first-order prediction is the observable gradient dotted with the step taken.
    assert np.isfinite(row["predicted_loss_change"]) and row["predicted_loss_change"] != 0.0


def test_regulariser_over_the_whole_training_set_is_its_mean_gradient(xtb_ethanol, pretrained_ethanol_model,
                                                                      tmp_path):
    config = _config(qm_batch_size=None, normalize_losses=False, energy_force_weight=2.0)
    trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, config, tmp_path, progress=False)
    params = list(trainer.model.parameters())
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.regulariser.backward(trainer.model, trainer._energy_force_scale(config.energy_force_weight))
    got = [p.grad.clone() for p in params]
    trainer.optimizer.zero_grad(set_to_none=True)
    everything = np.arange(len(trainer.train_tensors))
    loss, _ = energy_force_loss(trainer.model, trainer.train_tensors.batch(everything), config.energy_weight,
                                config.force_weight)
    (2.0 * loss).backward()
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)


def test_learning_step_cap_and_fresh_optimizer_per_phase(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    config = _config(bond_threshold=1e-6, unstable_fraction=0.1, max_learning_steps=2, max_epochs=10,
                     new_optimizer_per_phase=True)
    trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, config, tmp_path, progress=False)
    first = trainer.optimizer
    trainer._restart_replicas()
    trainer.run_epoch()  # simulation epoch: every replica fails, learning starts with a new optimizer
    assert trainer.state.phase == "learning" and trainer.optimizer is not first
    _, summary = refine(pretrained_ethanol_model, xtb_ethanol, config, tmp_path / "capped", progress=False)
    assert summary["learning_steps"] == 2 and summary["epochs"] == 3


def test_bad_settings_are_refused_before_any_simulation():
    from openmm_stable.errors import InputError

    for bad in ({"failure_reset": "somewhere"}, {"random_reset_fraction": 1.5}, {"qm_batch_size": 0},
                {"observable_weight": -1.0}, {"bond_threshold": -0.1}, {"observable_objective": "median"},
                {"force_mae_budget": 0.9}, {"max_restore_steps": 0}):
        with pytest.raises(InputError):
            _config(**bad)


def test_noisy_windows_are_accumulated_before_a_step(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    # A cosine threshold of 1 is never cleared by two different halves: every step waits
    # until `max_accumulated_windows` windows are pooled.
    config = _config(bond_threshold=1e-6, unstable_fraction=0.1, max_epochs=5, min_split_half_cosine=1.0,
                     max_accumulated_windows=2)
    trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, config, tmp_path, progress=False)
    trainer.fit()
    learning = [r for r in trainer.state.history if r["phase"] == "learning"]
    assert [r["accumulated_windows"] for r in learning] == [1, 2, 1, 2]
    assert [("grad_norm" in r) for r in learning] == [False, True, False, True]
    assert learning[1]["n_samples"] == learning[0]["n_samples"] + config.n_replicas * config.frames_per_epoch
    assert trainer.state.learning_steps == 2


def test_per_frame_objective_is_the_mean_loss_of_the_frames(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    """With observable_objective per_frame the step is taken on <L(O(x))>, which the log
    reports; on the same frames it exceeds L(<O>) by the spread of O (MSE)."""
    frames = xtb_ethanol.positions[:12]
    replica = np.repeat([0, 1, 2, 3], 3)
    losses = {}
    for objective in ("ensemble", "per_frame"):
        trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol,
                                _config(observable_objective=objective), tmp_path / objective, progress=False)
        values = trainer.observable(torch.as_tensor(frames), trainer.z, None)
        row = trainer._learning_step(frames, replica)
        losses[objective] = row["observable_loss"]
        expected = trainer.objective.loss_fn(values).mean() if objective == "per_frame" else trainer.objective.loss_fn(values.mean(0))
        assert row["observable_loss"] == pytest.approx(float(expected), rel=1e-9)
        assert trainer.observable_loss_of(frames) == pytest.approx(float(expected), rel=1e-9)
    assert losses["per_frame"] > losses["ensemble"]


def test_force_budget_restores_the_qm_fit_after_a_step_that_broke_it(xtb_ethanol, pretrained_ethanol_model,
                                                                     tmp_path):
    """A model pushed off its QM fit (weights perturbed here, as a large observable step
    would) takes energy/force-only steps until its training-set force MAE is back within
    the budget or the step cap is reached; a model within the budget takes none."""
    config = _config(force_mae_budget=1.05, max_restore_steps=5, lr=1e-3, energy_force_weight=0.0)
    trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, config, tmp_path, progress=False)
    start = trainer.budget.mae(trainer.model)
    trainer.state.start_force_mae = start
    untouched = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer._keep_force_budget() == {"train_force_mae_meV_per_A": start, "restore_steps": 0}
    for before, p in zip(untouched, trainer.model.parameters()):
        assert torch.equal(before, p.detach())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    broken = trainer.budget.mae(trainer.model)
    assert broken > 1.05 * start  # the input the guard needs
    row = trainer._keep_force_budget()
    assert 1 <= row["restore_steps"] <= 5 and trainer.state.restore_steps == row["restore_steps"]
    assert row["train_force_mae_meV_per_A"] < broken
    assert row["train_force_mae_meV_per_A"] <= 1.05 * start or row["restore_steps"] == 5
    assert row["train_force_mae_meV_per_A"] == pytest.approx(trainer.budget.mae(trainer.model), rel=1e-9)


def test_force_budget_in_the_loop_is_logged_and_checkpointed(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    """With a budget of 1x every step ends with the training-set force MAE back within its
    starting value or with all its restore steps used; the log, the summary and the
    checkpointed loop state agree on how many were taken."""
    config = _config(bond_threshold=1e-6, unstable_fraction=0.1, max_learning_steps=2, max_epochs=10,
                     force_mae_budget=1.0, max_restore_steps=2, lr=1e-3)
    _, summary = refine(pretrained_ethanol_model, xtb_ethanol, config, tmp_path, progress=False)
    import csv

    with open(tmp_path / "log.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["grad_norm"]]
    assert len(rows) == 2
    # Parsed, not the CSV strings (any non-empty string, "0" included, is truthy).
    maes = [float(r["train_force_mae_meV_per_A"]) for r in rows]
    restore_steps = [int(r["restore_steps"]) for r in rows]
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    start = payload["loop"]["start_force_mae"]
    assert start > 0 and all(np.isfinite(m) and m > 0 for m in maes)
    assert all(0 <= n <= config.max_restore_steps for n in restore_steps)
    # Each step ends within the budget (1x the starting MAE) unless it used up its restore steps.
    for mae, n in zip(maes, restore_steps):
        assert mae <= config.force_mae_budget * start or n == config.max_restore_steps, (mae, n, start)
    assert summary["restore_steps"] == sum(restore_steps)
    assert payload["loop"]["restore_steps"] == summary["restore_steps"]

"""``learning: failure_bank``: the log-P(excursion) estimator with a stratified bank, the
constraint projection, the bank's composition, the observable, and the loop end to end
(each checked on inputs the test builds; the loop test asserts only what does not depend
on where the trajectory goes)."""
import copy
import math

import numpy as np
import pytest
import torch

from openmm_stable.engine import EngineConfig
from openmm_stable.errors import InputError
from openmm_stable.io import load_torch_file
from openmm_stable.models import create_model
from openmm_stable.observables import BondDeviationObservable, make_observable
from openmm_stable.training.estimator import log_mean_coefficients, model_energy_fn, surrogate_backward
from openmm_stable.training.failure_bank import (FailureBank, FailureBankSettings, FailureBankTrainer,
                                                 ProjectionBasis, constraint_rows, flat_grad, learning_overhead,
                                                 rate_stop_reason, set_flat_parameters)
from openmm_stable.training.stable import StableConfig, refine
from openmm_stable.units import kT_eV

from _structures import Harmonic


def _mean_hinge(k: float, d: float, kT: float) -> float:
    """<relu(|x| - d)^2> under exp(-k x^2 / 2kT), in closed form: sigma^2 f(d / sigma)
    with f(a) = 2 ((1 + a^2) Q(a) - a phi(a))."""
    s = math.sqrt(kT / k)
    a = d / s
    phi, tail = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), 0.5 * math.erfc(a / math.sqrt(2))
    return s * s * 2 * ((1 + a * a) * tail - a * phi)


def test_log_excursion_gradient_is_exact_on_a_harmonic_well_also_from_a_subsampled_bank():
    T, k = 300.0, 2.0
    kT = kT_eV(T)
    d = 1.5 * math.sqrt(kT / k)  # P(excursion) = 0.13
    h = 1e-5
    exact = (math.log(_mean_hinge(k + h, d, kT)) - math.log(_mean_hinge(k - h, d, kT))) / (2 * h)
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, math.sqrt(kT / k), 200_000)
    l = np.maximum(np.abs(x) - d, 0.0) ** 2

    def estimate(frames, scores, weights=None):
        model = Harmonic(k)
        result = log_mean_coefficients(torch.as_tensor(scores), T, None if weights is None else torch.as_tensor(weights))
        surrogate_backward(model, torch.as_tensor(frames).reshape(-1, 1, 1), result.coefficients, minibatch=50_000)
        return float(model.k.grad)

    assert estimate(x, l) == pytest.approx(exact, rel=0.03)
    # The bank: every frame with l > 0, and 1,000 of the ~173,000 others, each standing for N_0 / 1,000.
    excursion, background = np.flatnonzero(l > 0), np.flatnonzero(l == 0)
    picked = rng.choice(background, 1000, replace=False)
    frames, scores = np.concatenate([x[excursion], x[picked]]), np.concatenate([l[excursion], l[picked]])
    weights = np.concatenate([np.ones(excursion.size), np.full(picked.size, background.size / picked.size)])
    assert estimate(frames, scores, weights) == pytest.approx(exact, rel=0.03)
    # Treated as a uniform sample, the same bank under-weights the mean gradient: half the value.
    assert estimate(frames, scores) / exact < 0.6


def test_surrogate_gradient_is_the_derivative_of_the_reweighted_log_mean():
    """sum_k c_k dU_k/dtheta equals d/dtheta of log( sum w l e^{-beta dU} / sum w e^{-beta dU} )
    at dU = 0, the reweighted estimate of log<l> under a perturbed model."""
    T, k = 500.0, 3.0
    beta = 1.0 / kT_eV(T)
    rng = np.random.default_rng(1)
    x = torch.as_tensor(rng.normal(0.0, 0.2, (40, 1, 1)))
    l = torch.relu(x.abs().reshape(-1) - 0.2) ** 2
    l[0] = 0.01  # at least one excursion
    w = torch.as_tensor(rng.uniform(0.5, 3.0, 40))
    model = Harmonic(k)
    surrogate_backward(model, x, log_mean_coefficients(l, T, w).coefficients)

    def reweighted_log_mean(k_new):
        du = 0.5 * (k_new - k) * (x**2).reshape(-1)
        b = w * torch.exp(-beta * du)
        return float(torch.log((b * l).sum() / b.sum()))

    eps = 1e-6
    fd = (reweighted_log_mean(k + eps) - reweighted_log_mean(k - eps)) / (2 * eps)
    assert float(model.k.grad) == pytest.approx(fd, rel=1e-6)
    with pytest.raises(InputError, match="penalty 0"):
        log_mean_coefficients(torch.zeros(5), T)
    with pytest.raises(InputError, match="positive weights"):
        log_mean_coefficients(l, T, -w)


def test_projection_removes_the_constraint_rows_and_is_a_projector():
    rng = np.random.default_rng(2)
    rows = torch.as_tensor(rng.normal(size=(6, 20)) * rng.uniform(0.1, 10, (6, 1)))
    undamped = ProjectionBasis(rows, damping=1e-14)
    P = torch.stack([undamped.project(e) for e in torch.eye(20, dtype=torch.float64)], 1)
    for row in rows:
        assert float(undamped.project(row).norm()) < 1e-9 * float(row.norm())
    torch.testing.assert_close(P, P.T, atol=1e-10, rtol=0)
    torch.testing.assert_close(P @ P, P, atol=1e-10, rtol=0)
    assert float(torch.trace(P)) == pytest.approx(14.0, abs=1e-8)  # rank 20 - 6
    damped = ProjectionBasis(rows, damping=1e-3)
    for row in rows:  # damping leaves a small remainder, never an amplification
        assert 0 < float(damped.project(row).norm()) < 0.05 * float(row.norm())
    g = torch.as_tensor(rng.normal(size=20))
    single = ProjectionBasis(rows.float(), damping=1e-3)  # float32 rows, as constraint_rows stores them
    torch.testing.assert_close(single.project(g), damped.project(g), rtol=0, atol=1e-5 * float(g.norm()))


def test_projected_step_leaves_the_constrained_energies_and_forces_unchanged_to_first_order(ethanol):
    torch.manual_seed(0)
    z, pos = ethanol
    model = create_model("schnet", "tiny").double()
    frames = (torch.as_tensor(pos)[None] + 0.05 * torch.randn(4, len(z), 3, dtype=torch.float64)).numpy()
    n_projections, seed = 3, 7
    rows = constraint_rows(model, z, frames, n_projections, seed, dtype=torch.float64)
    assert rows.shape == (4 * (1 + n_projections), sum(p.numel() for p in model.parameters()))
    basis = ProjectionBasis(rows, damping=1e-12)
    # A direction that moves the energies: the gradient of the energies of other frames.
    energy_fn = model_energy_fn(model, z)
    model.zero_grad()
    other = torch.as_tensor(pos)[None] + 0.1 * torch.randn(8, len(z), 3, dtype=torch.float64)
    energy_fn(other).sum().backward()
    g = flat_grad(model)
    theta = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    generator = torch.Generator().manual_seed(seed)
    directions = [[(lambda v: v / v.norm())(torch.randn((1, len(z), 3), generator=generator, dtype=torch.float64))
                   for _ in range(n_projections)] for _ in frames]

    def constrained(vector):
        """Energies and the constrained force projections v.F of the frames at theta + vector."""
        set_flat_parameters(model, theta + vector)
        out = []
        for frame, vs in zip(frames, directions):
            x = torch.as_tensor(frame)[None].clone().requires_grad_(True)
            energy = energy_fn(x).sum()
            (grad,) = torch.autograd.grad(energy, x)
            out += [float(energy.detach())] + [float(-(grad * v).sum()) for v in vs]
        set_flat_parameters(model, theta)
        return np.array(out)

    def first_order_change(direction, eps=1e-4):
        unit = direction / direction.norm()
        return np.abs((constrained(eps * unit) - constrained(-eps * unit)) / (2 * eps)).max()

    projected, free = first_order_change(basis.project(g)), first_order_change(g)
    assert free > 1e-3 and projected < 1e-5 * free


def test_bond_deviation_observable_and_its_hinge_targets(ethanol):
    z, pos = ethanol
    frames = np.repeat(pos[None], 3, axis=0)
    frames[1, 0] += [0.1, 0.0, 0.0]  # stretch (or shorten) every bond of atom 0
    frames[2, 0] += [3.0, 0.0, 0.0]  # flown off: capped
    obs = make_observable("bond_deviation", cap=1.0).prepare(z, frames[:2])
    assert isinstance(obs, BondDeviationObservable)
    values = obs(torch.as_tensor(frames))
    bonds = np.asarray(obs.bonds)
    of_atom0 = (bonds == 0).any(1)
    # the mean of two frames lies half way: frame 0 and frame 1 deviate equally
    torch.testing.assert_close(values[0], values[1])
    assert float(values[0, ~of_atom0].abs().max()) < 1e-12
    assert float(values[2, of_atom0].max()) == pytest.approx(1.0)
    torch.testing.assert_close(obs.hinge_targets(frames[:2]), values[:2].amax(0))
    with pytest.raises(InputError, match="call prepare"):
        BondDeviationObservable()(torch.as_tensor(frames))


def test_bank_keeps_every_excursion_and_failure_and_a_uniform_background():
    rng = np.random.default_rng(3)
    bank = FailureBank(capacity=4, n_replicas=2)
    frame = lambda value: np.full((2, 3, 3), float(value))  # noqa: E731
    # replica 0: background, excursion, excursion, failure (an event of 3 frames)
    # replica 1: background, excursion, background (a stable excursion), then background
    script = [((0, 0), (False, False)), ((0.5, 0.2), (False, False)), ((0.7, 0), (False, False)),
              ((0.9, 0), (True, False)), ((0, 0), (False, False)), ((0, 0), (False, False))]
    for t, (scores, failed) in enumerate(script):
        bank.add(frame(t), np.array(scores), np.array(failed), rng)
    assert bank.failures == 1 and bank.excursion_frames == 3
    assert bank.background_population == 8 and len(bank.background) == 4
    assert bank.kept_failure == [False, False, False, True]
    events = bank.kept_events
    assert events[0] == events[2] == events[3] != events[1]  # replica 0's run and its failure: one event
    frames, scores, weights = bank.samples()
    assert frames.shape == (8, 3, 3) and scores.tolist()[:4] == [0.5, 0.2, 0.7, 0.9]
    assert weights.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]  # N_0 / n_b = 8 / 4
    halves = [bank.samples(h) for h in (0, 1)]
    assert sum(len(h[0]) for h in halves) == 8
    assert (halves[0][1] == 0.9).sum() + (halves[1][1] == 0.9).sum() == 1  # the failure event is in one half
    settings = FailureBankSettings(min_failures=2, min_excursion_frames=3, min_failures_with_excursions=1)
    assert bank.ready(settings)
    assert not bank.ready(FailureBankSettings(min_failures=2, min_excursion_frames=4, min_failures_with_excursions=1))
    # A non-finite failure counts but is not kept; the reservoir is uniform over many frames.
    bank.add(np.full((2, 3, 3), np.nan), np.array([np.nan, np.nan]), np.array([True, True]), rng)
    assert bank.failures == 3 and len(bank.kept_frames) == 4
    copy_ = FailureBank(4, 2)
    copy_.restore(bank.state())
    assert copy_.composition() == bank.composition() and copy_.kept_events == bank.kept_events
    counts = np.zeros(50)
    for trial in range(400):
        b = FailureBank(capacity=5, n_replicas=1)
        for t in range(50):
            b.add(np.full((1, 1, 3), float(t)), np.zeros(1), np.zeros(1, dtype=bool), rng)
        for f in b.background:
            counts[int(f[0, 0])] += 1
    assert counts.sum() == 2000 and counts.min() > 15 and counts.max() < 70  # expected 40 each


@pytest.mark.parametrize("settings, message", [
    ({"min_failures": 0}, "failure_bank.min_failures: must be an integer >= 1"),
    ({"step_norm": -1}, "failure_bank.step_norm: must be a number > 0"),
    ({"background_frames": 1}, "failure_bank.background_frames"),
    ({"hinge_quantile": 1.5}, "failure_bank.hinge_quantile: must be in"),
    ({"hinge_target": 0.1, "hinge_quantile": 0.9}, "either hinge_target or hinge_quantile"),
    ({"restore_above": 0.9}, "failure_bank.restore_above"),
    ({"max_force_mae_ratio": 1.01}, "failure_bank.max_force_mae_ratio: must be >= restore_above"),
    ({"stop_rate_ratio": 1.0}, "failure_bank.stop_rate_ratio"),
    ({"bogus": 1}, r"failure_bank: unknown setting\(s\) \['bogus'\]"),
    ({"hinge_target": "0.2"}, "failure_bank.hinge_target: must be a number"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(InputError, match=message):
        FailureBankSettings.from_config(settings)


def _config(**overrides) -> StableConfig:
    # A 0.05 A training threshold and a 0.02 A hinge: at 500 K the tiny model's replicas
    # cross it every few frames, so a bank fills within an epoch or two.
    bank = dict(min_failures=16, min_excursion_frames=1000, hinge_target=0.02, background_frames=16,
                constraint_frames=8, force_projections=2, max_steps=4, rebuild_every=2, restore_iterations=3)
    bank.update(overrides.pop("bank", {}))
    values = dict(learning="failure_bank", failure_bank=bank, n_replicas=4, epoch_ps=0.02, frame_interval_ps=0.005,
                  bond_threshold=0.05, equilibration_ps=0.0, max_epochs=8, seed=0,
                  engine=EngineConfig(temperature_K=500.0, friction_per_ps=10.0, platform="CPU"))
    values.update(overrides)
    return StableConfig(**values)


def test_refine_with_a_failure_bank_steps_writes_its_files_and_resumes_to_the_same_weights(
        xtb_ethanol, pretrained_ethanol_model, tmp_path):
    model = copy.deepcopy(pretrained_ethanol_model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    refined, summary = refine(model, xtb_ethanol, _config(), tmp_path / "whole", progress=False)
    bank = summary["failure_bank"]
    assert bank["steps"] >= 2 and bank["failures"] >= 16
    assert any(not torch.equal(v, start[k]) for k, v in refined.state_dict().items())
    for name in ("model.pt", "checkpoint.pt", "bank_log.csv", "log.csv", "metrics.json", "snapshots/cycle_001.pt"):
        assert (tmp_path / "whole" / name).exists(), name
    rows = load_torch_file(tmp_path / "whole" / "checkpoint.pt")["loop"]["history"]
    stepped = [r for r in rows if r.get("restore_iterations") is not None]
    assert len(stepped) == bank["steps"]
    for r in stepped:  # the bank that made the step held its failures, and the step had its set length
        assert r["bank_failures"] >= 16 and r["step_norm"] > 0 and 0 < r["projected_grad_fraction"] <= 1
        assert r["train_force_mae_meV_per_A"] > 0 and r["failure_rate_per_ps"] > 0
    assert any(r["epoch"] > 3 for r in stepped), "the resume below would not cover a step"
    # every part of a step is timed, in the log and summed in the summary's overhead
    for r in stepped:
        assert all(r[f"time_{part}_s"] >= 0 for part in ("bank", "projection", "estimator", "force_mae", "export"))
        assert r["time_projection_s"] + r["time_estimator_s"] + r["time_export_s"] <= r["grad_time_s"]
    overhead = bank["overhead"]
    assert overhead["seconds"]["estimator"] == pytest.approx(sum(r.get("time_estimator_s", 0.0) for r in rows))
    assert overhead["fraction_of_simulation"] == pytest.approx(overhead["learning_s"] / overhead["simulation_s"])
    # Stopped after 3 epochs (a half-filled bank, a projection built before the stop), then
    # resumed to 8: the weights of the uninterrupted run. To round-off, not bit for bit: the
    # frames OpenMM's CPU platform reports after a Context checkpoint is restored differ in
    # the last float32 digits (3e-8 A), and the bank's penalties with them.
    stopped, _ = refine(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, _config(max_epochs=3),
                        tmp_path / "split", progress=False)
    resumed, _ = refine(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, _config(), tmp_path / "split",
                        resume=True, progress=False)
    moved = max(float((resumed.state_dict()[k] - v).abs().max()) for k, v in stopped.state_dict().items())
    assert moved > 1e-3  # the resumed run stepped
    for name, value in refined.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=2e-5, msg=name)


def test_training_temperature_below_the_run_temperature_is_refused(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    config = _config(bank={"training_temperature_K": 300.0})
    with pytest.raises(InputError, match="failure_bank.training_temperature_K: 300 K is below"):
        refine(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, config, tmp_path, progress=False)


def test_learning_overhead_adds_the_timed_parts_and_takes_bank_upkeep_out_of_the_simulation():
    rows = [{"sim_time_s": 10.0, "time_bank_s": 1.0, "time_validation_s": 0.5},
            {"sim_time_s": 12.0, "time_bank_s": 1.0, "time_projection_s": 2.0, "time_estimator_s": 0.5,
             "time_restore_s": 1.5, "time_export_s": 0.2, "time_validation_s": 0.5}]
    overhead = learning_overhead(rows)
    assert overhead["simulation_s"] == pytest.approx(20.0)  # 22 s of epochs, 2 s of it scoring frames
    assert overhead["learning_s"] == pytest.approx(7.2)
    assert overhead["fraction_of_simulation"] == pytest.approx(0.36)
    assert overhead["seconds"]["split_half"] == 0.0 and overhead["seconds"]["projection"] == 2.0


def test_stop_when_the_rate_over_the_start_exposure_fell_below_a_fifth():
    mode = {"steps": 1, "start_rate": 0.1, "start_exposure_ps": 100.0, "exposure_since_step": 99.0,
            "failures_since_step": 0}
    assert rate_stop_reason(mode, 0.2) is None  # not yet as many replica-ps as the start had
    mode.update(exposure_since_step=100.0, failures_since_step=3)  # 0.03/ps: not below 0.2 x 0.1
    assert rate_stop_reason(mode, 0.2) is None
    mode.update(failures_since_step=1)
    assert "below 0.2 x the start's 0.1/ps" in rate_stop_reason(mode, 0.2)
    assert rate_stop_reason({**mode, "steps": 0}, 0.2) is None  # no step yet: nothing to compare


def test_a_training_temperature_runs_the_replicas_hotter(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    trainer = FailureBankTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol,
                                 _config(bank={"training_temperature_K": 900.0}), tmp_path, progress=False)
    assert trainer.temperature_K == 900.0 and trainer.engine.config.temperature_K == 900.0
    assert trainer.config.engine.temperature_K == 500.0  # the model record keeps the evaluation temperature
    # the hinge targets come from the QM training frames, whatever the temperature
    expected = trainer.deviation.hinge_targets(trainer.train_set.positions)
    default = FailureBankTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol,
                                 _config(bank={"hinge_target": None}), tmp_path / "b", progress=False)
    torch.testing.assert_close(default.hinge.target, expected)
    assert 0.05 < float(expected.max()) < 0.6


@pytest.mark.parametrize("direction", ["random", "hr"])
def test_control_directions_step_as_far_in_the_same_subspace(xtb_ethanol, pretrained_ethanol_model, tmp_path,
                                                             direction):
    """The controls of benchmarks/README 5e: a random or an h(r) direction, projected into the
    same QM-safe subspace, and the step as long as the method's."""
    trainer = FailureBankTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol,
                                 _config(bank={"direction": direction}, observable={"name": "hr", "r_max": 6.0,
                                                                                    "n_bins": 60}),
                                 tmp_path, progress=False)
    basis = trainer.projection()
    frames = xtb_ethanol.positions[:8]
    hinge = torch.randn(sum(p.numel() for p in trainer.model.parameters()), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    chosen = trainer.step_direction(basis, basis.project(hinge), frames)
    assert chosen.norm() > 0 and not torch.allclose(chosen / chosen.norm(), basis.project(hinge) / basis.project(hinge).norm())
    rows = basis.rows.double()  # the constraint rows barely see it (the projection is damped, not exact)
    unprojected = torch.randn(chosen.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = lambda v: float((rows @ v.double()).norm() / v.norm())  # noqa: E731
    if direction == "random":
        assert seen(chosen) < 0.05 * seen(unprojected)
    if direction == "hr":  # the observable's own gradient, projected
        trainer.model.zero_grad(set_to_none=False)
        trainer.objective.backward(trainer.model, torch.as_tensor(frames, dtype=torch.float64))
        from openmm_stable.training.failure_bank import flat_grad

        raw = flat_grad(trainer.model).double()
        torch.testing.assert_close(chosen.double(), basis.project(raw), rtol=1e-5, atol=1e-9)
        assert seen(chosen) < 0.5 * seen(raw)
    with pytest.raises(InputError, match="failure_bank.direction"):
        _config(bank={"direction": "sideways"}) and FailureBankTrainer(
            copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, _config(bank={"direction": "sideways"}), tmp_path,
            progress=False)

"""Replica engine: independence of replicas, layouts, resets, model swaps, NaN containment
and the Langevin kinetic temperature. Small ethanol runs (tens to a few thousand steps)
on OpenMM's CPU platform with the session's pre-trained tiny SchNet.

Tolerances for "same trajectory" comparisons: the model runs in float32, and a batch of R
replicas sums some terms in another order than a batch of one, so two runs that should
agree drift apart like any chaotic trajectory from a ~1e-7 A seed. Over 200 steps (0.1 ps)
that stays below ~1e-6 A (measured), so 1e-4 A in positions and 1e-2 A/ps in velocities
(thermal velocities are ~10-30 A/ps) separate "the same run" from "another run" by orders
of magnitude. Quantities that only pass through NumPy are compared to 1e-9.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from openmm_stable.engine import EngineConfig, ReplicaEngine, masses_amu, maxwell_boltzmann
from openmm_stable.errors import InputError
from openmm_stable.stability import BondDeviationCriterion
from openmm_stable.units import EV_IN_KJ_PER_MOL

POS_TOL = 1e-4  # Angstrom
VEL_TOL = 1e-2  # Angstrom/ps
N_STEPS = 200  # 0.1 ps at 0.5 fs


def make_engine(model, z, n_replicas, **config) -> ReplicaEngine:
    config.setdefault("platform", "CPU")
    seed = config.pop("seed", 0)
    return ReplicaEngine(model, z, n_replicas, EngineConfig(**config), seed=seed)


@pytest.fixture(scope="module")
def starts(xtb_ethanol):
    """Four distinct dataset frames and Maxwell-Boltzmann velocities at 500 K (seed 7)."""
    positions = xtb_ethanol.positions[[0, 15, 30, 45]].copy()
    velocities = maxwell_boltzmann(masses_amu(xtb_ethanol.atomic_numbers), 500.0, len(positions), seed=7)
    return xtb_ethanol.atomic_numbers, positions, velocities


def run(model, z, positions, velocities, n_steps=N_STEPS, **config):
    engine = make_engine(model, z, len(positions), **config)
    engine.set_states(positions, velocities)
    engine.step(n_steps)
    return engine.get_states()


def assert_same_states(a, b, pos_tol=POS_TOL, vel_tol=VEL_TOL):
    (pa, va), (pb, vb) = a, b
    dp, dv = float(np.abs(pa - pb).max()), float(np.abs(va - vb).max())
    assert dp < pos_tol and dv < vel_tol, f"positions differ by {dp:.2e} A, velocities by {dv:.2e} A/ps"


# --- test models ---------------------------------------------------------------------------
class ZeroModel(nn.Module):
    """No forces at all: every atom flies on a straight line (a model that is 'unstable' by design)."""

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        n = int(batch[-1].item()) + 1
        return torch.zeros(n, dtype=pos.dtype, device=pos.device).index_add(0, batch, 0.0 * pos.sum(-1))


class ElasticNetwork(nn.Module):
    """Harmonic springs (k eV/A^2) between every pair of atoms closer than `cutoff` (A) in a
    reference structure, at their reference lengths: a molecule whose dynamics the tests
    know in advance. At 500 K a spring of 5 eV/A^2 fluctuates by sqrt(kT/k) ~ 0.09 A, so a
    bond (held by several springs) stretching by 0.5 A is a > 5-sigma event on every
    replica and step: no replica can fail the bond criterion, on any machine, and the
    highest vibration (an H on ~4 springs, period ~17 fs) is well resolved at 0.5 fs."""

    def __init__(self, positions: np.ndarray, k: float = 5.0, cutoff: float = 3.0):
        super().__init__()
        x = np.asarray(positions, dtype=np.float64)
        d0 = np.linalg.norm(x[:, None] - x[None], axis=-1)
        i, j = np.triu_indices(len(x), k=1)
        keep = d0[i, j] < cutoff
        self.n_atoms = len(x)
        self.k = float(k)
        self.register_buffer("i", torch.as_tensor(i[keep]))
        self.register_buffer("j", torch.as_tensor(j[keep]))
        self.register_buffer("r0", torch.as_tensor(d0[i[keep], j[keep]]))

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        x = pos.reshape(-1, self.n_atoms, 3)
        r = torch.linalg.norm(x[:, self.j] - x[:, self.i], dim=-1)
        return 0.5 * self.k * ((r - self.r0.to(pos.dtype)) ** 2).sum(-1)


class NaNBeyond(nn.Module):
    """The wrapped model, except that a structure with an atom farther than `radius` (A)
    from its centroid gets a NaN energy (and NaN forces): a model that breaks down on
    one replica only."""

    def __init__(self, model: nn.Module, radius: float):
        super().__init__()
        self.model = model
        self.radius = radius

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        energy = self.model(z, pos, batch, box)
        n = energy.shape[0]
        counts = torch.zeros(n, dtype=pos.dtype, device=pos.device).index_add(0, batch, torch.ones_like(pos[:, 0]))
        centroid = torch.zeros(n, 3, dtype=pos.dtype, device=pos.device).index_add(0, batch, pos) / counts[:, None]
        far = (torch.linalg.norm(pos - centroid[batch], dim=-1) > self.radius).to(pos.dtype)
        bad = torch.zeros(n, dtype=pos.dtype, device=pos.device).index_add(0, batch, far) > 0
        factor = torch.where(bad, torch.full_like(energy, float("nan")), torch.ones_like(energy))
        return energy * factor


# --- configuration and velocities ------------------------------------------------------------
def test_engine_config_and_construction_errors(ethanol):
    z, _ = ethanol
    with pytest.raises(ValueError, match="integrator"):
        EngineConfig(integrator="verlet")
    with pytest.raises(ValueError, match="layout"):
        EngineConfig(layout="sharded")
    with pytest.raises(ValueError, match="positive"):
        EngineConfig(temperature_K=0.0)
    with pytest.raises(ValueError, match="n_replicas"):
        ReplicaEngine(ZeroModel(), z, 0, EngineConfig(platform="CPU"))


def test_maxwell_boltzmann_per_replica_streams(ethanol):
    z, _ = ethanol
    masses = masses_amu(z)
    few = maxwell_boltzmann(masses, 500.0, 3, seed=11)
    many = maxwell_boltzmann(masses, 500.0, 2000, seed=11)
    # replica k's velocities do not depend on how many replicas are drawn beside it
    np.testing.assert_array_equal(few, many[:3])
    assert not np.allclose(few, maxwell_boltzmann(masses, 500.0, 3, seed=12))
    # no centre-of-mass drift; 3N - 3 thermal degrees of freedom left
    momentum = (masses[None, :, None] * many).sum(axis=1)
    assert np.abs(momentum).max() < 1e-9
    engine = make_engine(ZeroModel(), z, 1)
    temps = engine.kinetic_temperature(many)  # (2000,), each with relative spread sqrt(2 / 24)
    expected = 500.0 * (3 * len(z) - 3) / (3 * len(z))
    assert abs(temps.mean() - expected) < 4 * expected * math.sqrt(2 / 24 / temps.size)


# --- replica independence and layouts (Nose-Hoover: deterministic) -----------------------------
def test_replica_alone_matches_replica_in_batch(pretrained_ethanol_model, starts):
    z, pos, vel = starts
    together = run(pretrained_ethanol_model, z, pos, vel, integrator="nose-hoover")
    for k in (0, 2):
        alone = run(pretrained_ethanol_model, z, pos[k:k + 1], vel[k:k + 1], integrator="nose-hoover")
        assert_same_states((together[0][k:k + 1], together[1][k:k + 1]), alone)
    moved = np.abs(together[0] - pos).max()
    assert moved > 100 * POS_TOL  # the comparison is not trivially passed by atoms at rest


def test_per_replica_layout_matches_batched(pretrained_ethanol_model, starts):
    z, pos, vel = starts
    batched = run(pretrained_ethanol_model, z, pos, vel, integrator="nose-hoover", layout="batched")
    separate = run(pretrained_ethanol_model, z, pos, vel, integrator="nose-hoover", layout="per-replica")
    assert_same_states(batched, separate)


def test_set_states_restarts_nose_hoover_thermostats(pretrained_ethanol_model, starts):
    """A run after set_states must not depend on what the engine ran before (the
    thermostat chains live in the Context and have to go back to rest too)."""
    z, pos, vel = starts
    engine = make_engine(pretrained_ethanol_model, z, len(pos), integrator="nose-hoover")
    engine.set_states(pos, vel)
    engine.step(N_STEPS)
    engine.set_states(pos, vel)
    engine.step(N_STEPS)
    fresh = run(pretrained_ethanol_model, z, pos, vel, integrator="nose-hoover")
    assert_same_states(engine.get_states(), fresh)


def test_langevin_seeded(pretrained_ethanol_model, starts):
    z, pos, vel = starts
    a = run(pretrained_ethanol_model, z, pos[:2], vel[:2], n_steps=50, seed=3)
    b = run(pretrained_ethanol_model, z, pos[:2], vel[:2], n_steps=50, seed=3)
    c = run(pretrained_ethanol_model, z, pos[:2], vel[:2], n_steps=50, seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    assert np.abs(a[0] - c[0]).max() > 100 * POS_TOL


@pytest.mark.parametrize("integrator", ["langevin", "nose-hoover"])
def test_checkpoint_resumes_exactly(pretrained_ethanol_model, starts, integrator):
    """A run continued from `checkpoint()` in a NEW engine is the uninterrupted run (to
    float32 round-off, ~5e-8 A: the checkpoint holds positions the Context rounds on
    loading): OpenMM's Context checkpoint carries the Langevin random state and the chains."""
    z, pos, vel = starts
    whole = make_engine(pretrained_ethanol_model, z, 2, integrator=integrator, seed=5)
    whole.set_states(pos[:2], vel[:2])
    whole.step(40)
    first = make_engine(pretrained_ethanol_model, z, 2, integrator=integrator, seed=5)
    first.set_states(pos[:2], vel[:2])
    first.step(20)
    saved = first.checkpoint()
    resumed = make_engine(pretrained_ethanol_model, z, 2, integrator=integrator, seed=5)
    resumed.restore_checkpoint(saved)
    resumed.step(20)
    assert_same_states(resumed.get_states(), whole.get_states())
    if integrator == "langevin":  # positions + velocities alone do not continue the same run
        restarted = make_engine(pretrained_ethanol_model, z, 2, integrator=integrator, seed=5)
        restarted.set_states(*first.get_states())
        restarted.step(20)
        assert np.abs(restarted.get_states()[0] - whole.get_states()[0]).max() > 100 * POS_TOL
    with pytest.raises(InputError, match="Contexts"):
        resumed.restore_checkpoint(saved * 2)


# --- reset, model swap, shapes ---------------------------------------------------------------
@pytest.mark.parametrize("integrator,layout", [("nose-hoover", "batched"), ("langevin", "batched"),
                                               ("nose-hoover", "per-replica")])
def test_reset_replicas_leaves_others_untouched(pretrained_ethanol_model, starts, integrator, layout):
    z, pos, vel = starts
    half = N_STEPS // 2
    reference = make_engine(pretrained_ethanol_model, z, len(pos), integrator=integrator, layout=layout)
    engine = make_engine(pretrained_ethanol_model, z, len(pos), integrator=integrator, layout=layout)
    for e in (reference, engine):
        e.set_states(pos, vel)
        e.step(half)
    before_pos, before_vel = engine.get_states()
    engine.reset_replicas([1], pos[3:4], vel[3:4])
    after_pos, after_vel = engine.get_states()
    others = [0, 2, 3]
    np.testing.assert_allclose(after_pos[others], before_pos[others], rtol=0, atol=1e-9)
    np.testing.assert_allclose(after_vel[others], before_vel[others], rtol=0, atol=1e-9)
    np.testing.assert_allclose(after_pos[1], pos[3], rtol=0, atol=1e-9)
    np.testing.assert_allclose(after_vel[1], vel[3], rtol=0, atol=1e-9)
    # and the others' futures are those of a run without the reset
    for e in (reference, engine):
        e.step(half)
    (p_ref, v_ref), (p, v) = reference.get_states(), engine.get_states()
    assert_same_states((p[others], v[others]), (p_ref[others], v_ref[others]))


def test_reset_replicas_default_velocities(pretrained_ethanol_model, starts):
    z, pos, vel = starts
    engine = make_engine(pretrained_ethanol_model, z, len(pos))
    engine.set_states(pos, vel)
    engine.reset_replicas([2, 0], pos[[1, 3]], seed=5)
    p, v = engine.get_states()
    expected = maxwell_boltzmann(engine.masses, 500.0, 2, seed=5)
    np.testing.assert_allclose(v[[2, 0]], expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(p[[2, 0]], pos[[1, 3]], rtol=0, atol=1e-9)
    engine.reset_replicas([], np.empty((0, len(z), 3)))  # nothing to do


def _energy_kj(model, z, positions) -> float:
    """Total energy (kJ/mol) of the replicas, straight from the model in float64."""
    model = copy.deepcopy(model).double()
    R, N = positions.shape[:2]
    zz = torch.as_tensor(np.tile(z, R))
    batch = torch.arange(R).repeat_interleave(N)
    with torch.no_grad():
        return float(model(zz, torch.as_tensor(positions.reshape(-1, 3)), batch).sum()) * EV_IN_KJ_PER_MOL


@pytest.mark.parametrize("integrator", ["nose-hoover", "langevin"])
def test_update_model_keeps_state_and_uses_new_weights(pretrained_ethanol_model, starts, integrator):
    z, pos, vel = starts
    half = N_STEPS // 2
    reference = make_engine(pretrained_ethanol_model, z, len(pos), integrator=integrator)
    engine = make_engine(pretrained_ethanol_model, z, len(pos), integrator=integrator)
    for e in (reference, engine):
        e.set_states(pos, vel)
        e.step(half)
    before = engine.get_states()
    # same weights: state and (thermostat or noise) stream carry on as if nothing happened
    engine.update_model(pretrained_ethanol_model)
    after = engine.get_states()
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(after[1], before[1], rtol=0, atol=1e-9)
    for e in (reference, engine):
        e.step(half)
    assert_same_states(engine.get_states(), reference.get_states())
    # new weights: positions kept, energies now those of the new model
    changed = copy.deepcopy(pretrained_ethanol_model)
    with torch.no_grad():
        for p in changed.net.parameters():
            p.mul_(0.8)
    positions, velocities = engine.get_states()
    old_energy = float(engine.potential_energies().sum())
    engine.update_model(changed)
    p2, v2 = engine.get_states()
    np.testing.assert_allclose(p2, positions, rtol=0, atol=1e-9)
    np.testing.assert_allclose(v2, velocities, rtol=0, atol=1e-9)
    new_energy = float(engine.potential_energies().sum())
    assert old_energy == pytest.approx(_energy_kj(pretrained_ethanol_model, z, positions), abs=0.05)
    assert new_energy == pytest.approx(_energy_kj(changed, z, positions), abs=0.05)
    assert abs(new_energy - old_energy) > 1.0


def test_set_states_shape_errors(ethanol):
    z, x = ethanol
    engine = make_engine(ZeroModel(), z, 2)
    good = np.stack([x, x])
    for bad in (x, good[:1], np.concatenate([good, good[:, :1]], axis=1), good[..., :2]):
        with pytest.raises(ValueError, match=r"positions: shape .*expected \(2, 9, 3\)"):
            engine.set_states(bad)
    with pytest.raises(ValueError, match=r"velocities: shape \(1, 9, 3\), expected \(2, 9, 3\)"):
        engine.set_states(good, velocities=good[:1])
    engine.set_states(good)  # and the right shape works


# --- broken replicas are contained -------------------------------------------------------------
def test_nan_replica_is_contained_and_others_run_on(starts):
    """One replica on which the model returns NaN (an atom pulled 20 A away) neither stops
    the run nor changes the other replicas' trajectories; the bond criterion flags it and
    only it (the model is an elastic network: the other replicas cannot break)."""
    z, pos, vel = starts
    model = NaNBeyond(ElasticNetwork(pos[0]), radius=8.0)
    broken = pos.copy()
    broken[1, 8] += np.array([20.0, 0.0, 0.0])  # the hydroxyl H, far away
    engine = make_engine(model, z, len(pos), integrator="nose-hoover")
    engine.set_states(broken, vel)
    engine.step(N_STEPS)
    p, v = engine.get_states()
    assert np.isfinite(p).all() and np.isfinite(v).all()
    assert np.isfinite(engine.potential_energies()).all()
    good = [0, 2, 3]
    without = run(model, z, pos[good], vel[good], integrator="nose-hoover")
    assert_same_states((p[good], v[good]), without)
    criterion = BondDeviationCriterion.from_structures(z, pos)
    flags = criterion.unstable(criterion(p)).numpy()
    np.testing.assert_array_equal(flags, [False, True, False, False])


def test_zero_model_flies_ballistically(ethanol):
    """Without forces and friction, positions move on straight lines: x(t) = x0 + v0 t."""
    z, x = ethanol
    pos = np.stack([x, x + 0.1])
    engine = make_engine(ZeroModel(), z, 2, friction_per_ps=0.0)
    engine.set_states(pos, seed=2)
    _, v0 = engine.get_states()
    engine.step(40)
    p, v = engine.get_states()
    np.testing.assert_allclose(v, v0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(p, pos + v0 * 40 * engine.config.timestep_ps, rtol=0, atol=1e-5)
    assert engine.time_ps == pytest.approx(0.02)


# --- Langevin samples the right kinetic temperature -------------------------------------------
def test_langevin_kinetic_temperature(xtb_ethanol):
    """<T_kin> = 500 K within statistical error, all 3N degrees of freedom thermal.

    The model is an elastic network (`ElasticNetwork`): the test is about the engine's
    sampling, not about how well a crude learned model conserves energy (a 5-second SchNet
    came out 10-25 % high in the variance below, by an amount that depends on its
    trajectories), and no replica can fall apart. Each frame's T_kin of one replica has
    relative variance 2/(3N) = 2/27 (chi-square with 3N = 27 degrees of freedom). A strongly
    coupled thermostat (friction 50/ps) decorrelates T_kin fast: we count one independent
    sample per 40 fs (twice 1/friction). 16 replicas x 1 ps -> 400 samples -> standard
    error 500 K * sqrt(2/27) / sqrt(400) = 6.8 K; the tolerance is 4 standard errors (27 K,
    5.4 %), so 3N - 3 degrees of freedom (an 11 % shortfall) would fail it. Over 30 seeds
    the mean scattered by 4.3 K (so the count of independent samples is conservative) and
    the variance ratio below by 0.043 around 0.99.
    """
    R, T0, friction = 16, 500.0, 50.0
    z = xtb_ethanol.atomic_numbers
    engine = make_engine(ElasticNetwork(xtb_ethanol.positions[0]), z, R, temperature_K=T0, friction_per_ps=friction,
                         seed=1)
    engine.set_states(xtb_ethanol.positions[np.arange(R) * 3 + 1], seed=1)
    engine.step(200)  # 0.1 ps = 5 velocity relaxation times
    every, n_frames = 20, 100  # a frame every 10 fs for 1 ps
    temps = []
    for _ in range(n_frames):
        engine.step(every)
        _, v = engine.get_states()
        temps.append(engine.kinetic_temperature(v))
    temps = np.array(temps)  # (frames, R)

    dof = 3 * len(z)
    sampled_ps = n_frames * every * engine.config.timestep_ps
    n_independent = R * sampled_ps / 0.040
    stderr = T0 * math.sqrt(2 / dof / n_independent)
    mean = temps.mean()
    rel_var = (temps / T0 - 1).var()
    print(f"kinetic temperature {mean:.1f} K +- {stderr:.1f} K (target {T0} K); "
          f"per-frame relative variance {rel_var:.4f} (2/3N = {2 / dof:.4f})")
    assert abs(mean - T0) < 4 * stderr
    # Per-frame fluctuations: relative variance 2/(3N); the bound is > 4 standard deviations
    # of the 30-seed scatter on either side.
    assert 0.8 < rel_var / (2 / dof) < 1.2

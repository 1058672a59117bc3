"""The distributed engine on a local two-worker Ray cluster (two cores): same trajectories as
one process, a refinement that takes the same learning steps even with workers killed
mid-epoch, clear start errors, parallel xTB chains in one file, and the benchmark's quick mode.

Each worker is a process that imports torch and OpenMM (a few seconds); the tests share one
cluster and, where they can, one engine. Tolerances as in tests/test_engine.py: two workers
hold the replicas in two Contexts of two replicas each, and a batch of two sums some terms
in another order than a batch of four, so "the same run" agrees to ~1e-7 A after 0.1 ps;
1e-4 A and 1e-2 A/ps separate that from another run by orders of magnitude.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from openmm_stable.cli import main
from openmm_stable.data import load_dataset
from openmm_stable.distributed import DistributedReplicaEngine, WorkerLostError, connect
from openmm_stable.distributed import engine as distributed_engine
from openmm_stable.distributed.generate import chain_path, chain_seed
from openmm_stable.engine import EngineConfig, ReplicaEngine, masses_amu, maxwell_boltzmann
from openmm_stable.engines import create_engine
from openmm_stable.errors import InputError
from openmm_stable.stability import make_criterion
from openmm_stable.training.stable import StableConfig, StableTrainer

POS_TOL = 1e-4  # Angstrom
VEL_TOL = 1e-2  # Angstrom/ps
NOSE_HOOVER = EngineConfig(temperature_K=500.0, integrator="nose-hoover", platform="CPU")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with this machine's two cores, for the whole module."""
    ray = connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def starts(xtb_ethanol):
    """Four distinct dataset frames and Maxwell-Boltzmann velocities at 500 K (seed 7)."""
    positions = xtb_ethanol.positions[[0, 15, 30, 45]].copy()
    velocities = maxwell_boltzmann(masses_amu(xtb_ethanol.atomic_numbers), 500.0, len(positions), seed=7)
    return xtb_ethanol.atomic_numbers, positions, velocities


@pytest.fixture
def two_workers(cluster, pretrained_ethanol_model, starts):
    """Four replicas on two workers (replicas 0-1 and 2-3), Nose-Hoover; a new engine for
    each test (the kill test leaves its engine spent), closed after it, so no test depends
    on the order the others ran in."""
    z, _, _ = starts
    engine = create_engine(pretrained_ethanol_model, z, 4, dataclasses.replace(NOSE_HOOVER, workers=2))
    yield engine
    engine.close()


def assert_same_states(a, b):
    (pa, va), (pb, vb) = a, b
    dp, dv = float(np.abs(pa - pb).max()), float(np.abs(va - vb).max())
    assert dp < POS_TOL and dv < VEL_TOL, f"positions differ by {dp:.2e} A, velocities by {dv:.2e} A/ps"


def perturbed(model: nn.Module, scale: float = 0.02, seed: int = 0) -> nn.Module:
    """A copy of `model` with every weight moved a little (another model, same architecture)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype) * p.abs().mean())
    return out


def run_frames(engine, criterion, n_frames=3, steps=50, reset_at: Optional[int] = None, hook=None):
    """`run_checked` for `n_frames`; at frame `reset_at` replicas 1 and 2 (one per worker)
    restart from replica 0's current positions with velocities of seed 9. `hook(frame)`
    runs first (e.g. to kill a worker). Returns the frames' (positions, velocities, flags)."""
    frames = []

    def on_frame(frame):
        if hook is not None:
            hook(frame)
        frames.append((frame.positions, frame.velocities, frame.unstable, frame.deviations))
        if frame.index == reset_at:
            engine.reset_replicas([1, 2], frame.positions[[0, 0]], seed=9)

    engine.run_checked(n_frames, steps, criterion, on_frame)
    return frames


# --- same trajectories -----------------------------------------------------------------------------
def test_two_workers_follow_the_one_process_trajectories(two_workers, pretrained_ethanol_model, starts, xtb_ethanol):
    """Replica k's Nose-Hoover trajectory is the same on 2 workers as in one process: after
    plain steps, with velocities drawn per replica, through `run_checked` with resets from the
    frame callback, and after a model update."""
    z, pos, vel = starts
    local = ReplicaEngine(pretrained_ethanol_model, z, 4, NOSE_HOOVER)
    assert two_workers.n_replicas == 4 and two_workers.n_atoms == len(z) and two_workers.workers == 2
    assert two_workers.platform_name == "CPU" and [i["replicas"] for i in two_workers.worker_info] == [2, 2]
    for engine in (local, two_workers):
        engine.set_states(pos, vel)
        engine.step(200)
    assert_same_states(local.get_states(), two_workers.get_states())
    arrays = 2 * 4 * len(z) * 3 * 8  # positions and velocities, float64; then the thermostat chains
    assert arrays < two_workers.last_gather_bytes < arrays + 4 * 2000

    for engine in (local, two_workers):  # drawn velocities: replica k's stream, whatever the split
        engine.set_states(pos, seed=5)
    np.testing.assert_array_equal(local.get_states()[1], two_workers.get_states()[1])

    criterion = make_criterion(xtb_ethanol, "bonds", 0.3, 1.2)
    expected = run_frames(local, criterion, reset_at=1)
    got = run_frames(two_workers, criterion, reset_at=1)
    for (pa, va, fa, da), (pb, vb, fb, db) in zip(expected, got):
        assert_same_states((pa, va), (pb, vb))
        np.testing.assert_array_equal(fa, fb)
        np.testing.assert_allclose(da, db, atol=POS_TOL)

    series = {}  # velocities every 10 steps within the frames (simulate's VACF), in time order
    for name, engine in (("local", local), ("two", two_workers)):
        series[name] = []
        engine.run_checked(2, 50, criterion, lambda frame: None, velocity_steps=10,
                           on_velocities=series[name].append)
    assert len(series["two"]) == len(series["local"]) == 10
    for a, b in zip(series["local"], series["two"]):
        assert float(np.abs(a - b).max()) < VEL_TOL

    new_model = perturbed(pretrained_ethanol_model)
    for engine in (local, two_workers):
        engine.update_model(new_model)
        engine.step(100)
    after = local.get_states()
    assert_same_states(after, two_workers.get_states())
    assert two_workers.steps_done == local.steps_done == 550 and two_workers.time_ps == pytest.approx(local.time_ps)
    energies = two_workers.potential_energies()  # one per worker's Context
    assert energies.shape == (2,) and energies.sum() == pytest.approx(float(local.potential_energies().sum()),
                                                                      rel=1e-5)
    np.testing.assert_allclose(two_workers.kinetic_temperature(after[1]), local.kinetic_temperature(after[1]))
    with pytest.raises(InputError, match="expected \\(4, 9, 3\\)"):
        two_workers.set_states(pos[:3])


# --- faults ------------------------------------------------------------------------------------------
def _kill(pid: int) -> None:
    """kill -9, and wait until the process is gone."""
    os.kill(pid, signal.SIGKILL)
    for _ in range(600):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} survived kill -9")


def test_a_killed_worker_is_replaced_and_the_run_goes_on_unchanged(two_workers, pretrained_ethanol_model, starts,
                                                                   xtb_ethanol, monkeypatch):
    """kill -9 of a worker in the middle of `run_checked`, just before the frame callback
    resets one of its replicas, and of the other worker a frame later: the engine starts
    new workers, restores them to the last frame (thermostat chains and model update
    included) and the Nose-Hoover run goes on as if nothing had happened. When a worker's
    restarts are used up the run stops with a message that says how to continue."""
    z, pos, vel = starts
    new_model = perturbed(pretrained_ethanol_model, seed=1)
    local = ReplicaEngine(new_model, z, 4, NOSE_HOOVER)
    criterion = make_criterion(xtb_ethanol, "bonds", 0.3, 1.2)
    two_workers.update_model(new_model)
    for engine in (local, two_workers):
        engine.set_states(pos, vel)
        engine.step(60)  # thermostat chains away from rest: a restore must bring them back
    expected = run_frames(local, criterion, n_frames=4, reset_at=1)
    pids = two_workers.worker_pids()
    restarts = two_workers.restarts

    def kill_during(frame):
        if frame.index in (1, 2):
            _kill(pids[2 - frame.index])  # worker 1 at frame 1, worker 0 at frame 2

    got = run_frames(two_workers, criterion, n_frames=4, reset_at=1, hook=kill_during)
    assert two_workers.restarts == restarts + 2
    assert not set(two_workers.worker_pids()) & set(pids)
    for (pa, va, fa, _), (pb, vb, fb, _) in zip(expected, got):
        assert_same_states((pa, va), (pb, vb))
        np.testing.assert_array_equal(fa, fb)

    monkeypatch.setattr(distributed_engine, "MAX_RESTARTS", 1)  # worker 1 has had its one restart
    _kill(two_workers.worker_pids()[1])
    with pytest.raises(WorkerLostError, match="worker 1 \\(replicas 2-3\\) died .*refine ... --resume"):
        two_workers.step(10)


def test_a_worker_that_does_not_answer_in_time_stops_the_run_with_its_name(cluster, pretrained_ethanol_model,
                                                                           starts):
    """A hung worker used to block the driver for ever (`ray.get` without a timeout): every
    call now waits at most `call_timeout_s`. Here one worker is busy with 20,000 steps (many
    seconds) when the engine allows 0.05 s per call."""
    z, pos, vel = starts
    engine = DistributedReplicaEngine(pretrained_ethanol_model, z, 2, dataclasses.replace(NOSE_HOOVER, workers=1))
    try:
        assert engine.call_timeout_s == distributed_engine.CALL_TIMEOUT_S
        engine.set_states(pos[:2], vel[:2])
        engine.call_timeout_s = 0.05
        t0 = time.perf_counter()
        with pytest.raises(distributed_engine.WorkerTimeoutError,
                           match=r"worker 0 \(replicas 0-1\) did not answer the call 'step' within 0.05 s"):
            engine.step(20_000)
        assert time.perf_counter() - t0 < 30.0
    finally:
        engine.close()
    with pytest.raises(InputError, match="call_timeout_s must be positive"):
        DistributedReplicaEngine(pretrained_ethanol_model, z, 2, dataclasses.replace(NOSE_HOOVER, workers=1),
                                 call_timeout_s=0)


class UnusableModel(nn.Module):
    """A model no worker can use: its code lives in this test module, which the worker
    processes cannot import (as a model whose code is not installed on a node); and were it
    importable (pytest started from tests/), TorchScript could not compile it (`box` lacks
    its Optional annotation)."""

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, box=None) -> Tensor:
        return torch.zeros(int(batch[-1]) + 1, dtype=pos.dtype).index_add(0, batch, (pos ** 2).sum(-1))


def test_a_worker_that_cannot_start_is_a_clear_error_before_any_step(cluster, pretrained_ethanol_model, starts):
    z, _, _ = starts
    free = cluster.available_resources().get("CPU", 0)
    if cluster.cluster_resources().get("GPU", 0) < 2:  # no GPU for a CUDA worker: refused before any starts
        with pytest.raises(InputError, match="platform CUDA with 2 workers needs 2 GPUs; the Ray cluster has 0"):
            create_engine(pretrained_ethanol_model, z, 4, dataclasses.replace(NOSE_HOOVER, platform="CUDA", workers=2))
    with pytest.raises(InputError, match="worker 0 \\(replicas 0-1, platform CPU\\) on .* could not start: "
                                         "(.*No module named 'test_distributed'|RuntimeError)"):
        DistributedReplicaEngine(UnusableModel(), z, 4, dataclasses.replace(NOSE_HOOVER, workers=2))
    with pytest.raises(InputError, match="3 workers for 2 replicas"):
        create_engine(pretrained_ethanol_model, z, 2, dataclasses.replace(NOSE_HOOVER, workers=3))
    # The failed engine's workers are gone: their cores are free again. (At least as many
    # as at the start: an earlier test's workers may still have been going away then.)
    for _ in range(200):
        if cluster.available_resources().get("CPU", 0) >= free:
            break
        time.sleep(0.1)
    assert cluster.available_resources().get("CPU", 0) >= free


# --- refine --------------------------------------------------------------------------------------------
class KillingCriterion:
    """The trainer's criterion, which also kill -9s a worker at given calls (one call per
    frame): a fault in the middle of an epoch, wherever the loop is."""

    def __init__(self, criterion, engine, kills: dict[int, int]):
        self.criterion, self.engine, self.kills, self.calls = criterion, engine, kills, 0

    def __call__(self, positions):
        self.calls += 1
        if self.calls in self.kills:
            _kill(self.engine.worker_pids()[self.kills[self.calls]])
        return self.criterion(positions)

    def unstable(self, deviations):
        return self.criterion.unstable(deviations)


def test_refine_on_two_workers_takes_the_same_learning_steps_with_a_worker_killed_mid_epoch(
        cluster, xtb_ethanol, pretrained_ethanol_model, tmp_path):
    """Three epochs (simulation, then two learning steps), Nose-Hoover, plain SGD: on two
    workers, with worker 1 killed in the middle of the third epoch (after a weight update),
    the log and the weights equal the one-process run.

    Tolerances: these steps come from a 0.02 A threshold and a sharp observable, so the
    gradient amplifies frame differences; the per-replica layout against the batched one
    (measured, same run) differs by up to 1e-5 in the gradient norm and by 1e-4 of the step
    in the weights. 1e-4 and 1e-3 leave room; another run differs at order one."""
    config = StableConfig(n_replicas=4, epoch_ps=0.05, frame_interval_ps=0.01, equilibration_ps=0.02, max_epochs=3,
                          learning_epochs=10, bond_threshold=0.02, unstable_fraction=0.1, optimizer="sgd", lr=1e-3,
                          seed=0, observable={"name": "bond_lengths"}, energy_force_weight=1.0, engine=NOSE_HOOVER)
    runs = {}
    for workers in (1, 2):
        cfg = dataclasses.replace(config, engine=dataclasses.replace(NOSE_HOOVER, workers=workers))
        trainer = StableTrainer(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, cfg, tmp_path / str(workers),
                                progress=False)
        if workers == 2:
            assert isinstance(trainer.engine, DistributedReplicaEngine)
            trainer.criterion = KillingCriterion(trainer.criterion, trainer.engine, {13: 1})
        try:
            trainer.fit()
        finally:
            if workers == 2:
                trainer.engine.close()  # its cores are free for the tests below
        runs[workers] = trainer
    one, two = runs[1], runs[2]
    assert two.engine.restarts == 1 and two.criterion.calls == 15
    assert [r["phase"] for r in two.state.history] == ["simulation", "learning", "learning"]
    for a, b in zip(one.state.history, two.state.history):
        for key in ("unstable_fraction", "observable_loss", "grad_norm", "observable_grad_norm", "n_samples"):
            if a.get(key) is None:
                assert b.get(key) is None, (key, a["epoch"])
            else:
                assert b.get(key) == pytest.approx(a[key], rel=1e-4), (key, a["epoch"])
    start = [p.detach() for p in pretrained_ethanol_model.parameters()]
    first, second = [p.detach() for p in one.model.parameters()], [p.detach() for p in two.model.parameters()]
    step = max(float((p1 - p0).abs().max()) for p1, p0 in zip(first, start))
    apart = max(float((p1 - p2).abs().max()) for p1, p2 in zip(first, second))
    assert step > 1e-6 and apart < 1e-3 * step, (apart, step)


# --- command line -------------------------------------------------------------------------------------
def test_workers_and_ray_address_flags_and_yaml(tmp_path):
    """`--workers`/`--ray-address` reach `EngineConfig` on simulate and refine; flags over YAML over defaults."""
    from openmm_stable.cli import build_parser
    from openmm_stable.cli.simulate import config_from_args

    parser = build_parser()
    yaml_file = tmp_path / "sim.yaml"
    yaml_file.write_text("engine: {workers: 3}\n")
    base = ["simulate", "m.pt", "--data", "d.npz", "--out", str(tmp_path)]
    assert config_from_args(parser.parse_args(base)).engine.workers == 1
    assert config_from_args(parser.parse_args([*base, "--config", str(yaml_file)])).engine.workers == 3
    flagged = config_from_args(parser.parse_args([*base, "--config", str(yaml_file), "--workers", "2",
                                                  "--ray-address", "10.0.0.1:6379"]))
    assert flagged.engine.workers == 2 and flagged.engine.ray_address == "10.0.0.1:6379"
    refine_args = parser.parse_args(["refine", "m.pt", "--data", "d.npz", "--out", "o", "--workers", "4"])
    assert refine_args.workers == 4 and refine_args.ray_address is None
    with pytest.raises(InputError, match="workers must be >= 1"):
        EngineConfig(workers=0)


# --- xTB chains -------------------------------------------------------------------------------------------
FAST_XTB = ["--molecule", "ethanol", "--stride", "2", "--equilibration-steps", "10", "--seed", "3", "--no-progress"]


def test_data_generate_on_two_workers_writes_one_resumable_file(cluster, tmp_path):
    """Two chains, one file: chain 0 is the one-worker run with the same seed, chain 1 has
    its own seed; an interrupted chain is resumed from its frames with --resume."""
    from openmm_stable.data.generate import generate_xtb_dataset

    out = tmp_path / "ethanol.npz"
    stopped = RuntimeError("stop")

    def stop_after_two(k, frame):
        if k == 1:
            raise stopped

    with pytest.raises(RuntimeError, match="stop"):  # chain 1 of 2 interrupted after 2 of its 3 frames
        generate_xtb_dataset("ethanol", chain_path(out, 1, 2), 3, stride=2, equilibration_steps=10,
                             seed=chain_seed(3, 1), progress=False, on_frame=stop_after_two)
    interrupted = load_dataset(chain_path(out, 1, 2))
    assert len(interrupted) == 2 and interrupted.metadata["complete"] is False
    assert main(["data", "generate", *FAST_XTB, "--frames", "6", "--workers", "2", "--out", str(out)]) == 2

    assert main(["data", "generate", *FAST_XTB, "--frames", "6", "--workers", "2", "--out", str(out),
                 "--resume"]) == 0
    ds = load_dataset(out)
    assert len(ds) == 6 and ds.metadata["complete"] is True
    chains = ds.metadata["chains"]
    assert [(c["seed"], c["frames"], c["first_frame"]) for c in chains] == [(3, 3, 0), (chain_seed(3, 1), 3, 3)]
    assert [c["resumed"] for c in chains] == [False, True]
    np.testing.assert_allclose(ds.positions[3:5], interrupted.positions, atol=1e-7)  # kept, not redone
    single = generate_xtb_dataset("ethanol", tmp_path / "single.npz", 3, stride=2, equilibration_steps=10, seed=3,
                                  progress=False)
    np.testing.assert_allclose(ds.positions[:3], single.positions, atol=1e-8)
    np.testing.assert_allclose(ds.energies[:3], single.energies, atol=1e-8)
    assert not np.allclose(ds.positions[3:], single.positions)  # chain 1 is another trajectory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ethanol.npz", "single.npz"]  # chain files removed


# --- benchmark ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_distributed_benchmark_quick(tmp_path):
    """benchmarks/distributed.py --quick runs (its own Ray cluster, in a subprocess) and
    reports finite, positive rates, overheads and a cost model (not the targets: far too
    short to be meaningful timings)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENMM_CPU_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "distributed.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "distributed_quick.json").read_text())
    rates = {r["name"]: r["replica_steps_per_s"] for r in payload["throughput"]}
    assert set(rates) == {"one process, 1 thread", "one process, 2 threads", "1 worker", "2 workers"}
    assert all(np.isfinite(v) and v > 0 for v in rates.values())
    for key in ("2 workers / 1 worker", "1 worker / one process (1 thread)", "2 workers / one process (2 threads)"):
        assert np.isfinite(payload["ratios"][key]) and payload["ratios"][key] > 0
    for row in payload["overhead"]:
        assert row["gather_bytes"] > 0 and row["broadcast_bytes"] > 0 and row["gather_ms"] > 0
    rows = payload["cost_model"]["rows"]
    assert {(r["layout"], r["replicas"]) for r in rows} == {(layout, n) for n in (128, 1024) for layout in
                                                           ("1 GPU", "8 GPUs, 1 node", "4 nodes x 8 GPUs")}
    for row in rows:  # one GPU is one process: nothing to communicate
        assert (row["communication_fraction"] == 0) if row["gpus"] == 1 else (0 < row["communication_fraction"] < 1)
        assert row["epoch_s"] > 0 and row["speedup_vs_1_gpu"] > 0
    assert "2 workers / 1 worker" in proc.stdout

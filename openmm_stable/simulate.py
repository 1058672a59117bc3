"""`simulate`: how long does a model stay stable, and how good are its observables?

Runs R replicas with the `ReplicaEngine`, checks the bond-length criterion every
``check_interval_ps``, records each replica's time of first instability, and compares
h(r) over the stable parts of the trajectories with the (reweighted) reference.
A replica that fails is reset to its starting frame and counted as failed from then on
(frozen): it cannot disturb the others, which run on.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from openmm_stable.data.dataset import QMDataset
from openmm_stable.engine import EngineConfig, ReplicaEngine
from openmm_stable.observables import HrObservable, reference_from_dataset
from openmm_stable.stability import EVALUATION_BOND_THRESHOLD, BondDeviationCriterion, first_instability_time


@dataclasses.dataclass
class SimulationConfig:
    n_replicas: int = 16
    time_ps: float = 10.0
    check_interval_ps: float = 0.1  # bond check and frame saving interval
    bond_threshold: float = EVALUATION_BOND_THRESHOLD
    hr_r_max: float = 10.0
    hr_bins: int = 200
    seed: int = 0
    write_trajectories: bool = False
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**self.engine)
        if self.n_replicas < 1 or self.time_ps <= 0 or self.check_interval_ps <= 0:
            raise ValueError("n_replicas, time_ps and check_interval_ps must be positive")

    @property
    def steps_per_check(self) -> int:
        return max(1, round(self.check_interval_ps / self.engine.timestep_ps))

    @property
    def n_checks(self) -> int:
        return max(1, round(self.time_ps / (self.steps_per_check * self.engine.timestep_ps)))


@dataclasses.dataclass
class SimulationResult:
    times_ps: np.ndarray  # (T,)
    positions: np.ndarray  # (T, R, N, 3) Angstrom, float32
    deviations: np.ndarray  # (T, R) largest bond deviation (A)
    stable_time_ps: np.ndarray  # (R,)
    stable_mask: np.ndarray  # (T, R) True while the replica had not failed yet
    replica_steps_per_s: float
    wall_time_s: float
    platform: str


def initial_frames(dataset: QMDataset, n_replicas: int, seed: int) -> np.ndarray:
    """Indices of distinct starting frames (repeats only if the dataset is smaller)."""
    rng = np.random.default_rng(seed)
    return rng.choice(len(dataset), size=n_replicas, replace=len(dataset) < n_replicas)


def run_replicas(model: nn.Module, dataset: QMDataset, config: SimulationConfig,
                 criterion: Optional[BondDeviationCriterion] = None, progress: bool = True) -> SimulationResult:
    """Simulate `config.n_replicas` replicas started from dataset frames; see module doc."""
    from tqdm.auto import tqdm

    criterion = criterion or BondDeviationCriterion.from_dataset(dataset, config.bond_threshold)
    start = dataset.positions[initial_frames(dataset, config.n_replicas, config.seed)]
    engine = ReplicaEngine(model, dataset.atomic_numbers, config.n_replicas, config.engine, dataset.box)
    engine.set_states(start)
    n_checks, steps = config.n_checks, config.steps_per_check
    R = config.n_replicas
    positions = np.empty((n_checks, R, dataset.n_atoms, 3), dtype=np.float32)
    deviations = np.empty((n_checks, R))
    failed = np.zeros(R, dtype=bool)
    stable_mask = np.empty((n_checks, R), dtype=bool)
    t0 = time.perf_counter()
    bar = tqdm(range(n_checks), desc="simulate", unit="chk", disable=not progress, leave=False)
    for c in bar:
        engine.step(steps)
        pos, _ = engine.get_states()
        dev = criterion(torch.as_tensor(pos)).numpy()
        newly = ~failed & criterion.unstable(torch.as_tensor(dev)).numpy()
        failed |= newly
        positions[c], deviations[c], stable_mask[c] = pos, dev, ~failed
        if newly.any():  # freeze: put failed replicas back to their start, keep them out of statistics
            idx = np.flatnonzero(newly)
            engine.reset_replicas(idx, start[idx], seed=config.seed + c)
        bar.set_postfix(stable=f"{(~failed).sum()}/{R}", t=f"{engine.time_ps:.1f}ps")
    wall = time.perf_counter() - t0
    times = (np.arange(n_checks) + 1) * steps * config.engine.timestep_ps
    unstable_flags = ~stable_mask
    stable_time = first_instability_time(unstable_flags, times).numpy()
    return SimulationResult(times, positions, deviations, stable_time, stable_mask,
                            R * n_checks * steps / wall, wall, engine.platform_name)


def hr_comparison(result: SimulationResult, dataset: QMDataset, reference: Optional[QMDataset],
                  config: SimulationConfig) -> dict:
    """h(r) over stable frames against the reference (reweighted to the run temperature)."""
    obs = HrObservable(r_max=config.hr_r_max, n_bins=config.hr_bins)
    stable = result.positions[result.stable_mask]  # (K, N, 3)
    out = {"r": obs.bin_centres.numpy()}
    if stable.shape[0]:
        out["model"] = obs(torch.as_tensor(stable, dtype=torch.float64)).mean(0).numpy()
    if reference is not None:
        ref, ess = reference_from_dataset(obs, reference, config.engine.temperature_K)
        out["reference"], out["reference_ess"] = ref.numpy(), ess
        if "model" in out:
            out["hr_mae"] = float(np.abs(out["model"] - out["reference"]).mean())
    return out


def check_molecules(dataset: QMDataset, reference: Optional[QMDataset] = None,
                    model_atomic_numbers: Optional[np.ndarray] = None) -> None:
    """Raise ValueError when the reference data (h(r) is only comparable for the same
    molecule) or the molecule a model file records it was trained on has another
    composition than the dataset (atom order may differ: both are permutation invariant)."""
    from ase.data import chemical_symbols

    def formula(z) -> str:
        counts = np.bincount(np.asarray(z, dtype=np.int64).reshape(-1))
        return "".join(f"{chemical_symbols[e]}{counts[e]}" for e in np.flatnonzero(counts))

    z = np.asarray(dataset.atomic_numbers)
    here = f"the dataset {dataset.source} ({len(z)} atoms, {formula(z)})"
    if reference is not None and formula(reference.atomic_numbers) != formula(z):
        raise ValueError(f"reference {reference.source} ({reference.n_atoms} atoms, {formula(reference.atomic_numbers)}) "
                         f"is another molecule than {here}; h(r) can only be compared for the same molecule")
    if model_atomic_numbers is not None and formula(model_atomic_numbers) != formula(z):
        zm = np.asarray(model_atomic_numbers).reshape(-1)
        raise ValueError(f"the model was trained on {len(zm)} atoms ({formula(zm)}), another molecule than {here}")


def simulate(model: nn.Module, dataset: QMDataset, config: SimulationConfig, out_dir,
             reference: Optional[QMDataset] = None, test_set: Optional[QMDataset] = None,
             progress: bool = True) -> dict:
    """Run, then write metrics.json, plots and (optionally) trajectories to `out_dir`.

    With a labelled `test_set`, the model's energy/force errors on it are stored too, so
    one file holds stability, observables and accuracy."""
    from openmm_stable import report

    check_molecules(dataset, reference)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = run_replicas(model, dataset, config, progress=progress)
    hr = hr_comparison(result, dataset, reference, config)
    metrics = {
        "n_replicas": config.n_replicas,
        "time_ps": float(result.times_ps[-1]),
        "temperature_K": config.engine.temperature_K,
        "timestep_fs": config.engine.timestep_fs,
        "integrator": config.engine.integrator,
        "bond_threshold_A": config.bond_threshold,
        "stable_time_ps": result.stable_time_ps.tolist(),
        "median_stable_time_ps": float(np.median(result.stable_time_ps)),
        "stable_fraction": float(result.stable_mask[-1].mean()),
        "replica_steps_per_s": result.replica_steps_per_s,
        "wall_time_s": result.wall_time_s,
        "platform": result.platform,
    }
    if "hr_mae" in hr:
        metrics["hr_mae"] = hr["hr_mae"]
        metrics["reference_ess"] = hr["reference_ess"]
    if test_set is not None:
        from openmm_stable.training.batching import evaluate

        errors = evaluate(model, test_set)
        metrics.update({k: errors[k] for k in ("energy_mae_meV", "force_mae_meV_per_A", "force_rmse_meV_per_A")})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report.plot_survival({"model": result.stable_time_ps}, metrics["time_ps"], out / "survival.png")
    report.plot_bond_deviation(result.times_ps, result.deviations, config.bond_threshold, out / "bond_deviation.png")
    curves = {k: hr[k] for k in ("model", "reference") if k in hr}
    if curves:
        report.plot_curves(hr["r"], curves, out / "hr.png", "r (A)", "h(r) (1/A)")
    np.savez_compressed(out / "hr.npz", **{k: v for k, v in hr.items() if isinstance(v, np.ndarray)})
    if config.write_trajectories:
        write_trajectories(out / "trajectories", dataset.atomic_numbers, result)
    return metrics


def write_trajectories(folder, atomic_numbers, result: SimulationResult) -> list[Path]:
    """One DCD per replica (mdtraj), plus a PDB topology to read them with."""
    import mdtraj

    from openmm_stable.export import topology_from_atomic_numbers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    topology = mdtraj.Topology.from_openmm(topology_from_atomic_numbers(atomic_numbers))
    paths = []
    for k in range(result.positions.shape[1]):
        traj = mdtraj.Trajectory(result.positions[:, k] / 10.0, topology, time=result.times_ps)
        if k == 0:
            traj[0].save_pdb(str(folder / "topology.pdb"))
        path = folder / f"replica_{k:03d}.dcd"
        traj.save_dcd(str(path))
        paths.append(path)
    return paths


def summary(metrics: dict) -> str:
    """A few lines for the terminal."""
    lines = [
        f"replicas: {metrics['n_replicas']}  time: {metrics['time_ps']:.2f} ps  T: {metrics['temperature_K']} K",
        f"median stable time: {metrics['median_stable_time_ps']:.2f} ps  stable fraction: {metrics['stable_fraction']:.2f}",
        f"throughput: {metrics['replica_steps_per_s']:.0f} replica-steps/s",
    ]
    if "hr_mae" in metrics:
        lines.append(f"h(r) MAE vs reference: {metrics['hr_mae']:.4f} 1/A (reference ESS {metrics['reference_ess']:.0f})")
    if "force_mae_meV_per_A" in metrics:
        lines.append(f"test force MAE: {metrics['force_mae_meV_per_A']:.1f} meV/A  energy MAE: {metrics['energy_mae_meV']:.1f} meV")
    return "\n".join(lines)

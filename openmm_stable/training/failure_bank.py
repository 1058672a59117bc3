"""``learning: failure_bank``: StABlE refinement for starts that fail rarely.

On a start that fails a few times per 100 replica-ps, the window loop of `stable.py`
learns from stable frames only, and h(r) of the stable ensemble points the wrong way there
(shared notes "rare-failures", F3-F5). This mode is one continuous phase:

* every frame of every replica is scored with a per-frame hinge on the bond deviations,
  l(x) = mean_b relu(|r_b - <r_b>| - delta_b)^2, delta_b the largest deviation of bond b in
  the QM training frames (`BondDeviationObservable`), so l > 0 only past the data (F2, F6);
* a `FailureBank` keeps every frame with l > 0, each failure's first frame past the training
  threshold, and a uniform background sample; a failed replica restarts from a random
  dataset frame with new velocities (no replay, no parking);
* once the bank holds ``min_failures`` failures (or ``min_excursion_frames`` frames with
  l > 0 and ``min_failures_with_excursions`` failures), one step: the gradient of
  log P(excursion) (`log_mean_coefficients`, weighted for the subsampled background),
  projected out of the directions the QM fit is sensitive to (`ProjectionBasis`, F7), a
  fixed length ``step_norm`` along it (no Adam: F8); then, only if the training force MAE
  left its band, an L-BFGS energy/force restore with its own optimizer; the bank empties
  (each frame is used once: no reweighted reuse);
* stop once the failure rate has fallen below ``stop_rate_ratio`` of its start, measured
  over as many replica-ps as the start's, or after ``max_steps`` steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Optional

import numpy as np
import torch

from openmm_stable.engines import create_engine
from openmm_stable.errors import InputError
from openmm_stable.io import atomic_write_json, write_csv
from openmm_stable.observables import BondDeviationObservable
from openmm_stable.training.batching import evaluate, refit_energy_shift
from openmm_stable.training.estimator import (ObservableLoss, log_mean_coefficients, model_energy_fn,
                                              surrogate_backward)
from openmm_stable.training.stable import StableTrainer

# Timed parts (`PartTimes`): bank upkeep during the simulation, then the parts of a step.
TIMED_PARTS = ("bank", "projection", "estimator", "split_half", "direction", "force_mae", "restore", "export",
               "validation")
BANK_LOG_COLUMNS = ["epoch", "step", "failures_this_epoch", "bank_failures", "bank_excursion_frames",
                    "bank_background", "background_population", "observable_loss", "step_norm",
                    "projected_grad_fraction", "split_half_cosine", "train_force_mae_meV_per_A",
                    "val_force_mae_meV_per_A", "val_energy_mae_meV", "restore_iterations",
                    "start_failure_rate_per_ps", "failure_rate_per_ps", "replica_ps", "sim_time_s", "grad_time_s",
                    *(f"time_{part}_s" for part in TIMED_PARTS)]


DIRECTIONS = ("hinge", "random", "hr")


@dataclasses.dataclass
class FailureBankSettings:
    """The settings of ``learning: failure_bank`` (``StableConfig.failure_bank``); the
    defaults are the notes' measured lead (section 2), not a tuned optimum."""

    min_failures: int = 8  # a step once this many failures are banked (F6/F7: >= 8 per step)
    min_excursion_frames: int = 32  # ... or this many frames with l > 0
    min_failures_with_excursions: int = 4  # ... together with at least this many failures
    background_frames: int = 512  # uniform sample of the frames with l = 0 (the mean gradient)
    hinge_target: Optional[float] = None  # A, one delta for every bond; None: per bond, from the QM training frames
    hinge_quantile: Optional[float] = None  # per-bond delta as this quantile of the data's deviations; None: the largest
    deviation_cap: float = 1.0  # A, bond deviations are capped here
    step_norm: float = 0.05  # parameter-space length of one step
    constraint_frames: int = 200  # QM training frames whose energies and forces the projection keeps
    force_projections: int = 8  # random force projections per constraint frame
    damping: float = 1e-3  # lambda as a fraction of the largest Gram eigenvalue
    rebuild_every: int = 4  # steps between rebuilds of the projection
    restore_above: float = 1.03  # L-BFGS restore when the train force MAE exceeds this x its start
    restore_iterations: int = 20  # L-BFGS iterations of one restore
    max_force_mae_ratio: float = 1.05  # after the restore still above this x: halve step_norm
    max_steps: int = 12
    stop_rate_ratio: float = 0.2  # stop when the failure rate is below this fraction of its start
    training_temperature_K: Optional[float] = None  # K, replicas run here (>= the engine's); None: the engine's
    # The step's direction, for the controls of benchmarks/README 5e: "hinge" (the method:
    # the projected gradient of log P(excursion)); "random" (a random direction in the same
    # QM-safe subspace, same length and step count: does any kick help?); "hr" (the projected
    # h(r) gradient of the run's `observable` on the same frames: isolates the observable).
    direction: str = "hinge"

    def __post_init__(self) -> None:
        def fail(field, message):
            raise InputError(f"refine config: failure_bank.{field}: {message}")

        for name in ("min_failures", "min_excursion_frames", "min_failures_with_excursions", "rebuild_every",
                     "restore_iterations", "max_steps", "constraint_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                fail(name, f"must be an integer >= 1, got {value!r}")
        if isinstance(self.force_projections, bool) or not isinstance(self.force_projections, (int, np.integer)) \
                or self.force_projections < 0:
            fail("force_projections", f"must be an integer >= 0, got {self.force_projections!r}")
        if isinstance(self.background_frames, bool) or not isinstance(self.background_frames, (int, np.integer)) \
                or self.background_frames < 2:
            fail("background_frames", f"must be an integer >= 2, got {self.background_frames!r}")
        for name in ("step_norm", "deviation_cap", "damping"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                fail(name, f"must be a number > 0, got {getattr(self, name)!r}")
        for name in ("hinge_target", "hinge_quantile", "training_temperature_K"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                fail(name, f"must be a number (or unset), got {value!r}")
        for name in ("restore_above", "max_force_mae_ratio", "stop_rate_ratio"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                fail(name, f"must be a number, got {getattr(self, name)!r}")
        if self.hinge_target is not None and not self.hinge_target >= 0:
            fail("hinge_target", f"must be >= 0 A (or unset: from the data), got {self.hinge_target!r}")
        if self.hinge_quantile is not None and not 0 < self.hinge_quantile <= 1:
            fail("hinge_quantile", f"must be in (0, 1] (or unset: the largest deviation), got {self.hinge_quantile!r}")
        if self.hinge_target is not None and self.hinge_quantile is not None:
            fail("hinge_quantile", "set either hinge_target or hinge_quantile, not both")
        if not self.restore_above >= 1:
            fail("restore_above", f"must be >= 1 (a ratio to the starting train force MAE), got {self.restore_above!r}")
        if not self.max_force_mae_ratio >= self.restore_above:
            fail("max_force_mae_ratio", f"must be >= restore_above ({self.restore_above:g}), "
                                        f"got {self.max_force_mae_ratio!r}")
        if not 0 < self.stop_rate_ratio < 1:
            fail("stop_rate_ratio", f"must be in (0, 1), got {self.stop_rate_ratio!r}")
        if self.direction not in DIRECTIONS:
            fail("direction", f"must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if self.training_temperature_K is not None and not self.training_temperature_K > 0:
            fail("training_temperature_K", f"must be > 0 K (or unset), got {self.training_temperature_K!r}")

    @classmethod
    def from_config(cls, values: dict) -> "FailureBankSettings":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise InputError(f"refine config: failure_bank: unknown setting(s) {unknown}; allowed: {sorted(fields)}")
        return cls(**values)


# --- the bank ----------------------------------------------------------------------------------
class FailureBank:
    """Frames of the current model, stratified so that the rare ones are all kept.

    Stratum "kept": every frame with l > 0 and every failure frame (the first frame past the
    training threshold), each weight 1. Stratum "background": a uniform reservoir sample of
    `capacity` of the N_0 other frames, each standing for N_0 / n_b of them. Every kept frame
    carries an event id: a run of consecutive l > 0 frames of one replica, ending either in a
    failure (a failure event: the approach and the crossing) or in a frame with l = 0 (a
    stable excursion); the split-half cosine splits by events, not frames."""

    def __init__(self, capacity: int, n_replicas: int):
        self.capacity = int(capacity)
        self.n_replicas = int(n_replicas)
        self.clear()

    def clear(self) -> None:
        self.kept_frames: list[np.ndarray] = []
        self.kept_scores: list[float] = []
        self.kept_events: list[int] = []
        self.kept_failure: list[bool] = []
        self.background: list[np.ndarray] = []
        self.background_population = 0
        self.failures = 0  # failures seen (a non-finite failure frame is counted but not kept)
        self.failure_events: list[int] = []
        self.next_event = 0
        self.open_run = [-1] * self.n_replicas  # event id of each replica's current l > 0 run

    def add(self, positions: np.ndarray, scores: np.ndarray, failed: np.ndarray, rng: np.random.Generator) -> None:
        """One frame of every replica: positions (R, N, 3), penalties l (R,), failures (R,)."""
        for r in range(len(scores)):
            finite = bool(np.isfinite(positions[r]).all()) and bool(np.isfinite(scores[r]))
            if failed[r] or (finite and scores[r] > 0):
                event = self.open_run[r]
                if event < 0:
                    event, self.next_event = self.next_event, self.next_event + 1
                if finite:
                    self.kept_frames.append(np.array(positions[r], dtype=np.float64))
                    self.kept_scores.append(float(scores[r]))
                    self.kept_events.append(event)
                    self.kept_failure.append(bool(failed[r]))
                if failed[r]:
                    self.failures += 1
                    self.failure_events.append(event)
                    event = -1  # the replica restarts: its run is closed
                self.open_run[r] = event
                continue
            self.open_run[r] = -1
            self.background_population += 1
            if len(self.background) < self.capacity:
                self.background.append(np.array(positions[r], dtype=np.float64))
            else:  # reservoir sampling: every frame seen so far is in the sample with equal probability
                j = int(rng.integers(self.background_population))
                if j < self.capacity:
                    self.background[j] = np.array(positions[r], dtype=np.float64)

    @property
    def excursion_frames(self) -> int:
        """Kept frames with l > 0 that are not failure frames."""
        return sum(1 for s, f in zip(self.kept_scores, self.kept_failure) if s > 0 and not f)

    def ready(self, settings: FailureBankSettings) -> bool:
        return (self.failures >= settings.min_failures
                or (self.excursion_frames >= settings.min_excursion_frames
                    and self.failures >= settings.min_failures_with_excursions))

    def samples(self, half: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(frames (K, N, 3), penalties l (K,), weights w (K,)) for `log_mean_coefficients`;
        `half` 0 or 1: the failure events alternately, the other events and the background
        likewise (each half is again a stratified sample of half the population)."""
        events = np.asarray(self.kept_events, dtype=np.int64)
        keep = np.ones(len(events), dtype=bool)
        back = np.ones(len(self.background), dtype=bool)
        if half is not None:
            failure_events = list(dict.fromkeys(self.failure_events))
            others = sorted(set(events.tolist()) - set(failure_events))
            chosen = set(failure_events[half::2]) | set(others[half::2])
            keep = np.isin(events, list(chosen))
            back = np.arange(len(self.background)) % 2 == half
        parts = [np.asarray(self.kept_frames).reshape(-1, *self._shape())[keep],
                 np.asarray(self.background).reshape(-1, *self._shape())[back]]
        frames = np.concatenate(parts)
        scores = np.concatenate([np.asarray(self.kept_scores, dtype=np.float64)[keep], np.zeros(int(back.sum()))])
        background_weight = self.background_population / max(len(self.background), 1)
        weights = np.concatenate([np.ones(int(keep.sum())), np.full(int(back.sum()), background_weight)])
        return frames, scores, weights

    def _shape(self) -> tuple[int, int]:
        sample = self.kept_frames[0] if self.kept_frames else self.background[0]
        return sample.shape

    def composition(self) -> dict:
        return {"bank_failures": self.failures, "bank_excursion_frames": self.excursion_frames,
                "bank_background": len(self.background), "background_population": self.background_population}

    def state(self) -> dict:
        """Plain data for the checkpoint."""
        return {"kept_frames": np.asarray(self.kept_frames, dtype=np.float64), "kept_scores": list(self.kept_scores),
                "kept_events": list(self.kept_events), "kept_failure": list(self.kept_failure),
                "background": np.asarray(self.background, dtype=np.float64),
                "background_population": self.background_population, "failures": self.failures,
                "failure_events": list(self.failure_events), "next_event": self.next_event,
                "open_run": list(self.open_run)}

    def restore(self, values: dict) -> None:
        self.kept_frames = [np.asarray(f) for f in values["kept_frames"]]
        self.kept_scores = [float(s) for s in values["kept_scores"]]
        self.kept_events = [int(e) for e in values["kept_events"]]
        self.kept_failure = [bool(f) for f in values["kept_failure"]]
        self.background = [np.asarray(f) for f in values["background"]]
        self.background_population = int(values["background_population"])
        self.failures = int(values["failures"])
        self.failure_events = [int(e) for e in values["failure_events"]]
        self.next_event = int(values["next_event"])
        self.open_run = [int(e) for e in values["open_run"]]


class PartTimes:
    """Seconds spent in each named part of the learning mode, so the overhead budget
    (learning time as a fraction of simulation time) can be read part by part."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def columns(self) -> dict:
        return {f"time_{name}_s": value for name, value in self.seconds.items()}


# --- the projection ------------------------------------------------------------------------------
@torch.no_grad()
def set_flat_parameters(model: torch.nn.Module, vector: torch.Tensor) -> None:
    """Copy a flat vector into the parameters, each in its own dtype."""
    offset = 0
    for p in model.parameters():
        p.copy_(vector[offset:offset + p.numel()].reshape(p.shape).to(p.dtype))
        offset += p.numel()


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    """The parameters' .grad as one float64 vector (zeros where unset)."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).detach().double().reshape(-1)
                      for p in model.parameters()])


class ProjectionBasis:
    """P = I - A^T (A A^T + lambda I)^-1 A for constraint rows A (rows, P), each row
    normalised, lambda = `damping` x the largest eigenvalue of the Gram matrix A A^T.

    A step d with A d = 0 leaves every constrained quantity unchanged to first order; the
    damping keeps the directions the QM data barely determine (tiny Gram eigenvalues)
    free, so the step is not confined to a handful of dimensions (F7: ~62 of 1,800
    eigenvalues above 1e-3 of the largest)."""

    def __init__(self, rows: torch.Tensor, damping: float):
        # The rows keep their dtype (float32 from `constraint_rows`: 1,800 rows of a 66k-parameter
        # model are 470 MB); the Gram matrix and its eigenvectors are float64. float32 rows
        # resolve the Gram spectrum to ~1e-7 of its top, far below the damping.
        norms = rows.to(torch.float64).norm(dim=1)
        keep = norms > 0
        self.rows = (rows[keep] / norms[keep, None].to(rows.dtype))
        gram = (self.rows @ self.rows.T).to(torch.float64)
        eigenvalues, self.vectors = torch.linalg.eigh(gram)
        self.eigenvalues = eigenvalues.clamp_min(0.0)
        self.damping_value = float(damping) * float(self.eigenvalues.max()) if len(eigenvalues) else 0.0

    def project(self, g: torch.Tensor) -> torch.Tensor:
        g = g.to(torch.float64)
        coefficients = self.vectors.T @ (self.rows @ g.to(self.rows.dtype)).to(torch.float64)
        correction = self.rows.T @ (self.vectors @ (coefficients / (self.eigenvalues + self.damping_value))).to(
            self.rows.dtype)
        return g - correction.to(torch.float64)


def constraint_rows(model: torch.nn.Module, atomic_numbers, frames: np.ndarray, n_projections: int, seed: int,
                    box: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows (M (1 + n_projections), P): dU(x_m)/dtheta and d(v_mj . F(x_m))/dtheta for random
    unit directions v_mj (a torch generator seeded with `seed`) on every frame x_m: the
    energies and a sketch of the forces of the QM frames, as functions of the parameters."""
    params = list(model.parameters())
    energy_fn = model_energy_fn(model, atomic_numbers, box)
    generator = torch.Generator().manual_seed(int(seed))
    rows = []

    def flat(grads):
        return torch.cat([(torch.zeros_like(p) if g is None else g).detach().reshape(-1).to(dtype)
                          for g, p in zip(grads, params)])

    for frame in frames:
        x = torch.as_tensor(frame, dtype=torch.float64)[None].clone().requires_grad_(True)
        energy = energy_fn(x).sum()
        grads = torch.autograd.grad(energy, params + [x], create_graph=n_projections > 0, allow_unused=True)
        rows.append(flat(grads[:-1]))
        for _ in range(n_projections):
            v = torch.randn(x.shape, generator=generator, dtype=torch.float64)
            v = v / v.norm()
            projected_force = -(grads[-1] * v).sum()
            rows.append(flat(torch.autograd.grad(projected_force, params, retain_graph=True, allow_unused=True)))
    return torch.stack(rows)


def learning_overhead(history: list) -> dict:
    """Seconds per timed part over a run's epochs and the learning time (bank upkeep, the
    steps, validation) as a fraction of the pure simulation time (the epochs' simulation
    less the bank upkeep inside it): the budget the issue sets at <= 15 %."""
    parts = {part: float(sum(row.get(f"time_{part}_s", 0.0) or 0.0 for row in history)) for part in TIMED_PARTS}
    simulation = float(sum(row.get("sim_time_s", 0.0) for row in history)) - parts["bank"]
    learning = float(sum(parts.values()))
    return {"seconds": parts, "simulation_s": simulation, "learning_s": learning,
            "fraction_of_simulation": learning / simulation if simulation > 0 else None}


def rate_stop_reason(mode: dict, ratio: float) -> Optional[str]:
    """Why to stop, or None: the model's failure rate since the last step, once it has run
    as many replica-ps as the start needed to fill its first bank (the same exposure, so
    the two rates are equally resolved), is below `ratio` x the start's rate."""
    if not mode["steps"] or mode["exposure_since_step"] < mode["start_exposure_ps"]:
        return None
    rate = mode["failures_since_step"] / mode["exposure_since_step"]
    if rate >= ratio * mode["start_rate"]:
        return None
    return (f"failure rate {rate:.3g}/ps over {mode['exposure_since_step']:.3g} replica-ps, below {ratio:g} x "
            f"the start's {mode['start_rate']:.3g}/ps")


# --- the trainer -----------------------------------------------------------------------------------
class FailureBankTrainer(StableTrainer):
    """`StableTrainer`'s set-up (model, QM frames, engine, checkpoints) with the failure-bank
    loop in `run_epoch` (module doc)."""

    def __init__(self, model, dataset, config, out_dir, **kwargs):
        self.settings = FailureBankSettings.from_config(config.failure_bank)
        if self.settings.training_temperature_K is not None and \
                self.settings.training_temperature_K < config.engine.temperature_K:
            raise InputError(f"refine config: failure_bank.training_temperature_K: "
                             f"{self.settings.training_temperature_K:g} K is below the run's temperature "
                             f"({config.engine.temperature_K:g} K); a hotter training run only speeds up failures")
        super().__init__(model, dataset, config, out_dir, **kwargs)
        s = self.settings
        self.temperature_K = s.training_temperature_K or config.engine.temperature_K
        if self.temperature_K != config.engine.temperature_K:  # the replicas run hotter than the evaluation
            self.engine = create_engine(model, self.z, config.n_replicas,
                                        dataclasses.replace(config.engine, temperature_K=self.temperature_K),
                                        dataset.box, seed=config.seed)
        box = dataset.box
        self.deviation = BondDeviationObservable(cap=s.deviation_cap).prepare(self.z, self.train_set.positions, box)
        if s.hinge_target is not None:
            targets = torch.full((len(self.deviation.bonds),), float(s.hinge_target), dtype=torch.float64)
        else:
            targets = self.deviation.hinge_targets(self.train_set.positions, box, s.hinge_quantile)
        self.hinge = ObservableLoss(targets, "hinge_above")
        self.bank = FailureBank(s.background_frames, config.n_replicas)
        self.mode = {"steps": 0, "step_norm": float(s.step_norm), "start_force_mae": None, "start_rate": None,
                     "start_exposure_ps": 0.0, "start_failures": 0, "exposure_since_step": 0.0,
                     "failures_since_step": 0, "failures": 0, "replica_ps": 0.0, "stop_reason": None,
                     "basis_params": None, "basis_frames": None, "basis_seed": None, "basis_step": None,
                     "last_rate": None}
        self._basis: Optional[ProjectionBasis] = None

    # --- checkpoint hooks ----------------------------------------------------------------------
    def mode_state(self) -> dict:
        return {"mode": dict(self.mode), "bank": self.bank.state()}

    def restore_mode_state(self, values: dict) -> None:
        if not values:
            raise InputError(f"{self.checkpoint_path}: holds no failure-bank state (written by another learning mode)")
        self.mode = dict(values["mode"])
        self.bank.restore(values["bank"])
        self._basis = None  # rebuilt from the saved parameters when next needed

    # --- scoring ---------------------------------------------------------------------------------
    def penalties(self, frames: np.ndarray) -> np.ndarray:
        """l(x) (K,) of frames (K, N, 3): the per-bond hinge on the capped deviations."""
        values = self.deviation(torch.as_tensor(frames, dtype=torch.float64), None, self.dataset.box)
        return self.hinge(values).numpy()

    # --- one epoch -------------------------------------------------------------------------------
    def run_epoch(self) -> dict:
        cfg, st, s, m = self.config, self.state, self.settings, self.mode
        t0 = time.perf_counter()
        failures = [0]
        failed_replicas = np.zeros(cfg.n_replicas, dtype=bool)
        self.times = times = PartTimes()

        def score_and_restart(frame) -> None:
            with times.part("bank"):
                scores = self.penalties(np.nan_to_num(frame.positions, nan=0.0))
                scores[~np.isfinite(frame.positions).all(axis=(1, 2))] = np.nan
                self.bank.add(frame.positions, scores, frame.unstable, self.rng)
            if frame.unstable.any():
                idx = np.flatnonzero(frame.unstable)
                failures[0] += idx.size
                failed_replicas[idx] = True
                start = self.rng.integers(len(self.dataset), size=idx.size)
                self.engine.reset_replicas(idx, self.dataset.positions[start], seed=int(self.rng.integers(2**31 - 1)))

        self.engine.run_checked(cfg.frames_per_epoch, cfg.steps_per_frame, self.criterion, score_and_restart)
        replica_ps = cfg.n_replicas * cfg.frames_per_epoch * cfg.steps_per_frame * cfg.engine.timestep_ps
        m["replica_ps"] += replica_ps
        m["failures"] += failures[0]
        if m["steps"] == 0:
            m["start_exposure_ps"] += replica_ps
            m["start_failures"] += failures[0]
        else:
            m["exposure_since_step"] += replica_ps
            m["failures_since_step"] += failures[0]
        row = {"epoch": st.epoch + 1, "cycle": m["steps"], "phase": "failure_bank", "failures_this_epoch": failures[0],
               "replica_ps": m["replica_ps"], "sim_time_s": time.perf_counter() - t0,
               "unstable_fraction": float(failed_replicas.mean()), **self.bank.composition()}
        t1 = time.perf_counter()
        if self.bank.ready(s) and m["steps"] < s.max_steps:
            row.update(self.take_step())
        else:
            m["stop_reason"] = rate_stop_reason(m, s.stop_rate_ratio)
        row["grad_time_s"] = time.perf_counter() - t1
        if m["steps"] > 0 and m["exposure_since_step"] > 0:
            m["last_rate"] = m["failures_since_step"] / m["exposure_since_step"]
        row["start_failure_rate_per_ps"] = m["start_rate"]
        row["failure_rate_per_ps"] = m["last_rate"] if m["steps"] else m["start_failures"] / m["start_exposure_ps"]
        row["step"] = m["steps"]
        with times.part("validation"):
            self._end_epoch(row)
        row.update(times.columns())
        write_csv(self.out / "bank_log.csv", st.history, BANK_LOG_COLUMNS)
        return row

    def _done(self) -> bool:
        m = getattr(self, "mode", None)
        if m is None:  # during StableTrainer's set-up
            return super()._done()
        return super()._done() or m["steps"] >= self.settings.max_steps or m["stop_reason"] is not None

    # --- the step ----------------------------------------------------------------------------------
    def log_excursion_gradient(self, frames: np.ndarray, scores: np.ndarray, weights: np.ndarray):
        """G = d log<l>/dtheta (flat) from weighted bank samples, and <l>."""
        self.model.zero_grad(set_to_none=False)
        result = log_mean_coefficients(torch.as_tensor(scores), self.temperature_K, torch.as_tensor(weights))
        surrogate_backward(model_energy_fn(self.model, self.z, self.box), torch.as_tensor(frames),
                           result.coefficients, minibatch=self.config.estimator_minibatch)
        grad = flat_grad(self.model)
        self.model.zero_grad(set_to_none=False)
        return grad, result.loss

    def projection(self) -> ProjectionBasis:
        """The constraint projection; rebuilt every ``rebuild_every`` steps, and after a resume
        from the parameters and frames it was built with (so a resumed run is the same run)."""
        s, m = self.settings, self.mode
        if m["basis_params"] is None or (m["steps"] % s.rebuild_every == 0 and m["basis_step"] != m["steps"]):
            n = len(self.train_set)
            m["basis_frames"] = np.sort(self.rng.choice(n, size=min(s.constraint_frames, n), replace=False))
            m["basis_seed"] = int(self.rng.integers(2**31 - 1))
            m["basis_params"] = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach().clone()
            m["basis_step"] = m["steps"]
            self._basis = None
        if self._basis is None:
            now = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach().clone()
            set_flat_parameters(self.model, m["basis_params"])
            try:
                rows = constraint_rows(self.model, self.z, self.train_set.positions[m["basis_frames"]],
                                       s.force_projections, m["basis_seed"], self.box)
            finally:
                set_flat_parameters(self.model, now)
            self.model.zero_grad(set_to_none=False)
            self._basis = ProjectionBasis(rows, s.damping)
        return self._basis

    def _train_force_mae(self) -> float:
        return float(evaluate(self.model, self.train_tensors)["force_mae_meV_per_A"])

    def restore(self) -> int:
        """L-BFGS on the plain energy/force loss over the whole training set (its own,
        fresh optimizer: the notes' B6, F8); returns its iterations."""
        params = list(self.model.parameters())
        iterations = self.settings.restore_iterations
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=iterations, max_eval=2 * iterations + 5,
                                      history_size=10, line_search_fn="strong_wolfe")

        def closure():  # the plain (unnormalised) energy/force loss over the whole training set
            optimizer.zero_grad(set_to_none=False)
            return torch.tensor(self.regulariser.backward(self.model, 1.0, whole_training_set=True))

        self.model.train()
        optimizer.step(closure)
        done = int(optimizer.state[params[0]].get("n_iter", 0))
        self.model.zero_grad(set_to_none=False)
        refit_energy_shift(self.model, self.train_tensors)
        return done

    def take_step(self) -> dict:
        s, m, st = self.settings, self.mode, self.state
        if m["start_force_mae"] is None:
            m["start_force_mae"] = self._train_force_mae()
        if m["start_rate"] is None:
            m["start_rate"] = m["start_failures"] / m["start_exposure_ps"]
        # the rate of the model this step replaces
        m["last_rate"] = (m["failures_since_step"] / m["exposure_since_step"] if m["steps"] and m["exposure_since_step"]
                          else m["start_rate"])
        times = self.times
        with times.part("projection"):
            basis = self.projection()
        with times.part("estimator"):
            frames, scores, weights = self.bank.samples()
            grad, mean_loss = self.log_excursion_gradient(frames, scores, weights)
            projected = basis.project(grad)
        row = {"observable_loss": mean_loss, "step_norm": m["step_norm"], **self.bank.composition(),
               "projected_grad_fraction": float(projected.norm() / grad.norm()) if grad.norm() > 0 else None}
        with times.part("split_half"):
            halves = [self.bank.samples(half) for half in (0, 1)]
            if all(h[2].size >= 2 and (h[1] > 0).any() for h in halves):
                g0, g1 = (basis.project(self.log_excursion_gradient(*h)[0]) for h in halves)
                row["split_half_cosine"] = float(torch.nn.functional.cosine_similarity(g0, g1, dim=0))
        with times.part("direction"):
            direction = self.step_direction(basis, projected, frames)
        if direction.norm() > 0:
            theta = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach().double()
            theta = theta - m["step_norm"] * direction / direction.norm()
            set_flat_parameters(self.model, theta)
            refit_energy_shift(self.model, self.train_tensors)
        with times.part("force_mae"):
            mae = self._train_force_mae()
        iterations = 0
        if mae > s.restore_above * m["start_force_mae"]:
            with times.part("restore"):
                iterations = self.restore()
                mae = self._train_force_mae()
        if mae > s.max_force_mae_ratio * m["start_force_mae"]:
            m["step_norm"] *= 0.5  # the QM fit did not come back: shorter steps from now on
        row.update({"train_force_mae_meV_per_A": mae, "restore_iterations": iterations})
        m["steps"] += 1
        st.learning_steps = m["steps"]
        m["exposure_since_step"], m["failures_since_step"] = 0.0, 0
        self.bank.clear()
        with times.part("export"):
            self.engine.update_model(self.model)
        st.cycle = m["steps"]
        self._save_snapshot(ended_stable=False)
        return row

    def step_direction(self, basis: "ProjectionBasis", projected: torch.Tensor, frames: np.ndarray) -> torch.Tensor:
        """What the step follows (``direction``): the projected hinge gradient; or, for the
        controls, a random direction or the h(r) ensemble gradient of the same (unweighted)
        frames, projected the same way (the step length is fixed, so only the direction differs)."""
        kind = self.settings.direction
        if kind == "random":
            generator = torch.Generator().manual_seed(int(self.rng.integers(2**31 - 1)))
            return basis.project(torch.randn(projected.shape, generator=generator, dtype=projected.dtype))
        if kind == "hr":
            self.model.zero_grad(set_to_none=False)
            self.objective.backward(self.model, torch.as_tensor(frames, dtype=torch.float64))
            grad = flat_grad(self.model).to(projected.dtype)
            self.model.zero_grad(set_to_none=False)
            return basis.project(grad)
        return projected

    def fit(self, resume: bool = False) -> dict:
        summary = super().fit(resume=resume)
        m = self.mode
        summary["failure_bank"] = {
            "steps": m["steps"], "step_norm": m["step_norm"], "failures": m["failures"], "replica_ps": m["replica_ps"],
            "start_failure_rate_per_ps": m["start_rate"], "last_failure_rate_per_ps": m["last_rate"],
            "start_train_force_mae_meV_per_A": m["start_force_mae"], "stop_reason": m["stop_reason"],
            "training_temperature_K": self.temperature_K,
            "hinge_targets_A": [float(t) for t in self.hinge.target],
            "settings": dataclasses.asdict(self.settings), "overhead": learning_overhead(self.state.history)}
        atomic_write_json(self.out / "metrics.json", summary)
        return summary

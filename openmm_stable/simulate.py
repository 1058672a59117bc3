"""`simulate`: how long does a model stay stable, and how good are its observables?

Runs R replicas with the `ReplicaEngine`, checks the stability criterion every
``check_interval_ps`` (bond-length deviation for molecules, minimum intermolecular
distance for periodic boxes: `openmm_stable.stability.make_criterion`), records each
replica's time of first instability, and compares observables over the stable parts of
the trajectories with the (reweighted) reference: h(r) for a molecule; element-pair RDFs
and the molecular self-diffusivity for a periodic box (a liquid). Velocities are saved
every ``vacf_interval_ps`` (finer than the checks) for the velocity autocorrelation
function (VACF) of the stable parts. The analysis of those series (MSD, VACF, Einstein
and Green-Kubo diffusivities) is `openmm_stable.dynamics`; this module runs and reports.
A replica that fails is reset to its starting frame and counted as failed from then on
(frozen): it cannot disturb the others, which run on. Its stable time is that of its first
unstable check, with an event flag (`failed`): a failure at the last check is not a survivor.

With ``renewal`` a failed replica instead restarts from a fresh dataset frame (one the
starts did not use, `RestartFrames`) with new velocities and runs on to the horizon: every
failure is an event and every replica-ps is exposure (R x horizon), so the failure rate
per replica-ps of a model that fails rarely is measured with all the failures a run can
give, not one per replica (`statistics.rate_ratio_test`). The stable times and flags stay
those of each replica's first segment (Kaplan-Meier and log-rank as before); the
segments are in metrics.json, and observables use the stable frames of every segment.

In an output folder the frames stream to ``frames/*.npy`` and, every ``chunk_checks``
checks, the engine state and ``progress.json`` (stable times so far) are saved, so a
killed run keeps its numbers and ``resume`` continues it bit for bit when the engine
gives an OpenMM checkpoint (`run_replicas`, `prepare_run_folder`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from openmm_stable.config import config_from_dict, load_config
from openmm_stable.errors import InputError
from openmm_stable.io import atomic_path, atomic_write_json
from openmm_stable.data.dataset import QMDataset, hill_formula
from openmm_stable.engine import EngineConfig, masses_amu, maxwell_boltzmann
from openmm_stable.engines import create_engine
from openmm_stable.dynamics import (A2_PER_PS_IN_CM2_PER_S, VACF_MAX_REFERENCE_INTERVAL_PS, first_minimum,
                                    green_kubo_diffusivity, molecular_diffusivity, molecular_velocities,
                                    regular_time_step, vacf_over_segments)
from openmm_stable.geometry import half_box_width, molecule_ids
from openmm_stable.observables import (HrObservable, RdfObservable, element_pair_list, pair_label,
                                       reference_from_dataset)
from openmm_stable.temperature import settle_temperatures
from openmm_stable.stability import (EVALUATION_BOND_THRESHOLD, STABILITY_KINDS, WATER_MIN_DISTANCE_THRESHOLD,
                                     StabilityCriterion, first_instability, make_criterion, resolve_stability)


@dataclasses.dataclass
class SimulationConfig:
    """Every `simulate` setting. `from_dict` / `from_yaml` build it from plain data (the
    ``simulate --config FILE`` form); ``vacf_interval_ps`` 0 or None turns the VACF off."""

    n_replicas: int = 16
    time_ps: float = 10.0
    check_interval_ps: float = 0.1  # stability check and frame saving interval
    stability: str = "auto"  # "bonds", "min_distance", "min_nonbonded_distance"; "auto": min_distance if periodic
    bond_threshold: float = EVALUATION_BOND_THRESHOLD
    min_distance_threshold: float = WATER_MIN_DISTANCE_THRESHOLD
    hr_r_max: float = 10.0
    hr_bins: int = 200
    rdf_r_max: float = 6.0  # periodic data; capped just below half the box
    rdf_bins: int = 120
    vacf_interval_ps: Optional[float] = 0.0025  # velocities saved this often for the VACF; None: no VACF
    vacf_max_lag_ps: float = 1.0  # longest VACF lag (and at most half of a replica's stable part)
    seed: int = 0
    write_trajectories: bool = False
    chunk_checks: int = 10  # checks between saved states when streaming to a folder: the most a kill loses
    # A failed replica restarts from a fresh frame and runs on (failures per replica-ps
    # over all segments); False: it is reset and frozen (one first-failure time per replica).
    renewal: bool = False
    # K at which the reference frames were sampled when the file records none (MD17: 500);
    # None: as recorded, else the run temperature (`openmm_stable.temperature`).
    reference_temperature_K: Optional[float] = None
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**self.engine)
        if self.vacf_interval_ps == 0:
            self.vacf_interval_ps = None
        if self.n_replicas < 1 or self.time_ps <= 0 or self.check_interval_ps <= 0:
            raise InputError("n_replicas, time_ps and check_interval_ps must be positive")
        if int(self.chunk_checks) != self.chunk_checks or self.chunk_checks < 1:
            raise InputError(f"chunk_checks must be a whole number >= 1, got {self.chunk_checks!r}")
        if not isinstance(self.renewal, bool):
            raise InputError(f"renewal must be true or false, got {self.renewal!r}")
        if self.stability not in STABILITY_KINDS:
            raise InputError(f"unknown stability criterion {self.stability!r}; known: {', '.join(STABILITY_KINDS)}")
        if self.vacf_interval_ps is not None and not (self.vacf_interval_ps > 0 and self.vacf_max_lag_ps > 0):
            raise InputError("vacf_interval_ps (or None) and vacf_max_lag_ps must be positive")
        self._check_run_length()

    def _check_run_length(self) -> None:
        """The run is a whole number of checks of a whole number of steps: say so before any
        simulation, instead of silently running another length (0.1 ps for 0.01 ps of
        0.1 ps checks)."""
        dt = self.engine.timestep_ps
        steps = self.check_interval_ps / dt
        if abs(steps - round(steps)) > 1e-6 * max(1.0, steps) or round(steps) < 1:
            raise InputError(f"check_interval_ps {self.check_interval_ps:g} is not a whole number of "
                             f"{self.engine.timestep_fs:g} fs steps ({steps:.4g}); pick a multiple of the timestep")
        if self.time_ps < self.check_interval_ps * (1 - 1e-9):
            raise InputError(f"time_ps {self.time_ps:g} is shorter than one stability check "
                             f"(check_interval_ps {self.check_interval_ps:g}); the run would be "
                             f"{self.check_interval_ps:g} ps: lower the check interval or raise the time")
        checks = self.time_ps / self.check_interval_ps
        if abs(checks - round(checks)) > 1e-6 * max(1.0, checks):
            raise InputError(f"time_ps {self.time_ps:g} is not a whole number of checks of {self.check_interval_ps:g} ps "
                             f"({checks:.4g}); it would run {round(checks) * self.check_interval_ps:g} ps: pick a "
                             f"multiple of the check interval")

    @classmethod
    def from_dict(cls, values: dict) -> "SimulationConfig":
        """Build from a mapping (YAML); unknown keys are an error. ``seed`` is the run's one
        seed: start frames, velocities and the thermostat's random stream."""
        return config_from_dict(cls, dict(values), "simulate config")

    @classmethod
    def from_yaml(cls, path, **overrides) -> "SimulationConfig":
        """Read a YAML mapping of field names; `overrides` that are not None win over the
        file (`openmm_stable.config.load_config`)."""
        return load_config(cls, path, overrides)

    @property
    def steps_per_check(self) -> int:
        return max(1, round(self.check_interval_ps / self.engine.timestep_ps))

    @property
    def n_checks(self) -> int:
        return max(1, round(self.time_ps / (self.steps_per_check * self.engine.timestep_ps)))

    @property
    def steps_per_velocity(self) -> Optional[int]:
        """MD steps between saved velocities: the divisor of `steps_per_check` closest to
        `vacf_interval_ps` (so that velocities are equally spaced); None without VACF."""
        if self.vacf_interval_ps is None:
            return None
        wanted = self.vacf_interval_ps / self.engine.timestep_ps
        divisors = [d for d in range(1, self.steps_per_check + 1) if self.steps_per_check % d == 0]
        return min(divisors, key=lambda d: (abs(d - wanted), d))


@dataclasses.dataclass
class SimulationResult:
    times_ps: np.ndarray  # (T,)
    positions: np.ndarray  # (T, R, N, 3) Angstrom, float32
    deviations: np.ndarray  # (T, R) criterion value (A): largest bond deviation, or min intermolecular distance
    stable_time_ps: np.ndarray  # (R,) first unstable check, or the run's length for a survivor
    failed: np.ndarray  # (R,) bool: the event flag (a failure at the last check has the survivors' time)
    stable_mask: np.ndarray  # (T, R) True while the replica had not failed yet
    replica_steps_per_s: float
    wall_time_s: float
    platform: str
    velocities: Optional[np.ndarray] = None  # (T * per_check, R, N, 3) A/ps, float32, every velocity_interval_ps
    velocity_interval_ps: Optional[float] = None
    segments: Optional[dict] = None  # renewal runs: every segment (`renewal_segments`)

    @property
    def velocities_per_check(self) -> int:
        return 0 if self.velocities is None else self.velocities.shape[0] // self.stable_mask.shape[0]


def initial_frames(dataset: QMDataset, n_replicas: int, seed: int) -> np.ndarray:
    """Indices of distinct starting frames (repeats only if the dataset is smaller)."""
    rng = np.random.default_rng(seed)
    return rng.choice(len(dataset), size=n_replicas, replace=len(dataset) < n_replicas)


class RestartFrames:
    """Where the replicas of a renewal run restart: the dataset frames the initial starts
    did not use, in a permutation seeded by the run's seed, one after another (`used` is
    how many were handed out, which a resumed run restores). When they run out the order
    starts again (frames are then reused), with a note; a dataset whose every frame was a
    start is permuted whole."""

    def __init__(self, n_frames: int, starts: np.ndarray, seed: int, used: int = 0):
        unused = np.setdiff1d(np.arange(n_frames), starts)
        self.reused_from_start = unused.size == 0
        self.order = np.random.default_rng([seed, 1]).permutation(np.arange(n_frames) if unused.size == 0 else unused)
        self.used = int(used)

    def take(self, n: int) -> np.ndarray:
        """The next `n` frames (and a note when restarts begin to reuse frames)."""
        picks = self.order[np.arange(self.used, self.used + n) % self.order.size]
        fresh = 0 if self.reused_from_start else self.order.size
        if self.used <= fresh < self.used + n:
            print(f"note: renewal has no fresh frames left ({fresh} dataset frames were not starts); restarts now "
                  f"reuse frames, in the same order", file=sys.stderr)
        self.used += n
        return picks


def restart_velocities(masses: np.ndarray, temperature_K: float, seed: int, restart_numbers) -> np.ndarray:
    """Maxwell-Boltzmann velocities (n, N, 3) of restarts number `restart_numbers` of a
    renewal run: each from its own stream (the run's seed, the restart's number), so a
    restart's velocities do not depend on which others happen at the same check."""
    return np.concatenate([maxwell_boltzmann(masses, temperature_K, 1,
                                             int(np.random.SeedSequence([seed, 2, int(q)]).generate_state(1)[0]))
                           for q in restart_numbers])


def renewal_segments(stable: np.ndarray, times: np.ndarray, start_frames, restarts) -> dict:
    """Every segment of a renewal run, as parallel lists (replica, start_ps, end_ps,
    failed, start_frame), from the stable flags (C, R) of the checks done (False: the
    replica's segment failed at that check) and the restart log [(check, replica, frame)].
    A failure with no restart (at the run's last check) ends its replica's record; the
    segments of a replica tile [0, horizon], so the exposure is R x horizon."""
    stable = np.asarray(stable, dtype=bool)
    frame_at = {(int(c), int(k)): int(f) for c, k, f in restarts}
    out: dict = {"replica": [], "start_ps": [], "end_ps": [], "failed": [], "start_frame": []}

    def add(k, t0, t1, failed, frame):
        for key, value in zip(out, (k, t0, t1, failed, frame)):
            out[key].append(value)

    horizon = float(times[stable.shape[0] - 1])
    for k in range(stable.shape[1]):
        t0, frame, open_ = 0.0, int(start_frames[k]), True
        for c in np.flatnonzero(~stable[:, k]):
            add(k, t0, float(times[c]), True, frame)
            open_ = (int(c), k) in frame_at
            if open_:
                t0, frame = float(times[c]), frame_at[(int(c), k)]
        if open_ and horizon > t0:
            add(k, t0, horizon, False, frame)
    return out


def stable_runs(stable_mask: np.ndarray) -> list[tuple[int, int, int]]:
    """(replica, first check, end check) of every run of consecutive stable checks: the
    stable part of each segment (a renewal run has several per replica, a frozen one at
    most one, from the start)."""
    runs = []
    for k in range(stable_mask.shape[1]):
        flags = np.concatenate([[False], np.asarray(stable_mask[:, k], dtype=bool), [False]])
        edges = np.flatnonzero(np.diff(flags.astype(np.int8)))
        runs += [(k, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
    return runs


PROGRESS_FILE = "progress.json"  # what a resumed run continues from; see `run_replicas`
FRAMES_DIR = "frames"  # the streamed frames (.npy, one row per check) and the engine state
# Everything `simulate` writes into its folder: what --overwrite clears.
RUN_OUTPUTS = ("metrics.json", PROGRESS_FILE, FRAMES_DIR, "trajectories", "hr.npz", "rdf.npz", "vacf.npz",
               "vacf.csv", "survival.png", "bond_deviation.png", "min_distance.png", "hr.png", "rdf.png", "vacf.png")
# Settings that do not change a run's numbers: a resume may differ in them.
_NOT_IN_IDENTITY = ("write_trajectories", "chunk_checks")


def run_identity(model: nn.Module, dataset: QMDataset, config: SimulationConfig) -> dict:
    """What a resumed run must share with the run it continues: the settings (those that
    change the numbers), the model's weights and the dataset (`QMDataset.fingerprint`)."""
    import hashlib

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IN_IDENTITY}
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"config": json.loads(json.dumps(settings)), "model": h.hexdigest()[:16], "dataset": dataset.fingerprint()}


def read_progress(out_dir) -> Optional[dict]:
    """progress.json of a run folder (None when there is none); unreadable: InputError."""
    path = Path(out_dir) / PROGRESS_FILE
    if not path.exists():
        return None
    try:
        values = json.loads(path.read_text())
        values["checks_done"], values["identity"]  # noqa: B018 (the keys a run needs)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a simulate progress file ({err!r}); start again with --overwrite") from None
    return values


def check_resumable(progress: Optional[dict], identity: dict, out_dir) -> None:
    """InputError unless `progress` is a run of the same settings, model and dataset."""
    if progress is None:
        raise InputError(f"nothing to resume in {out_dir}: it holds no {PROGRESS_FILE} (start a run there without "
                         f"--resume; --overwrite replaces a finished run of an older version)")
    stored = progress["identity"]
    # a setting added since the run was started is at its default there
    settings = {**{f.name: f.default for f in dataclasses.fields(SimulationConfig)
                   if f.default is not dataclasses.MISSING and f.name not in _NOT_IN_IDENTITY},
                **stored.get("config", {})}
    differ = [k for k in ("model", "dataset") if stored.get(k) != identity[k]]
    differ += [f"config.{k}" for k in sorted(set(identity["config"]) | set(settings))
               if settings.get(k) != identity["config"].get(k)]
    if differ:
        raise InputError(f"{out_dir} holds a run with another {', '.join(differ)}; --resume continues only the same "
                         f"run (same settings, model and dataset): use another --out, or --overwrite to start afresh")


def prepare_run_folder(out_dir, identity: dict, resume: bool = False, overwrite: bool = False) -> Optional[dict]:
    """Check the output folder before any work: a folder that already holds a run is
    refused unless `resume` (same run: continue it) or `overwrite` (clear it). Returns the
    progress to resume from, or None for a fresh run."""
    import shutil

    out = Path(out_dir)
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other: continue the run, or replace it")
    progress = read_progress(out) if resume or not overwrite else None
    if resume:
        check_resumable(progress, identity, out)
        return progress
    held = [name for name in ("metrics.json", PROGRESS_FILE) if (out / name).exists()]
    if held and not overwrite:
        state = "finished" if (out / "metrics.json").exists() and (progress is None or progress.get("finished")) \
            else "partial"
        raise InputError(f"{out} already holds a {state} simulate run ({', '.join(held)}); pass --resume to continue "
                         f"it, --overwrite to replace it, or choose another --out")
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return None


class _Frames:
    """Where a run's per-check arrays go as they are produced: in memory, or .npy files in
    `folder` written check by check (memory-mapped), which a resumed run reopens. Rows past
    progress.json's `checks_done` are not valid yet."""

    def __init__(self, shapes: dict, folder: Optional[Path] = None, reopen: bool = False):
        self.arrays: dict = {}
        for name, (shape, dtype) in shapes.items():
            if folder is None:
                array = np.zeros(shape, dtype)
            elif reopen:
                array = np.load(folder / f"{name}.npy", mmap_mode="r+")
                if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                    raise InputError(f"{folder / (name + '.npy')}: shape {array.shape} {array.dtype}, expected "
                                     f"{tuple(shape)} {np.dtype(dtype)}; start again with --overwrite")
            else:
                array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=tuple(shape))
            self.arrays[name] = array

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def flush(self) -> None:
        for array in self.arrays.values():
            if isinstance(array, np.memmap):
                array.flush()


def _save_progress(out: Path, identity: dict, config: SimulationConfig, engine, frames: _Frames, checks_done: int,
                   failed: np.ndarray, times: np.ndarray, wall_s: float, renewal: Optional[dict] = None) -> None:
    """The engine state after `checks_done` checks (its OpenMM checkpoint when the engine
    has one: exact resume, Langevin noise included), then progress.json with the stability
    numbers so far, both atomic; the state file it names is written first. `renewal`
    (a renewal run's restart log, frames used and start frames) goes in too: a resumed
    run continues the same restart order."""
    from openmm_stable.io import save_torch_file

    finished = checks_done == config.n_checks
    state_name = None
    if not finished:
        positions, velocities = engine.get_states()
        payload = {"checks_done": checks_done, "positions": positions, "velocities": velocities,
                   "platform": engine.platform_name}
        if hasattr(engine, "checkpoint"):
            payload["checkpoint"] = list(engine.checkpoint())
        state_name = f"state_{checks_done:06d}.pt"
        save_torch_file(payload, out / FRAMES_DIR / state_name)
    stable_time, _ = first_instability(~frames["stable"][:checks_done], times[:checks_done])
    horizon = float(times[checks_done - 1])
    segments = None if renewal is None else renewal_segments(frames["stable"][:checks_done], times,
                                                             renewal["start_frames"], renewal["restarts"])
    progress = {"identity": identity, "n_checks": config.n_checks, "checks_done": checks_done, "finished": finished,
                "state": state_name, "wall_time_s": wall_s, "platform": engine.platform_name,
                "metrics": {"time_ps": horizon, **stability_metrics(stable_time.numpy(), failed, horizon, segments)}}
    if renewal is not None:
        progress["renewal"] = {"restarts": renewal["restarts"], "frames_used": renewal["frames_used"]}
    atomic_write_json(out / PROGRESS_FILE, progress)
    for old in (out / FRAMES_DIR).glob("state_*.pt"):
        if old.name != state_name:
            old.unlink()


def _restore_engine(engine, out: Path, progress: dict) -> None:
    """Put the engine where the saved run stopped: its OpenMM checkpoint on the same
    platform, else positions and velocities (then Langevin noise and Nose-Hoover chains
    start afresh, so the continuation is statistically, not bit-for-bit, the same run)."""
    import sys

    from openmm_stable.io import load_torch_file

    state = load_torch_file(out / FRAMES_DIR / progress["state"])
    if "checkpoint" in state and hasattr(engine, "restore_checkpoint") and state["platform"] == engine.platform_name:
        engine.restore_checkpoint(state["checkpoint"])
    else:
        print(f"warning: resuming {out} from positions and velocities only (no OpenMM checkpoint for the "
              f"{engine.platform_name} platform): the rest of the run is not bit-for-bit the uninterrupted one",
              file=sys.stderr)
        engine.set_states(state["positions"], state["velocities"])


def run_replicas(model: nn.Module, dataset: QMDataset, config: SimulationConfig,
                 criterion: Optional[StabilityCriterion] = None, progress: bool = True, out_dir=None,
                 resume_from: Optional[dict] = None, identity: Optional[dict] = None,
                 on_chunk: Optional[Callable[[int], None]] = None) -> SimulationResult:
    """Simulate `config.n_replicas` replicas started from dataset frames; see module doc.

    With `out_dir`, frames stream to ``out_dir/frames/*.npy`` as they come, and every
    `config.chunk_checks` checks the engine state and progress.json (with the stable times
    so far) are saved: a killed run loses at most one chunk. `resume_from` (the
    progress.json of such a run, checked by `prepare_run_folder`) continues it from its
    last saved chunk. `on_chunk(checks_done)` is called after each saved chunk."""
    from tqdm.auto import tqdm

    criterion = criterion or make_criterion(dataset, config.stability, config.bond_threshold,
                                            config.min_distance_threshold)
    start_frames = initial_frames(dataset, config.n_replicas, config.seed)
    start = dataset.positions[start_frames]
    engine = create_engine(model, dataset.atomic_numbers, config.n_replicas, config.engine, dataset.box,
                           seed=config.seed)
    n_checks, steps = config.n_checks, config.steps_per_check
    R = config.n_replicas
    v_steps = config.steps_per_velocity
    per_check = steps // v_steps if v_steps else 0
    shapes = {"positions": ((n_checks, R, dataset.n_atoms, 3), np.float32), "deviations": ((n_checks, R), np.float64),
              "stable": ((n_checks, R), np.bool_)}
    if v_steps:
        shapes["velocities"] = ((n_checks * per_check, R, dataset.n_atoms, 3), np.float32)
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        (out / FRAMES_DIR).mkdir(parents=True, exist_ok=True)
        identity = identity or run_identity(model, dataset, config)
    frames = _Frames(shapes, None if out is None else out / FRAMES_DIR, reopen=resume_from is not None)
    times = (np.arange(n_checks) + 1) * steps * config.engine.timestep_ps
    done, wall_before = 0, 0.0
    failed = np.zeros(R, dtype=bool)  # renewal: the first segment failed
    restarts: list = []  # renewal: [check, replica, frame] of every restart so far
    if resume_from is not None:
        done, wall_before = int(resume_from["checks_done"]), float(resume_from.get("wall_time_s", 0.0))
        failed = np.asarray(resume_from["metrics"]["failed"], dtype=bool)
        restarts = [list(map(int, row)) for row in (resume_from.get("renewal") or {}).get("restarts", [])]
    pool = RestartFrames(len(dataset), start_frames, config.seed,
                         used=((resume_from or {}).get("renewal") or {}).get("frames_used", 0))
    if resume_from is not None:
        if done < n_checks:
            _restore_engine(engine, out, resume_from)
    else:
        engine.set_states(start)
    bar = tqdm(total=n_checks, initial=done, desc="simulate", unit="chk", disable=not progress, leave=False)
    pending_velocities: list[np.ndarray] = []

    def freeze_failed(frame, c0: int) -> None:
        """Failed replicas go back to their start and stay out of the statistics."""
        newly = ~failed & frame.unstable
        failed[:] |= newly
        c = c0 + frame.index
        frames["positions"][c], frames["deviations"][c], frames["stable"][c] = frame.positions, frame.deviations, ~failed
        if v_steps:
            frames["velocities"][c * per_check:(c + 1) * per_check] = np.stack(pending_velocities)
            pending_velocities.clear()
        if newly.any():
            idx = np.flatnonzero(newly)
            engine.reset_replicas(idx, start[idx], seed=config.seed + c)
        bar.update(1)
        bar.set_postfix(stable=f"{(~failed).sum()}/{R}", t=f"{times[c]:.1f}ps")

    def renew_failed(frame, c0: int) -> None:
        """Failed replicas restart from fresh frames (none at the last check: the run ends)."""
        c = c0 + frame.index
        failed[:] |= frame.unstable
        frames["positions"][c], frames["deviations"][c], frames["stable"][c] = (frame.positions, frame.deviations,
                                                                                ~frame.unstable)
        if v_steps:
            frames["velocities"][c * per_check:(c + 1) * per_check] = np.stack(pending_velocities)
            pending_velocities.clear()
        idx = np.flatnonzero(frame.unstable)
        if idx.size and c < n_checks - 1:
            picks = pool.take(idx.size)
            numbers = range(len(restarts), len(restarts) + idx.size)
            velocities = restart_velocities(engine.masses, engine.config.temperature_K, config.seed, numbers)
            engine.reset_replicas(idx, dataset.positions[picks], velocities)
            restarts.extend([c, int(k), int(f)] for k, f in zip(idx, picks))
        events[0] += idx.size
        bar.update(1)
        bar.set_postfix(failures=events[0], t=f"{times[c]:.1f}ps")

    events = [int((~np.asarray(frames["stable"][:done])).sum())]  # renewal: failures so far, for the bar
    on_frame = renew_failed if config.renewal else freeze_failed
    renewal = (lambda: {"restarts": restarts, "frames_used": pool.used,
                        "start_frames": start_frames}) if config.renewal else (lambda: None)

    t0 = time.perf_counter()
    while done < n_checks:
        n = min(config.chunk_checks, n_checks - done)
        engine.run_checked(n, steps, criterion, lambda frame, c0=done: on_frame(frame, c0), velocity_steps=v_steps,
                           on_velocities=lambda v: pending_velocities.append(v.astype(np.float32)))
        done += n
        if out is not None:
            frames.flush()
            _save_progress(out, identity, config, engine, frames, done, failed, times,
                           wall_before + time.perf_counter() - t0, renewal())
        if on_chunk is not None:
            on_chunk(done)
    bar.close()
    wall = time.perf_counter() - t0
    stable_time, failed_flags = (x.numpy() for x in first_instability(~frames["stable"], times))
    total_wall = wall_before + wall  # over every session of a resumed run
    segments = renewal_segments(frames["stable"], times, start_frames, restarts) if config.renewal else None
    return SimulationResult(times, frames["positions"], frames["deviations"], stable_time, failed_flags,
                            np.asarray(frames["stable"]), R * n_checks * steps / total_wall, total_wall,
                            engine.platform_name, frames.arrays.get("velocities"),
                            v_steps * config.engine.timestep_ps if v_steps else None, segments)


def occupied_mae(curve, other, reference) -> float:
    """Mean |curve - other| over the bins `reference` occupies (reference > 0): for a
    molecule's h(r) the distances it has at all (73 of 200 bins to 10 A for ethanol), so
    the empty bins beyond the molecule's size do not dilute an error 2-3x."""
    occupied = np.asarray(reference) > 0
    if not occupied.any():
        return math.nan
    return float(np.abs(np.asarray(curve) - np.asarray(other))[occupied].mean())


def hr_comparison(result: SimulationResult, dataset: QMDataset, reference: Optional[QMDataset],
                  config: SimulationConfig, reference_b: Optional[QMDataset] = None) -> dict:
    """h(r) over stable frames against the reference (reweighted to the run temperature).

    ``hr_mae`` averages over all bins, as every published table did (kept for
    continuity); ``hr_mae_occupied`` over the bins the reference occupies (`occupied_mae`).
    The reference's own noise on those bins, to read both against: with `reference_b` (a
    second independent chain, reweighted the same way) ``hr_noise_mae``, the MAE between
    the two references; without, ``hr_noise_mae_split_half``, the MAE between the first
    and second half of the reference frames (contiguous), scaled by 1/sqrt(2) to the
    full length (variance ~ 1/frames). The halves of one chain share its slow motions,
    so the split half underestimates the noise of a correlated chain: a lower bound."""
    T = config.engine.temperature_K
    obs = HrObservable(r_max=config.hr_r_max, n_bins=config.hr_bins)
    stable = result.positions[result.stable_mask]  # (K, N, 3)
    out = {"r": obs.bin_centres.numpy()}
    if stable.shape[0]:
        out["model"] = obs(torch.as_tensor(stable, dtype=torch.float64)).mean(0).numpy()
    if reference is None:
        return out
    ref, ess = reference_from_dataset(obs, reference, T)
    out["reference"], out["reference_ess"] = ref.numpy(), ess
    out["hr_occupied_bins"] = int((out["reference"] > 0).sum())
    if "model" in out:
        out["hr_mae"] = float(np.abs(out["model"] - out["reference"]).mean())
        out["hr_mae_occupied"] = occupied_mae(out["model"], out["reference"], out["reference"])
    if reference_b is not None:
        out["reference_b"] = reference_from_dataset(obs, reference_b, T)[0].numpy()
        out["hr_noise_mae"] = occupied_mae(out["reference_b"], out["reference"], out["reference"])
    elif len(reference) >= 4:
        half = len(reference) // 2
        first, second = (reference_from_dataset(obs, reference.subset(np.arange(a, a + half)), T)[0].numpy()
                         for a in (0, half))
        out["hr_noise_mae_split_half"] = occupied_mae(first, second, out["reference"]) / math.sqrt(2.0)
    return out


def _rdf_observable(pair, dataset: QMDataset, config: SimulationConfig) -> RdfObservable:
    """The comparison's RDF of one pair: a plain histogram up to min(rdf_r_max, half box)."""
    r_max = min(config.rdf_r_max, half_box_width(dataset.box))
    return RdfObservable(pair=pair, r_max=r_max, n_bins=config.rdf_bins, sigma=0.0)


def rdf_target_curves(dataset: QMDataset, config: SimulationConfig, tables: Optional[dict]) -> dict:
    """{pair label: target g(r) (n_bins,)}: each table ({'O-O': path}, `openmm_stable.targets`)
    mapped onto the bins of `rdf_comparison`; InputError before any simulation."""
    from openmm_stable.targets import map_curve, pair_key, read_table

    if not tables:
        return {}
    if not dataset.periodic:
        raise InputError(f"an RDF target (--rdf-target) is compared with the element-pair RDFs of a periodic box; "
                         f"{dataset.source} has no box")
    pairs = {pair_key(pair_label(p)): p for p in element_pair_list(dataset.atomic_numbers)}
    curves = {}
    for given, path in tables.items():
        pair = pairs.get(pair_key(given))
        if pair is None:
            raise InputError(f"RDF target for pair {given!r}: this system's pairs are "
                             f"{', '.join(pair_label(p) for p in pairs.values())}")
        label = pair_label(pair)
        if label in curves:
            raise InputError(f"two RDF targets for the pair {label}")
        obs = _rdf_observable(pair, dataset, config)
        target = map_curve(read_table(path), obs.bin_centres.numpy(), [label], "rdf")
        curves[label] = {"values": target.values.numpy(), "source": target.table.source,
                         "sha256": target.table.sha256, "sigma_given": target.weights is not None}
    return curves


def rdf_comparison(result: SimulationResult, dataset: QMDataset, reference: Optional[QMDataset],
                   config: SimulationConfig, chunk: int = 64, targets: Optional[dict] = None) -> dict:
    """Element-pair g(r) over stable frames against the reference, and their MAE per pair;
    with `targets` (`rdf_target_curves`), also against each target table (``rdf_target_mae``).

    Plain histograms (sigma = 0, mdtraj's normalisation) up to min(rdf_r_max, half box)."""
    stable = result.positions[result.stable_mask]  # (K, N, 3)
    out: dict = {"pairs": [], "rdf_mae": {}, "rdf_target_mae": {}}
    targets = targets or {}
    for pair in element_pair_list(dataset.atomic_numbers):
        label = pair_label(pair)
        obs = _rdf_observable(pair, dataset, config)
        out["r"] = obs.bin_centres.numpy()
        out["pairs"].append(label)
        if stable.shape[0]:
            total = sum(obs(torch.as_tensor(stable[k:k + chunk], dtype=torch.float64), dataset.atomic_numbers,
                            dataset.box).sum(0) for k in range(0, stable.shape[0], chunk))
            out[f"model_{label}"] = (total / stable.shape[0]).numpy()
        if reference is not None:
            ref, ess = reference_from_dataset(obs, reference, config.engine.temperature_K)
            out[f"reference_{label}"], out["reference_ess"] = ref.numpy(), ess
            if f"model_{label}" in out:
                out["rdf_mae"][label] = float(np.abs(out[f"model_{label}"] - out[f"reference_{label}"]).mean())
        if label in targets:
            out[f"target_{label}"] = targets[label]["values"]
            if f"model_{label}" in out:
                out["rdf_target_mae"][label] = float(np.abs(out[f"model_{label}"] - out[f"target_{label}"]).mean())
    return out


def diffusivity_target_error(diffusivity_A2_per_ps: Optional[float], target) -> dict:
    """The model's (Einstein) diffusivity against a scalar target (`openmm_stable.targets.
    ScalarTarget`, A^2/ps), in cm^2/s like the other diffusivities of metrics.json: the
    error, relative error and, with the target's sigma, the error in sigmas (z)."""
    c = A2_PER_PS_IN_CM2_PER_S
    out = {"target_cm2_per_s": target.value * c, "sigma_cm2_per_s": None if target.sigma is None else target.sigma * c,
           "given": target.given, "error_cm2_per_s": None, "relative_error": None, "z": None}
    if diffusivity_A2_per_ps is not None:
        error = diffusivity_A2_per_ps - target.value
        out.update({"error_cm2_per_s": error * c, "relative_error": error / target.value,
                    "z": None if target.sigma is None else error / target.sigma})
    return out


def diffusivity_comparison(result: SimulationResult, dataset: QMDataset, reference: Optional[QMDataset],
                           config: SimulationConfig, min_frames: int = 10) -> dict:
    """Diffusivity of the model (each stable part of a segment, `stable_runs`, lags up to
    half of it, mean weighted by length; "diffusivity_replicas" counts the parts) and of
    the reference trajectory (lags up to half the run time, like a replica stable to the
    end); A^2/ps. The reference needs regularly spaced times and the run's temperature
    (dynamics cannot be reweighted)."""
    molecules, masses = molecule_ids(dataset), masses_amu(dataset.atomic_numbers)
    dt = config.steps_per_check * config.engine.timestep_ps
    out: dict = {}
    values, weights = [], []
    for k, a, b in stable_runs(result.stable_mask):
        n = b - a
        if n < min_frames:
            continue
        values.append(molecular_diffusivity(result.positions[a:b, k], dataset.box, dt, molecules, masses, n // 2))
        weights.append(n)
    if values:
        out["diffusivity"] = float(np.average(values, weights=weights))
        out["diffusivity_replicas"] = len(values)
    dt_ref = regular_time_step(reference, config.engine.temperature_K)
    if dt_ref is not None and len(reference) >= 2 * min_frames:
        lag = min(len(reference) // 2, max(2, round(0.5 * config.n_checks * dt / dt_ref)))
        out["reference_diffusivity"] = molecular_diffusivity(reference.positions, reference.box, dt_ref,
                                                             molecules, masses, lag)
    return out


def vacf_comparison(result: SimulationResult, dataset: QMDataset, reference: Optional[QMDataset],
                    config: SimulationConfig) -> dict:
    """VACF of the stable parts: all atoms (normalised, C(t)/C(0)), its first minimum, and
    for a periodic box the Green-Kubo self-diffusivity of molecular centres of mass (A^2/ps).

    A reference with velocities at the run's temperature gives its own normalised curve at
    its spacing, and `vacf_mae`, the mean |model - reference| at the reference's lags
    (t > 0) when its spacing is a multiple of ours; its first minimum and diffusivity only
    when its spacing resolves them (<= VACF_MAX_REFERENCE_INTERVAL_PS)."""
    out: dict = {}
    if result.velocities is None:
        return out
    dt = float(result.velocity_interval_ps)
    max_lag = max(1, round(config.vacf_max_lag_ps / dt))
    per = result.velocities_per_check
    segments = [result.velocities[a * per:b * per, k] for k, a, b in stable_runs(result.stable_mask)
                if (b - a) * per >= 4]
    periodic = dataset.periodic
    if periodic:
        molecules, masses = molecule_ids(dataset), masses_amu(dataset.atomic_numbers)
    if segments:
        c = vacf_over_segments(segments, max_lag)
        out["lag_ps"], out["model"] = np.arange(len(c)) * dt, c / c[0]
        k = first_minimum(out["model"])
        out["first_minimum_ps"] = None if k is None else k * dt
        if periodic:
            c_mol = vacf_over_segments([molecular_velocities(v, molecules, masses) for v in segments], max_lag)
            out["model_molecular"] = c_mol
            out["diffusivity"] = green_kubo_diffusivity(c_mol, dt)
    if reference is None or reference.velocities is None or len(reference) < 8:
        return out
    dt_ref = regular_time_step(reference, config.engine.temperature_K)
    if dt_ref is None:
        return out
    c_ref = vacf_over_segments([reference.velocities], max(1, round(config.vacf_max_lag_ps / dt_ref)))
    out["reference_lag_ps"], out["reference"] = np.arange(len(c_ref)) * dt_ref, c_ref / c_ref[0]
    ratio = dt_ref / dt
    if "model" in out and ratio >= 1 and abs(ratio - round(ratio)) < 1e-6:
        model_at_ref = out["model"][::round(ratio)]
        n = min(len(model_at_ref), len(out["reference"]))
        if n > 1:
            out["vacf_mae"] = float(np.abs(model_at_ref[1:n] - out["reference"][1:n]).mean())
    if dt_ref <= VACF_MAX_REFERENCE_INTERVAL_PS:
        k = first_minimum(out["reference"])
        out["reference_first_minimum_ps"] = None if k is None else k * dt_ref
        if periodic:
            c_ref_mol = vacf_over_segments([molecular_velocities(reference.velocities, molecules, masses)],
                                           max(1, round(config.vacf_max_lag_ps / dt_ref)))
            out["reference_diffusivity"] = green_kubo_diffusivity(c_ref_mol, dt_ref)
    return out


def stability_metrics(stable_time_ps, failed, horizon_ps: float, segments: Optional[dict] = None) -> dict:
    """The stability numbers of metrics.json (and of a partial run's progress.json): stable
    times with their event flags, the fraction that never failed, the Kaplan-Meier median
    (None when more than half outlived the horizon) and failures per replica-ps.

    With a renewal run's `segments` (`renewal_segments`) the failures and the exposure
    are those of every segment (R x horizon replica-ps), while the stable times, flags,
    median and stable fraction stay those of the first segments, comparable with frozen
    runs; `restarts_from_reused_frames` counts restarts from a frame used before."""
    from openmm_stable.statistics import failure_rate, km_median

    times = np.asarray(stable_time_ps, dtype=float)
    failed = np.asarray(failed, dtype=bool)
    if segments is None:
        rate = failure_rate(times, failed)
    else:
        rate = failure_rate(np.subtract(segments["end_ps"], segments["start_ps"]), segments["failed"])
    out = {
        "stable_time_ps": times.tolist(),
        "failed": failed.tolist(),
        "median_stable_time_ps": km_median(times, failed, horizon_ps),
        "stable_fraction": float(1.0 - failed.mean()),
        "failures": rate["failures"],
        "replica_ps": rate["replica_ps"],
        "failure_rate_per_ps": rate["rate_per_ps"],
    }
    if segments is not None:
        n = len(segments["start_frame"])
        out.update({"renewal": True, "restarts": n - times.size, "segments": segments,
                    "restarts_from_reused_frames": n - len(set(segments["start_frame"]))})
    return out


def check_molecules(dataset: QMDataset, reference: Optional[QMDataset] = None,
                    model_atomic_numbers: Optional[np.ndarray] = None, model_bonds: Optional[np.ndarray] = None) -> None:
    """Raise InputError when the reference data (h(r) is only comparable for the same
    molecule) or the molecule a model file records it was trained on is another molecule
    than the dataset's: another formula or another bond graph (atom order may differ: both
    are permutation invariant; `molecule_difference`). A model file without bonds is
    compared by formula only."""
    from openmm_stable.data.dataset import molecule_difference
    from openmm_stable.geometry import find_bonds

    z = np.asarray(dataset.atomic_numbers)
    here = f"the dataset {dataset.source} ({len(z)} atoms, {hill_formula(z)})"
    bonds = find_bonds(z, dataset.positions[0], box=dataset.box)
    if reference is not None:
        zr = np.asarray(reference.atomic_numbers)
        differs = molecule_difference(zr, z, find_bonds(zr, reference.positions[0], box=reference.box), bonds)
        if differs:
            raise InputError(f"reference {reference.source} ({reference.n_atoms} atoms) is another molecule than "
                             f"{here} ({differs}); h(r) can only be compared for the same molecule")
    if model_atomic_numbers is not None:
        zm = np.asarray(model_atomic_numbers).reshape(-1)
        differs = molecule_difference(zm, z, model_bonds, bonds)
        if differs:
            raise InputError(f"the model was trained on {len(zm)} atoms, another molecule than {here} ({differs})")


def simulate(model: nn.Module, dataset: QMDataset, config: SimulationConfig, out_dir,
             reference: Optional[QMDataset] = None, test_set: Optional[QMDataset] = None,
             progress: bool = True, resume: bool = False, overwrite: bool = False,
             on_chunk: Optional[Callable[[int], None]] = None, reference_b: Optional[QMDataset] = None,
             rdf_targets: Optional[dict] = None, diffusivity_target=None) -> dict:
    """Run, then write metrics.json, plots and (optionally) trajectories to `out_dir`.

    Frames stream to ``out_dir/frames`` and progress.json holds the stable times so far
    (`run_replicas`), so a killed run keeps its numbers and `resume` continues it (same
    settings, model and dataset, else InputError). A folder that already holds a run is
    refused unless `resume` or `overwrite`. With a labelled `test_set`, the model's
    energy/force errors on it are stored too, so one file holds stability, observables
    and accuracy. `reference_b`, a second independent reference chain of the molecule,
    gives the h(r) noise band (`hr_comparison`). `rdf_targets` ({'O-O': table path}) and
    `diffusivity_target` (a `ScalarTarget`) add comparisons with a user's targets
    (`openmm_stable.targets`; periodic data). Every file is written atomically."""
    from openmm_stable import report
    from openmm_stable.temperature import with_sampling_temperature

    check_molecules(dataset, reference)
    target_curves = rdf_target_curves(dataset, config, rdf_targets)  # bad tables fail before the run
    if diffusivity_target is not None and not dataset.periodic:
        raise InputError(f"a diffusivity target is compared with the molecular diffusivity of a periodic box; "
                         f"{dataset.source} has no box")
    if reference_b is not None:
        if reference is None or dataset.periodic:
            raise InputError("a second reference (--reference-b) gives the h(r) noise band of a molecule: it needs "
                             "a reference and non-periodic data")
        check_molecules(dataset, reference_b)
    engine, reference = settle_temperatures(config.engine, dataset, reference, config.reference_temperature_K)
    if reference_b is not None:
        reference_b = with_sampling_temperature(reference_b, engine.temperature_K, config.reference_temperature_K)
    config = dataclasses.replace(config, engine=engine)
    out = Path(out_dir)
    identity = run_identity(model, dataset, config)
    resume_from = prepare_run_folder(out, identity, resume=resume, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    kind = resolve_stability(config.stability, dataset)
    result = run_replicas(model, dataset, config, progress=progress, out_dir=out, resume_from=resume_from,
                          identity=identity, on_chunk=on_chunk)
    metrics = {
        "n_replicas": config.n_replicas,
        "time_ps": float(result.times_ps[-1]),
        "temperature_K": config.engine.temperature_K,
        "timestep_fs": config.engine.timestep_fs,
        "integrator": config.engine.integrator,
        "stability": kind,
    }
    if kind == "bonds":
        metrics["bond_threshold_A"] = config.bond_threshold
    else:
        metrics["min_distance_threshold_A"] = config.min_distance_threshold
    metrics.update(stability_metrics(result.stable_time_ps, result.failed, metrics["time_ps"], result.segments))
    metrics.update({
        "replica_steps_per_s": result.replica_steps_per_s,
        "wall_time_s": result.wall_time_s,
        "platform": result.platform,
    })
    if dataset.periodic:
        metrics.update(_periodic_observables(result, dataset, reference, config, out, target_curves,
                                             diffusivity_target))
    else:
        hr = hr_comparison(result, dataset, reference, config, reference_b)
        metrics.update({k: hr[k] for k in ("hr_mae", "hr_mae_occupied", "hr_occupied_bins", "hr_noise_mae",
                                           "hr_noise_mae_split_half", "reference_ess") if k in hr})
        curves = {k: hr[k] for k in ("model", "reference") if k in hr}
        if curves:
            report.plot_curves(hr["r"], curves, out / "hr.png", "r (A)", "h(r) (1/A)")
        _savez(out / "hr.npz", {k: v for k, v in hr.items() if isinstance(v, np.ndarray)})
    metrics.update(_vacf_outputs(result, dataset, reference, config, out))
    if test_set is not None:
        from openmm_stable.training.batching import evaluate

        errors = evaluate(model, test_set)
        metrics.update({k: errors[k] for k in ("energy_mae_meV", "force_mae_meV_per_A", "force_rmse_meV_per_A")})
    atomic_write_json(out / "metrics.json", metrics)
    report.plot_survival({"model": (result.stable_time_ps, result.failed)}, metrics["time_ps"], out / "survival.png")
    if kind == "bonds":
        report.plot_bond_deviation(result.times_ps, result.deviations, config.bond_threshold, out / "bond_deviation.png")
    else:
        what = "intermolecular" if kind == "min_distance" else "non-bonded"
        report.plot_bond_deviation(result.times_ps, result.deviations, config.min_distance_threshold,
                                   out / "min_distance.png", ylabel=f"min {what} distance (A)")
    if config.write_trajectories:
        write_trajectories(out / "trajectories", dataset.atomic_numbers, result)
    return metrics


def _periodic_observables(result: SimulationResult, dataset: QMDataset, reference: Optional[QMDataset],
                          config: SimulationConfig, out: Path, target_curves: Optional[dict] = None,
                          diffusivity_target=None) -> dict:
    """RDF errors per element pair and diffusivities (cm^2/s) for metrics.json, against the
    reference and any user targets; writes rdf.npz and rdf.png."""
    from openmm_stable import report

    rdfs = rdf_comparison(result, dataset, reference, config, targets=target_curves)
    metrics: dict = {}
    if rdfs["rdf_mae"]:
        metrics["rdf_mae"] = rdfs["rdf_mae"]
        metrics["rdf_mae_mean"] = float(np.mean(list(rdfs["rdf_mae"].values())))
        metrics["reference_ess"] = rdfs["reference_ess"]
    if target_curves:
        metrics["rdf_target_mae"] = rdfs["rdf_target_mae"]
        metrics["rdf_target"] = {label: {k: v for k, v in t.items() if k != "values"}
                                 for label, t in target_curves.items()}
    diff = diffusivity_comparison(result, dataset, reference, config)
    if diffusivity_target is not None:
        metrics["diffusivity_target_error"] = diffusivity_target_error(diff.get("diffusivity"), diffusivity_target)
    for key in ("diffusivity", "reference_diffusivity"):
        if key in diff:
            metrics[f"{key}_cm2_per_s"] = diff[key] * A2_PER_PS_IN_CM2_PER_S
    if "diffusivity_replicas" in diff:
        metrics["diffusivity_replicas"] = diff["diffusivity_replicas"]
    if "diffusivity" in diff and diff.get("reference_diffusivity"):
        metrics["diffusivity_relative_error"] = diff["diffusivity"] / diff["reference_diffusivity"] - 1.0
    curves = {label: {name: rdfs[f"{name}_{label}"] for name in ("model", "reference", "target")
                      if f"{name}_{label}" in rdfs}
              for label in rdfs["pairs"]}
    if any(curves.values()):
        report.plot_rdfs(rdfs["r"], curves, out / "rdf.png")
    _savez(out / "rdf.npz", {k: v for k, v in rdfs.items() if isinstance(v, np.ndarray)})
    return metrics


def _vacf_outputs(result: SimulationResult, dataset: QMDataset, reference: Optional[QMDataset],
                  config: SimulationConfig, out: Path) -> dict:
    """VACF summary for metrics.json; writes vacf.npz, vacf.csv and vacf.png."""
    from openmm_stable import report

    v = vacf_comparison(result, dataset, reference, config)
    if not v:
        return {}
    metrics: dict = {"vacf_interval_ps": result.velocity_interval_ps}
    names = {"first_minimum_ps": "vacf_first_minimum_ps", "reference_first_minimum_ps": "reference_vacf_first_minimum_ps",
             "vacf_mae": "vacf_mae"}
    metrics.update({name: v[key] for key, name in names.items() if key in v})
    for key, name in (("diffusivity", "vacf_diffusivity_cm2_per_s"),
                      ("reference_diffusivity", "reference_vacf_diffusivity_cm2_per_s")):
        if key in v:
            metrics[name] = v[key] * A2_PER_PS_IN_CM2_PER_S
    _savez(out / "vacf.npz", {k: np.asarray(x) for k, x in v.items() if isinstance(x, np.ndarray)})
    if "model" in v:
        from openmm_stable.io import write_csv

        ref = dict(zip(np.round(v.get("reference_lag_ps", []), 9), v.get("reference", [])))
        rows = [{"lag_ps": f"{t:.6g}", "model": f"{c:.6g}", "reference": ref.get(round(t, 9))}
                for t, c in zip(v["lag_ps"], v["model"])]
        write_csv(out / "vacf.csv", rows, ["lag_ps", "model", "reference"])
    series = {name: (v[lag], v[name]) for name, lag in (("model", "lag_ps"), ("reference", "reference_lag_ps"))
              if name in v}
    if series:
        report.plot_series(series, out / "vacf.png", "t (ps)", "VACF C(t)/C(0), all atoms")
    return metrics


def _savez(path: Path, arrays: dict) -> None:
    """np.savez_compressed, atomically (a kill leaves the old file or the new one)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


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
            with atomic_path(folder / "topology.pdb") as tmp:
                traj[0].save_pdb(str(tmp))
        path = folder / f"replica_{k:03d}.dcd"
        with atomic_path(path) as tmp:
            traj.save_dcd(str(tmp))
        paths.append(path)
    return paths


def summary(metrics: dict) -> str:
    """A few lines for the terminal."""
    renewal = metrics.get("renewal")
    lines = [
        f"replicas: {metrics['n_replicas']}  time: {metrics['time_ps']:.2f} ps  T: {metrics['temperature_K']} K"
        + ("  (renewal: failed replicas restart from fresh frames)" if renewal else ""),
        f"median stable time{' (first segments)' if renewal else ''}: "
        f"{_fmt_median(metrics['median_stable_time_ps'], metrics['time_ps'])}  "
        f"stable fraction: {metrics['stable_fraction']:.2f}  failures: {metrics['failures']} in "
        f"{metrics['replica_ps']:.3g} replica-ps" + (f" ({metrics['restarts']} restarts)" if renewal else ""),
        f"throughput: {metrics['replica_steps_per_s']:.0f} replica-steps/s",
    ]
    if "hr_mae" in metrics:
        lines.append(hr_summary(metrics))
    if "rdf_mae" in metrics:
        pairs = "  ".join(f"{k} {v:.4f}" for k, v in metrics["rdf_mae"].items())
        lines.append(f"RDF MAE vs reference: {pairs} (reference ESS {metrics['reference_ess']:.0f})")
    if "rdf_target_mae" in metrics:
        pairs = "  ".join(f"{k} {v:.4f}" for k, v in metrics["rdf_target_mae"].items())
        lines.append(f"RDF MAE vs target table: {pairs or 'no stable frames'}")
    if "diffusivity_target_error" in metrics:
        t = metrics["diffusivity_target_error"]
        lines.append(f"diffusivity target {t['target_cm2_per_s']:.3g} cm^2/s"
                     + (f" +- {t['sigma_cm2_per_s']:.2g}" if t["sigma_cm2_per_s"] is not None else "")
                     + (f": relative error {t['relative_error']:+.2f}" if t["relative_error"] is not None else "")
                     + (f" ({t['z']:+.1f} sigma)" if t["z"] is not None else ""))
    if "diffusivity_cm2_per_s" in metrics:
        ref = metrics.get("reference_diffusivity_cm2_per_s")
        lines.append(f"diffusivity: {metrics['diffusivity_cm2_per_s']:.3g} cm^2/s"
                     + (f" (reference {ref:.3g})" if ref is not None else ""))
    if "vacf_interval_ps" in metrics:
        parts = [f"VACF first minimum: {_fmt_ps(metrics.get('vacf_first_minimum_ps'))}"]
        if "reference_vacf_first_minimum_ps" in metrics:
            parts.append(f"(reference {_fmt_ps(metrics['reference_vacf_first_minimum_ps'])})")
        if "vacf_mae" in metrics:
            parts.append(f" MAE vs reference {metrics['vacf_mae']:.3f}")
        if "vacf_diffusivity_cm2_per_s" in metrics:
            parts.append(f" Green-Kubo D {metrics['vacf_diffusivity_cm2_per_s']:.3g} cm^2/s")
        lines.append(" ".join(parts))
    if "force_mae_meV_per_A" in metrics:
        lines.append(f"test force MAE: {metrics['force_mae_meV_per_A']:.1f} meV/A  energy MAE: {metrics['energy_mae_meV']:.1f} meV")
    return "\n".join(lines)


def hr_summary(metrics: dict) -> str:
    """The h(r) line: the MAE over all bins (the published tables' number), over the bins
    the reference occupies, and the reference's own noise with the verdict against it."""
    line = f"h(r) MAE vs reference: {metrics['hr_mae']:.4f} 1/A over all bins (as published)"
    if "hr_mae_occupied" in metrics:
        line += f", {metrics['hr_mae_occupied']:.4f} over the {metrics['hr_occupied_bins']} occupied"
    line += f" (reference ESS {metrics['reference_ess']:.0f})"
    for key, what in (("hr_noise_mae", "second chain"), ("hr_noise_mae_split_half", "split half, a lower bound")):
        if key in metrics and "hr_mae_occupied" in metrics:
            within = metrics["hr_mae_occupied"] <= metrics[key]
            line += (f"; reference noise {metrics[key]:.4f} ({what}): "
                     + ("within the reference noise" if within else "beyond the reference noise"))
    return line


def _fmt_median(median, horizon_ps: float) -> str:
    """The Kaplan-Meier median, or "> horizon" when more than half of the replicas outlived it."""
    return f"> {horizon_ps:.2f} ps" if median is None else f"{median:.2f} ps"


def _fmt_ps(value) -> str:
    return "none" if value is None else f"{value:.3g} ps"

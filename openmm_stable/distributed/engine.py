"""`DistributedReplicaEngine`: the replica engine's interface over Ray worker processes.

R replicas are split into contiguous shares, one per worker (`config.workers` Ray actors,
each an ordinary `ReplicaEngine` with one Context; `openmm_stable.distributed.worker`).
The driver (the process running `simulate` or `refine`) keeps everything else: the
stability criterion and the failure policy of `run_checked` run here on the gathered
frame, so a reset or a learning step sees exactly what the single-process engine shows it.

What crosses the wire, per call:

* `run_checked`: one call per worker and frame (the worker steps `steps_per_frame`, then
  answers with its positions, velocities and Nose-Hoover chain states); the driver waits
  for all workers at once, so they step in parallel.
* `update_model`: the new weights go into Ray's object store ONCE (`ray.put`), and every
  worker gets the same reference; on one node they read it from shared memory.
* `set_states`/`reset_replicas`: each worker gets only its replicas' arrays. Velocities
  that are drawn (Maxwell-Boltzmann) are drawn here, per replica index, so replica k's
  velocities do not depend on the number of workers.

Same science: with Nose-Hoover (deterministic), replica k follows the same trajectory with
one or several workers, to the tolerance that a batched and a per-replica layout already
agree to (tests/test_distributed.py). Langevin runs are equally valid but draw other
random numbers (the stream lives in each Context).

Faults: the driver keeps, per worker, the snapshot of the last frame (states, thermostat
chains, the weights then in force) and the calls made since. A call that finds its worker
dead (killed, crashed, its node gone) starts a new worker in its place, puts it into that
snapshot, replays those calls and runs the call again (up to `MAX_RESTARTS` times per
worker; the driver does this rather than Ray's ``max_restarts``, which would restart the
process but not its state). With
Nose-Hoover the run continues as if nothing had happened (a Langevin worker draws new
noise). When restarts are used up the run stops with `WorkerLostError`; `refine --resume`
then continues from the last epoch's checkpoint. No call waits longer than `call_timeout_s`
(`CALL_TIMEOUT_S`): a worker that hangs stops the run with `WorkerTimeoutError`, naming the
worker and the call. Both are `errors.WorkerError` (a RuntimeError: not bad input).

>>> engine = DistributedReplicaEngine(model, z, 128, EngineConfig(workers=2))  # doctest: +SKIP
>>> engine.set_states(starts)                      # (R, N, 3) Angstrom, as ReplicaEngine
>>> engine.run_checked(100, 200, criterion, on_frame)
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import numpy as np
from torch import nn

from openmm_stable.distributed.cluster import connect, replica_shares, worker_resources
from openmm_stable.distributed.worker import engine_config_dict, remote_worker_class
from openmm_stable.engine import (EngineConfig, checked_frame, kinetic_temperature, maxwell_boltzmann,
                                  set_replica_system)
from openmm_stable.errors import InputError, WorkerError

MAX_RESTARTS = 3  # per worker: a dead worker is replaced this often, then the run stops
START_TIMEOUT_S = 600.0  # workers import torch and OpenMM and build a Context: seconds, not minutes
# Longest wait for any one call to the workers (a frame, a weight update, a state transfer);
# past it the worker is taken to hang and the run stops rather than blocking for ever. A
# frame of many replicas on a slow CPU takes tens of seconds; give `call_timeout_s` for more.
CALL_TIMEOUT_S = 600.0


class WorkerLostError(WorkerError):
    """A worker died and could not be brought back: not bad input, a failure of the
    cluster; the command line prints the message (what happened, what to do) and exits
    with its worker-failure code."""


class WorkerTimeoutError(WorkerLostError):
    """A worker did not answer a call within the engine's `call_timeout_s` (a hung process
    or node); the message names the worker and the call."""


class DistributedReplicaEngine:
    """`ReplicaEngine`'s interface; replicas on `config.workers` Ray actors (see module doc).

    `model` is shipped to the workers once through the object store; later weights go out
    through `update_model`. The engine's workers end with it (`close`, or when it is
    garbage-collected)."""

    def __init__(self, model: nn.Module, atomic_numbers: Sequence[int], n_replicas: int,
                 config: Optional[EngineConfig] = None, box_angstrom: Optional[np.ndarray] = None,
                 threads_per_worker: Optional[int] = None, seed: int = 0,
                 call_timeout_s: Optional[float] = None):
        """`threads_per_worker`: CPU threads (and cores asked of Ray) per worker on a CPU
        platform; default: an equal share of the cluster's cores. `seed`: as `ReplicaEngine`'s.
        `call_timeout_s`: the longest wait for one call to the workers (default `CALL_TIMEOUT_S`)."""
        self.call_timeout_s = float(CALL_TIMEOUT_S if call_timeout_s is None else call_timeout_s)
        if not self.call_timeout_s > 0:
            raise InputError(f"call_timeout_s must be positive, got {call_timeout_s!r}")
        set_replica_system(self, model, atomic_numbers, n_replicas, config, box_angstrom)
        self.seed = int(seed)
        self.workers = int(self.config.workers)
        self.shares = replica_shares(self.n_replicas, self.workers)
        self.steps_done = 0
        self.restarts = 0  # workers brought back after a fault
        self.last_gather_bytes = 0  # what the last frame or get_states brought back (arrays and chains)
        self.ray = connect(self.config.ray_address)
        self.platform_name, options, self.threads_per_worker = worker_resources(self.ray, self.workers,
                                                                                self.config.platform)
        if threads_per_worker is not None and "num_gpus" not in options:
            self.threads_per_worker = int(threads_per_worker)
            options = {"num_cpus": self.threads_per_worker}
        self._model_type = type(model)
        self._model_keys = list(model.state_dict())
        # Once for all workers, and kept here: a worker started again after a fault reads it too.
        self._model_ref = self.ray.put(copy.deepcopy(model).cpu())
        self._actor_class = remote_worker_class().options(max_restarts=0, max_task_retries=0, **options)
        # The last model update as (worker method, object ref); None: the shipped model as it is.
        self._model_update: Optional[tuple[str, object]] = None
        self._actors = [self._start_worker(i) for i in range(self.workers)]
        self.worker_info = [self._wait_until_started(i) for i in range(self.workers)]
        # Per worker: the last snapshot (positions, velocities, thermostat chains, the model
        # update then in force) and the calls made since; enough to rebuild a worker.
        self._snapshots: list[Optional[tuple]] = [None] * self.workers
        self._since_snapshot: list[list[tuple]] = [[] for _ in range(self.workers)]
        self._restarts_of = [0] * self.workers

    # --- start and faults ---------------------------------------------------------------------
    def _start_worker(self, i: int):
        share = self.shares[i]
        # The model's reference travels inside a list, so the worker reads the stored object
        # itself and can report a model it cannot unpickle (e.g. its code is not installed
        # on that node) as its own start error.
        return self._actor_class.remote([self._model_ref], self.atomic_numbers.tolist(), share.stop - share.start,
                                        engine_config_dict(self.config, self.platform_name,
                                                           self.seed + share.start),
                                        self.box_angstrom, self.threads_per_worker)

    def _wait_until_started(self, i: int) -> dict:
        """Worker `i`'s `ready()`; a worker that cannot start is an error before any step."""
        from ray.exceptions import GetTimeoutError, RayError

        where = f"worker {i} (replicas {self.shares[i].start}-{self.shares[i].stop - 1}, platform {self.platform_name})"
        try:
            info = self.ray.get(self._actors[i].ready.remote(), timeout=START_TIMEOUT_S)
        except GetTimeoutError:
            self.close()
            raise InputError(f"distributed engine: {where} did not start within {START_TIMEOUT_S:g} s; the cluster "
                             f"may lack the resources it asks for (cluster: {self.ray.cluster_resources()})") from None
        except RayError as err:  # the process died before the engine could report
            self.close()
            raise InputError(f"distributed engine: {where} could not start: {_cause(err)}") from None
        if "error" in info:
            self.close()
            raise InputError(f"distributed engine: {where} on {info['host']} could not start: "
                             f"{_shorten(info['error'])}")
        return info

    def _recover(self, i: int, err: Exception) -> None:
        """Worker `i` died during a call: start a new one in its place and rebuild its state
        (the snapshot, the model update then in force, the calls since); or, after
        `MAX_RESTARTS`, stop the run with a clear message."""
        if self._restarts_of[i] >= MAX_RESTARTS:
            raise self._lost(i, f"was restarted {MAX_RESTARTS} times already ({_cause(err)})") from err
        self._restarts_of[i] += 1
        self.restarts += 1
        try:
            self.ray.kill(self._actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._actors[i] = actor = self._start_worker(i)
        try:
            self.worker_info[i] = self._wait_until_started(i)
        except InputError as start_error:
            raise self._lost(i, f"could not be started again ({start_error})") from err
        snapshot = self._snapshots[i]
        if snapshot is not None:
            positions, velocities, thermostats, model_update = snapshot
            if model_update is not None:
                method, ref = model_update
                self._get(i, method, getattr(actor, method).remote(ref))
            self._get(i, "restore", actor.restore.remote(positions, velocities, thermostats))
        for method, args in self._since_snapshot[i]:
            self._get(i, method, getattr(actor, method).remote(*args))

    def _get(self, i: int, method: str, ref):
        """Worker `i`'s answer to `method`, waiting at most `call_timeout_s`."""
        from ray.exceptions import GetTimeoutError

        try:
            return self.ray.get(ref, timeout=self.call_timeout_s)
        except GetTimeoutError:
            raise self._timed_out([i], method) from None

    def _timed_out(self, workers: Sequence[int], method: str) -> WorkerTimeoutError:
        names = ", ".join(f"worker {i} (replicas {self.shares[i].start}-{self.shares[i].stop - 1})" for i in workers)
        return WorkerTimeoutError(f"distributed engine: {names} did not answer the call {method!r} within "
                                  f"{self.call_timeout_s:g} s (a hung worker or node?); the run stops here. A refine "
                                  "run continues from its last epoch with `refine ... --resume`; give the engine a "
                                  "larger call_timeout_s if such calls are expected to take longer")

    def _lost(self, i: int, why: str) -> WorkerLostError:
        return WorkerLostError(f"distributed engine: worker {i} (replicas {self.shares[i].start}-"
                               f"{self.shares[i].stop - 1}) died and {why}. A refine run continues from its last "
                               "epoch with `refine ... --resume`; a simulate run must be started again")

    def _call(self, method: str, args: dict[int, tuple], replay: bool = True) -> dict[int, object]:
        """Call `method` on the workers in `args` (worker -> arguments) at once and gather
        the answers. A worker that died is recovered and asked again; an exception raised
        by the worker's code is passed on. `replay`: the call changes a worker's state and
        must be replayed after a restart until the next snapshot."""
        from ray.exceptions import GetTimeoutError, RayActorError

        refs = {i: getattr(self._actors[i], method).remote(*a) for i, a in args.items()}
        try:
            results = dict(zip(refs, self.ray.get(list(refs.values()), timeout=self.call_timeout_s)))
        except GetTimeoutError:
            _, waiting = self.ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
            raise self._timed_out([i for i, ref in refs.items() if ref in waiting] or list(refs), method) from None
        except RayActorError:  # one or more workers died: bring each back and ask again
            results = {}
            for i, ref in refs.items():
                while i not in results:
                    try:
                        results[i] = self._get(i, method, ref)
                    except RayActorError as err:
                        self._recover(i, err)  # raises WorkerLostError once restarts are used up
                        ref = getattr(self._actors[i], method).remote(*args[i])
        if replay:
            for i in args:
                self._since_snapshot[i].append((method, args[i]))
        return results

    def _all(self, method: str, *args, replay: bool = True) -> list:
        results = self._call(method, {i: args for i in range(self.workers)}, replay=replay)
        return [results[i] for i in range(self.workers)]

    def _snapshot(self, i: int, positions: np.ndarray, velocities: np.ndarray, thermostats) -> None:
        self._snapshots[i] = (positions, velocities, thermostats, self._model_update)
        self._since_snapshot[i] = []

    def close(self) -> None:
        """End the workers now (they also end when the engine is garbage-collected)."""
        for actor in getattr(self, "_actors", []):
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- state ----------------------------------------------------------------------------------
    def _check_shape(self, array, name: str, n: Optional[int] = None) -> np.ndarray:
        array = np.asarray(array, dtype=np.float64)
        expected = (self.n_replicas if n is None else n, self.n_atoms, 3)
        if array.shape != expected:
            raise InputError(f"{name}: shape {array.shape}, expected {expected} (replicas, atoms, 3)")
        return array

    def set_states(self, positions: np.ndarray, velocities: Optional[np.ndarray] = None,
                   seed: Optional[int] = None) -> None:
        """As `ReplicaEngine.set_states`: velocities None are drawn at the target temperature,
        replica k from the stream (seed, k) whatever the number of workers."""
        positions = self._check_shape(positions, "positions")
        if velocities is None:
            velocities = maxwell_boltzmann(self.masses, self.config.temperature_K, self.n_replicas,
                                           self.seed if seed is None else seed)
        velocities = self._check_shape(velocities, "velocities")
        parts = {i: (positions[s], velocities[s]) for i, s in enumerate(self.shares)}
        self._call("set_states", parts, replay=False)
        for i, (pos, vel) in parts.items():
            self._snapshot(i, pos, vel, None)  # None: the fresh thermostat chains set_states gives

    def get_states(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions (R, N, 3) Angstrom and velocities (R, N, 3) Angstrom/ps."""
        snapshots = self._all("snapshot", replay=False)
        for i, (pos, vel, thermostats) in enumerate(snapshots):
            self._snapshot(i, pos, vel, thermostats)
        self.last_gather_bytes = sum(_nbytes(s) for s in snapshots)
        return np.concatenate([s[0] for s in snapshots]), np.concatenate([s[1] for s in snapshots])

    def reset_replicas(self, replicas: Sequence[int], positions: np.ndarray,
                       velocities: Optional[np.ndarray] = None, seed: int = 0) -> None:
        """As `ReplicaEngine.reset_replicas`; only the workers that own the listed replicas are called."""
        replicas = np.asarray(replicas, dtype=np.int64).reshape(-1)
        if replicas.size == 0:
            return
        if replicas.min() < 0 or replicas.max() >= self.n_replicas:
            raise InputError(f"replica indices must lie in 0..{self.n_replicas - 1}, got {replicas.tolist()}")
        positions = np.asarray(positions, dtype=np.float64).reshape(replicas.size, self.n_atoms, 3)
        if velocities is None:
            velocities = maxwell_boltzmann(self.masses, self.config.temperature_K, replicas.size, seed)
        velocities = np.asarray(velocities, dtype=np.float64).reshape(replicas.size, self.n_atoms, 3)
        parts = {}
        for i, share in enumerate(self.shares):
            mine = (replicas >= share.start) & (replicas < share.stop)
            if mine.any():
                parts[i] = (replicas[mine] - share.start, positions[mine], velocities[mine])
        self._call("reset_replicas", parts)

    # --- dynamics ---------------------------------------------------------------------------------
    def step(self, n_steps: int) -> None:
        self._all("step", int(n_steps))
        self.steps_done += int(n_steps)

    def run_checked(self, n_frames: int, steps_per_frame: int, criterion,
                    on_frame: Callable, velocity_steps: Optional[int] = None,
                    on_velocities: Optional[Callable[[np.ndarray], None]] = None) -> None:
        """As `ReplicaEngine.run_checked`: per frame, every worker steps its replicas and
        answers with its share; the criterion and `on_frame` (which may reset replicas) run
        here on the whole frame, `on_velocities` first, in time order, as in one process."""
        if velocity_steps and steps_per_frame % velocity_steps:
            raise InputError(f"velocity_steps {velocity_steps} must divide steps_per_frame {steps_per_frame}")
        for index in range(int(n_frames)):
            parts = self._all("run_frame", int(steps_per_frame), velocity_steps or None, replay=False)
            self.steps_done += int(steps_per_frame)
            for i, (pos, vel, thermostats, _) in enumerate(parts):
                self._snapshot(i, pos, vel, thermostats)
            self.last_gather_bytes = sum(_nbytes(p) for p in parts)
            if velocity_steps:
                for k in range(steps_per_frame // velocity_steps):
                    on_velocities(np.concatenate([p[3][k] for p in parts]))
            positions = np.concatenate([p[0] for p in parts])
            velocities = np.concatenate([p[1] for p in parts])
            on_frame(checked_frame(index, positions, velocities, criterion))

    @property
    def time_ps(self) -> float:
        return self.steps_done * self.config.timestep_ps

    def update_model(self, model: nn.Module) -> None:
        """New weights to every worker: one object in the store, one reference for all.
        Replicas keep their positions and velocities."""
        if type(model) is self._model_type and list(model.state_dict()) == self._model_keys:
            update = ("update_weights", self.ray.put(weights_payload(model)))
        else:  # another architecture: the whole model goes out (rare)
            update = ("replace_model", self.ray.put(copy.deepcopy(model).cpu()))
            self._model_type, self._model_keys = type(model), list(model.state_dict())
        self._all(*update)
        self._model_update = update

    def potential_energies(self) -> np.ndarray:
        """Potential energy of each worker's Context(s) (kJ/mol), in replica order."""
        return np.concatenate(self._all("potential_energies", replay=False))

    def kinetic_temperature(self, velocities: np.ndarray) -> np.ndarray:
        return kinetic_temperature(self.masses, velocities)

    def worker_pids(self) -> list[int]:
        """Process ids of the workers as they run now (e.g. to test a kill -9)."""
        return [info["pid"] for info in self._all("ready", replay=False)]


def weights_payload(model: nn.Module) -> dict:
    """A model's state dict as CPU NumPy arrays (Ray moves those without copying on one node)."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        try:
            out[key] = value.numpy()
        except TypeError:  # a dtype NumPy lacks (bfloat16): the tensor as it is
            out[key] = value
    return out


def _nbytes(value) -> int:
    """Bytes of the arrays and strings in a worker's answer (what crossed the wire, less framing)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _cause(err: Exception) -> str:
    """What Ray says about a worker that died: its message without the traceback frames."""
    lines = [line for line in str(err).splitlines() if line.strip() and not line.startswith((" ", "\t"))]
    return _shorten(lines[-1] if lines else type(err).__name__)


def _shorten(text: str, limit: int = 800) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " ..."

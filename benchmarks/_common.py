"""Shared pieces of the benchmark scripts: one thread per process, machine facts, systems,
interleaved timing and result files.

Import this module before torch/OpenMM are imported anywhere: it pins every thread pool to
one thread (the benchmark machines have 2 cores shared with other jobs, and two processes
with 2 threads each slow each other down 10-30x).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENMM_CPU_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("WARP_QUIET", "1")

import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import numpy as np  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))


def single_thread_torch() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (or parallel work started) in this process
        pass


def machine_info() -> dict:
    """What the numbers were measured on: CPU model, core count, load, library versions."""
    info = {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENMM_CPU_THREADS")},
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import openmm

        info["openmm"] = openmm.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


# --- systems -------------------------------------------------------------------------------
WATER_OH = 0.9572  # Angstrom (TIP3P geometry)
WATER_HOH = np.deg2rad(104.52)


def water_cluster(n_molecules: int = 32, spacing: float = 3.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A non-periodic cluster of `n_molecules` waters: oxygens on a cubic-ish grid `spacing`
    apart (about liquid density at 3.1 A), each molecule randomly rotated, no two atoms of
    different molecules closer than 1.6 A. Returns (atomic numbers, positions in Angstrom)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n_molecules ** (1 / 3)))
    sites = np.array([(i, j, k) for k in range(side) for j in range(side) for i in range(side)], dtype=float)
    sites = sites[:n_molecules] * spacing
    local = np.array([[0.0, 0.0, 0.0],
                      [WATER_OH, 0.0, 0.0],
                      [WATER_OH * np.cos(WATER_HOH), WATER_OH * np.sin(WATER_HOH), 0.0]])
    placed: list[np.ndarray] = []
    for site in sites:
        for _ in range(1000):
            q, r = np.linalg.qr(rng.standard_normal((3, 3)))
            rot = q * np.sign(np.diag(r))
            mol = local @ rot.T + site
            if not placed or np.min(np.linalg.norm(np.concatenate(placed)[:, None] - mol[None], axis=-1)) > 1.6:
                placed.append(mol)
                break
        else:
            raise RuntimeError("could not place a water molecule; increase the spacing")
    z = np.tile(np.array([8, 1, 1], dtype=np.int64), n_molecules)
    return z, np.concatenate(placed)


def build_system(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(atomic numbers, positions in Angstrom) of a benchmark system: a built-in molecule
    of `openmm_stable.data.molecules`, or ``waterN`` (a non-periodic cluster of N waters)."""
    if name.lower().startswith("water") and name[5:].isdigit():
        return water_cluster(int(name[5:]))
    from openmm_stable.data.molecules import build_molecule

    return build_molecule(name)


# --- timing ------------------------------------------------------------------------------------
class Runner:
    """One way of advancing R replicas. Subclasses set `n_replicas` and implement `reset`
    (put every replica back at its start state; untimed) and `run(n)` (n steps, timed)."""

    name = "runner"
    n_replicas = 1

    def reset(self, seed: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, n_steps: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def timed_run(self, n_steps: int) -> tuple[float, float, float, int]:
        """`run(n_steps)` measured by `timed_both` in the process that runs it."""
        return timed_both(lambda: self.run(n_steps))

    def close(self) -> None:
        pass


class ProcessRunner(Runner):
    """A runner built by ``factory(*args)`` in a worker process of its own and driven over a
    pipe, so that runners measured side by side share no heap. In one process, next to a
    128-Context per-replica engine, the batched engine page-faulted ~15,000 times per step
    and ran at half its rate alone (benchmarks/README.md, section 1). The worker times its
    own chunks (`timed_run`), so CPU seconds and page faults are the runner's alone; the
    worker inherits this module's one-thread settings through the environment."""

    def __init__(self, name: str, n_replicas: int, factory: Callable[..., Runner], *args):
        import multiprocessing as mp

        self.name, self.n_replicas = name, n_replicas
        ctx = mp.get_context("spawn")  # no fork of a process that holds OpenMM/torch threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_runner, args=(child, factory, args), daemon=True)
        self._proc.start()  # builds in the background; setup_s waits for it
        child.close()
        self._setup_s: float | None = None

    @property
    def setup_s(self) -> float:
        """Seconds the worker took to build its runner (imports not counted)."""
        if self._setup_s is None:
            self._setup_s = self._receive()
        return self._setup_s

    def _receive(self):
        try:
            ok, value = self._conn.recv()
        except EOFError:
            self._proc.join(timeout=10)
            raise RuntimeError(f"runner worker {self.name!r} died (exit code {self._proc.exitcode}); "
                               "out of memory?") from None
        if not ok:
            raise RuntimeError(f"runner worker {self.name!r} failed:\n{value}")
        return value

    def _call(self, command: str, *args):
        self.setup_s  # noqa: B018  (the build's answer comes first)
        self._conn.send((command, args))
        return self._receive()

    def reset(self, seed: int) -> None:
        self._call("reset", seed)

    def run(self, n_steps: int) -> None:
        self._call("run", n_steps)

    def timed_run(self, n_steps: int) -> tuple[float, float, float, int]:
        return self._call("timed_run", n_steps)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._call("close")
            except (RuntimeError, OSError):
                pass
            self._proc.join(timeout=60)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


def _serve_runner(conn, factory: Callable[..., Runner], args: tuple) -> None:
    """Worker loop of `ProcessRunner`: build, answer with the build time, then serve calls."""
    import traceback

    try:
        t0 = time.perf_counter()
        runner = factory(*args)
        conn.send((True, time.perf_counter() - t0))
        while True:
            command, call_args = conn.recv()
            result = getattr(runner, command)(*call_args)
            conn.send((True, result))
            if command == "close":
                return
    except EOFError:  # the parent went away
        return
    except BaseException:
        conn.send((False, traceback.format_exc()))


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_both(fn: Callable[[], None]) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds, system-CPU seconds, minor page faults) of one call, for
    this process."""
    import resource

    r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return wall, cpu, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt


def choose_chunk(runner: Runner, target_s: float, max_chunk: int) -> int:
    """Steps per timed chunk: about `target_s` seconds, at most `max_chunk` steps (bounded so
    that models that are not trained cannot drift far from the start between resets)."""
    runner.reset(seed=10_000)
    dt = timed(lambda: runner.run(1))
    return int(max(1, min(max_chunk, target_s / max(dt, 1e-6))))


def warm_up(runner: Runner, steps: int, max_s: float, min_steps: int = 3) -> float:
    """Run `steps` untimed steps (at least `min_steps`: TorchScript's profiling executor
    optimises a module on its first calls, per module copy, i.e. per Context), stopping early
    after `max_s` seconds for slow runners. Returns the seconds spent."""
    spent, done = 0.0, 0
    while done < min_steps or (done < steps and spent < max_s):
        spent += timed(lambda: runner.run(1))
        done += 1
    return spent


def interleaved_rates(runners: dict[str, Runner], min_time_s: float, chunk_s: float = 0.1, max_chunk: int = 20,
                      warmup_steps: int = 20, warmup_max_s: float = 5.0) -> dict[str, dict]:
    """Replica-steps per second of each runner (keyed by name), measured side by side.

    After a warm-up, the runners take turns chunk by chunk (round robin): each turn resets the
    replicas to their start states (untimed) and times one chunk of about `chunk_s` seconds
    (at least one step, at most `max_chunk`), until every runner has at least `min_time_s`
    seconds of timed steps. Load from other processes on a shared machine therefore falls on
    every runner alike. Two rates are reported: ``replica_steps_per_s`` from the median chunk
    time (robust to the moments another process takes the core) and
    ``replica_steps_per_s_mean`` (all steps / all time).
    """
    warmup = {}
    for name, runner in runners.items():  # the first steps include TorchScript's profiling and optimisation
        runner.reset(seed=20_000)
        warmup[name] = warm_up(runner, warmup_steps, warmup_max_s)
    chunks = {name: choose_chunk(r, chunk_s, max_chunk) for name, r in runners.items()}
    times: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in runners}
    seed = 0
    while any(sum(x[0] for x in t) < min_time_s for t in times.values()):
        for name, runner in runners.items():
            seed += 1
            runner.reset(seed)
            times[name].append(runner.timed_run(chunks[name]))
    stats = {}
    for name, runner in runners.items():
        wall, cpu, sys_cpu, faults = np.asarray(times[name], dtype=float).T
        work = runner.n_replicas * chunks[name]  # replica-steps per chunk
        stats[name] = {"replica_steps_per_s": float(work / np.median(wall)),
                       "replica_steps_per_s_mean": float(work * wall.size / wall.sum()),
                       "replica_steps_per_cpu_s": float(work / np.median(cpu)),
                       "chunk_rate_quartiles": [float(q) for q in np.percentile(work / wall, [25, 50, 75])],
                       "chunks": int(wall.size), "chunk_steps": chunks[name], "seconds": float(wall.sum()),
                       "cpu_seconds": float(cpu.sum()), "system_cpu_fraction": float(sys_cpu.sum() / max(cpu.sum(), 1e-12)),
                       "page_faults_per_step": float(faults.sum() / (chunks[name] * wall.size)),
                       "warmup_s": warmup[name]}
    return stats


# --- output ---------------------------------------------------------------------------------
def report(payload: dict, out_dir: Path, name: str, print_report, plot) -> None:
    """Print a benchmark's tables, draw its plots and name the files written."""
    print_report(payload)
    for path in plot(payload, out_dir, name):
        print(f"wrote {path}")
    print(f"wrote {out_dir / (name + '.json')}")


def write_json(path: Path, payload: dict) -> None:
    """Atomically (`openmm_stable.io.atomic_write_text`): a killed run leaves the old file."""
    from openmm_stable.io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def format_table(headers: Sequence[str], rows: Sequence[Sequence], floatfmt: str = "{:.3g}") -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    def cell(v):
        if isinstance(v, float):
            return floatfmt.format(v) if np.isfinite(v) else "-"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in text]
    return "\n".join(out)

"""Replica-steps per second of the replica engine against the alternatives.

For each system, number of replicas R and architecture, every method below is measured side
by side: the runners take turns chunk by chunk (round robin, see
`_common.interleaved_rates`), so that load from other processes on a shared machine falls on
all of them alike, and the rate is taken from the median chunk time. Each runner lives in a
worker process of its own (`_common.ProcessRunner`), so that no runner's heap slows another
down; to bound memory, the architectures take turns as groups. ``--shared-process`` keeps
every runner of a point, all architectures, in this process. The methods:

* ``batched``      the replica engine: R replicas in ONE OpenMM Context, one batched TorchForce
                   (Langevin, 0.5 fs, 500 K, friction 1/ps);
* ``bare``         the limit: a bare loop of the same batched TorchScript module, forward plus
                   autograd for the forces, positions in nm float64 as OpenMM hands them over
                   (no integrator, no OpenMM);
* ``bare-guarded`` the same loop over the module the engine really runs (it computes its forces
                   inside and zeroes non-finite replicas): separates the guard's cost from OpenMM's;
* ``per-replica``  one Context per replica (``layout="per-replica"``);
* ``ase``          an ASE Langevin loop driving the same (eager, float32) model replica by
                   replica through an ASE Calculator (eV, Angstrom): what users do today.

Models are untrained (random weights), so molecules are not held together: every timed chunk
of at most ``--chunk`` steps starts again from the start structures (reset untimed), for every
method alike, so that no method runs on a more spread-out (cheaper) structure than another.

    python benchmarks/engine_throughput.py            # full run (about 30-40 min on 2 cores)
    python benchmarks/engine_throughput.py --quick    # about a minute
    python benchmarks/engine_throughput.py --plot-only benchmarks/results/engine_throughput.json
"""
from __future__ import annotations

import _common  # noqa: F401  (first: pins thread pools to one thread)

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from _common import (ProcessRunner, Runner, build_system, format_table, interleaved_rates, machine_info, report,
                     single_thread_torch, write_json)

METHODS = ("batched", "bare", "bare-guarded", "per-replica", "ase")
DEFAULT_ARCHS = ("schnet", "graph-network", "equivariant-transformer", "tensornet")
SCHNET_FAMILY = ("schnet", "graph-network")
# TensorNet's warp kernels are slow on the CPU (~25-40 replica-steps/s): larger R would take
# minutes per point (mostly the per-replica and ASE baselines), so its default stops at 32.
DEFAULT_MAX_REPLICAS = {"tensornet": 32}
TEMPERATURE_K = 500.0
TIMESTEP_FS = 0.5
FRICTION_PER_PS = 1.0
# Targets per platform: on the CPU per CPU-second at R = 32; on a GPU (CUDA) per wall-clock
# second at R = 128, where CPU time means nothing (the process spins waiting for the GPU).
TARGETS_BY_PLATFORM = {
    "CPU": {"replicas": 32, "clock": "cpu", "ratios": {"batched/bare": 1.0, "batched/per-replica": 2.0}},
    "CUDA": {"replicas": 128, "clock": "wall", "ratios": {"batched/per-replica": 10.0}},
}
# Ratios within this fraction below a target are reported as "within noise": the spread of
# the per-chunk rates of one runner (interquartile range) is a few per cent on a quiet core.
NOISE = 0.03


# --- runners ---------------------------------------------------------------------------------
class EngineRunner(Runner):
    def __init__(self, model, z, starts: np.ndarray, layout: str, platform: str, keep_freed_memory: bool = True):
        from openmm_stable.engine import EngineConfig, ReplicaEngine

        self.name = "batched" if layout == "batched" else "per-replica"
        self.n_replicas = starts.shape[0]
        self.starts = starts
        config = EngineConfig(temperature_K=TEMPERATURE_K, timestep_fs=TIMESTEP_FS, friction_per_ps=FRICTION_PER_PS,
                              layout=layout, platform=platform, dtype="float32", keep_freed_memory=keep_freed_memory)
        self.engine = ReplicaEngine(model, z, self.n_replicas, config)

    def reset(self, seed: int) -> None:
        self.engine.set_states(self.starts, seed=seed)

    def run(self, n_steps: int) -> None:
        self.engine.step(n_steps)
        synchronize(torch_device_for(self.engine.platform_name))

    def close(self) -> None:
        del self.engine


def torch_device_for(platform: str) -> str:
    """The PyTorch device that OpenMM-Torch runs the module on for an OpenMM platform."""
    return "cuda" if platform == "CUDA" else "cpu"


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a timed chunk ends when its steps are done."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class BareRunner(Runner):
    """module(positions) then autograd, R replicas in one call, no OpenMM. On a GPU the
    positions and forces stay on the device (as with OpenMM's CUDA platform)."""

    def __init__(self, model, z, starts: np.ndarray, guarded: bool, device: str = "cpu"):
        import torch

        from openmm_stable.export import script_force_module
        from openmm_stable.units import NM_IN_ANGSTROM

        self.name = "bare-guarded" if guarded else "bare"
        self.guarded = guarded
        self.n_replicas = starts.shape[0]
        self.device = device
        self.module = script_force_module(model, z, self.n_replicas, dtype=torch.float32, guarded=guarded).to(device)
        self.positions = torch.tensor(starts.reshape(-1, 3) / NM_IN_ANGSTROM, dtype=torch.float64, device=device)
        self._torch = torch

    def reset(self, seed: int) -> None:
        pass  # positions never move

    def run(self, n_steps: int) -> None:
        torch = self._torch
        for _ in range(n_steps):
            if self.guarded:
                energy, forces = self.module(self.positions)
            else:
                pos = self.positions.detach().requires_grad_(True)
                energy = self.module(pos)
                (grad,) = torch.autograd.grad(energy, pos)
                forces = -grad
            if self.device == "cpu":
                forces.numpy()  # OpenMM's CPU platform copies the forces out too
        synchronize(self.device)


def ase_calculator(model, atomic_numbers):
    """An ASE Calculator (eV, eV/Angstrom) around a model of the protocol, one structure."""
    import torch
    from ase.calculators.calculator import Calculator, all_changes

    from openmm_stable.models import energy_and_forces

    class ModelCalculator(Calculator):
        implemented_properties = ["energy", "forces"]

        def __init__(self):
            super().__init__()
            self.model = model
            self.device = next(model.parameters()).device
            self.z = torch.as_tensor(np.asarray(atomic_numbers), dtype=torch.long, device=self.device)
            self.batch = torch.zeros(self.z.numel(), dtype=torch.long, device=self.device)

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            pos = torch.as_tensor(self.atoms.get_positions(), dtype=torch.float32, device=self.device)
            energy, forces = energy_and_forces(self.model, self.z, pos, self.batch)
            self.results["energy"] = float(energy.detach().sum())
            self.results["forces"] = forces.detach().cpu().numpy().astype(np.float64)

    return ModelCalculator()


class AseRunner(Runner):
    name = "ase"

    def __init__(self, model, z, starts: np.ndarray, device: str = "cpu"):
        from ase import Atoms, units
        from ase.md.langevin import Langevin

        self.n_replicas = starts.shape[0]
        self.starts = starts
        model = copy.deepcopy(model).to(device).float().eval()
        for p in model.parameters():
            p.requires_grad_(False)
        calc = ase_calculator(model, z)
        self.atoms, self.dyns = [], []
        self._units = units
        for k in range(self.n_replicas):
            atoms = Atoms(numbers=z, positions=starts[k])
            atoms.calc = ase_calculator(model, z) if k else calc
            self.atoms.append(atoms)
            self.dyns.append(Langevin(atoms, TIMESTEP_FS * units.fs, temperature_K=TEMPERATURE_K,
                                      friction=FRICTION_PER_PS / (1000 * units.fs), fixcm=False,
                                      rng=np.random.default_rng(k)))

    def reset(self, seed: int) -> None:
        try:
            from ase.md.velocitydistribution import thermalize_momenta
        except ImportError:  # ASE < 3.28
            from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

        for k, atoms in enumerate(self.atoms):
            atoms.set_positions(self.starts[k])
            thermalize_momenta(atoms, temperature_K=TEMPERATURE_K, rng=np.random.default_rng([seed, k]))

    def run(self, n_steps: int) -> None:
        for dyn in self.dyns:
            dyn.run(n_steps)


def make_runner(method: str, model, z, starts, platform: str, keep_freed_memory: bool = True) -> Runner:
    if method in ("batched", "per-replica"):
        return EngineRunner(model, z, starts, method, platform, keep_freed_memory)
    if method in ("bare", "bare-guarded"):
        return BareRunner(model, z, starts, guarded=method == "bare-guarded", device=torch_device_for(platform))
    if method == "ase":
        return AseRunner(model, z, starts, device=torch_device_for(platform))
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def seeded_model(arch: str, preset: str):
    """The benchmark's (untrained) model of an architecture: the same weights in every process."""
    import torch

    from openmm_stable.models import create_model

    torch.manual_seed(0)
    return create_model(arch, preset)


def prepare_process(keep_freed_memory: bool) -> bool:
    """One torch thread, and glibc keeping freed memory unless told not to (as the engine
    does on the CPU). Returns whether the allocator setting is in effect."""
    from openmm_stable.allocator import keep_freed_memory as keep_freed

    tuned = keep_freed() if keep_freed_memory else False
    single_thread_torch()
    return tuned


def build_runner_in_worker(method: str, arch: str, preset: str, z, starts, platform: str,
                           keep_freed_memory: bool) -> Runner:
    """`make_runner` in a `ProcessRunner` worker, set up as `run` sets up this process."""
    prepare_process(keep_freed_memory)
    return make_runner(method, seeded_model(arch, preset), z, starts, platform, keep_freed_memory)


# --- the benchmark ---------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run (schnet, aspirin, R in 1 8; about a minute)")
    p.add_argument("--archs", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_ARCHS)}")
    p.add_argument("--preset", default="small")
    p.add_argument("--replicas", nargs="+", type=int, default=None,
                   help="R values for the first system (default 1 8 32 128)")
    p.add_argument("--systems", nargs="+", default=None,
                   help="built-in molecules or waterN (N-water cluster); default aspirin Ac-Ala3-NHMe water32")
    p.add_argument("--atoms-replicas", nargs="+", type=int, default=None,
                   help="R values for the systems after the first (throughput vs atoms; default 1 32)")
    p.add_argument("--max-replicas", nargs="*", default=None, metavar="NAME=R",
                   help="largest R per architecture or method (default tensornet=32); e.g. per-replica=32 on a "
                        "GPU, where one CUDA context per replica runs out at large R")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--platform", default="CPU", choices=sorted(TARGETS_BY_PLATFORM),
                   help="OpenMM platform; CUDA also runs the bare and ASE baselines on the GPU")
    p.add_argument("--min-time", type=float, default=None, help="timed seconds per method and point (default 1.5)")
    p.add_argument("--chunk-time", type=float, default=0.1,
                   help="seconds per timed chunk (runners take turns chunk by chunk)")
    p.add_argument("--chunk", type=int, default=20, help="most steps between resets to the start structures")
    p.add_argument("--malloc-defaults", action="store_true",
                   help="keep glibc's malloc defaults, which return freed memory to the OS and page-fault it back "
                        "every step; by default the engine keeps it in the process (openmm_stable.allocator), "
                        "and every baseline's process does too")
    p.add_argument("--shared-process", action="store_true",
                   help="run every runner in this process, as before the default of one worker process per "
                        "runner (at R = 128 the per-replica engine's heap then slows the batched engine down)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default=None, help="stem of the output files (default engine_throughput[_quick])")
    p.add_argument("--plot-only", type=Path, default=None, help="re-plot and re-print a results JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.archs = args.archs or ["schnet"]
        args.replicas = args.replicas or [1, 8]
        args.systems = args.systems or ["aspirin"]
        args.atoms_replicas = args.atoms_replicas or [8]
        args.min_time = args.min_time or 0.2
        args.chunk_time = 0.02
        args.warmup_steps = 5
    else:
        args.warmup_steps = 20
    args.archs = args.archs or list(DEFAULT_ARCHS)
    args.replicas = args.replicas or [1, 8, 32, 128]
    args.systems = args.systems or ["aspirin", "Ac-Ala3-NHMe", "water32"]
    args.atoms_replicas = args.atoms_replicas or [1, 32]
    args.min_time = args.min_time or 1.5
    args.name = args.name or (("engine_throughput_quick" if args.quick else "engine_throughput")
                              + ("_malloc_defaults" if args.malloc_defaults else "")
                              + ("_shared_process" if args.shared_process else ""))
    limits = dict(DEFAULT_MAX_REPLICAS)
    for item in args.max_replicas or []:
        arch, _, value = item.partition("=")
        limits[arch] = int(value)
    args.limits = limits
    return args


def start_structures(positions: np.ndarray, n_replicas: int, seed: int = 0) -> np.ndarray:
    """R copies of the structure, each displaced by 0.02 A Gaussian noise (distinct replicas)."""
    rng = np.random.default_rng(seed)
    return positions[None] + 0.02 * rng.standard_normal((n_replicas, *positions.shape))


def measure_point(models: dict, z, positions, R: int, args) -> list[dict]:
    """Every (architecture, method) of `models` at one system and R, measured side by side;
    each runner in a worker process of its own unless ``--shared-process``."""
    starts = start_structures(positions, R)
    runners, setup = {}, {}
    keep_freed = not args.malloc_defaults
    try:
        for arch, model in models.items():
            for method in [m for m in args.methods if R <= args.limits.get(m, math.inf)]:
                if args.shared_process:
                    t0 = time.perf_counter()
                    runners[(arch, method)] = make_runner(method, model, z, starts, args.platform, keep_freed)
                    setup[(arch, method)] = time.perf_counter() - t0
                else:  # one build at a time: ten concurrent builds of R = 128 engines thrash 2 cores
                    runner = ProcessRunner(method, R, build_runner_in_worker, method, arch,
                                           args.preset, z, starts, args.platform, keep_freed)
                    runners[(arch, method)] = runner
                    setup[(arch, method)] = runner.setup_s
        stats = interleaved_rates(runners, args.min_time, chunk_s=args.chunk_time, max_chunk=args.chunk,
                                  warmup_steps=args.warmup_steps)
    finally:
        for r in runners.values():
            r.close()
    return [{"arch": arch, "method": method, "setup_s": setup[(arch, method)], **stats[(arch, method)]}
            for arch, method in runners]


def run(args) -> dict:
    malloc_tuned = prepare_process(not args.malloc_defaults)
    import torch  # noqa: F401  (before openmmtorch)

    payload = {"benchmark": "engine_throughput", "quick": bool(args.quick), "machine": machine_info(),
               "settings": {"preset": args.preset, "temperature_K": TEMPERATURE_K, "timestep_fs": TIMESTEP_FS,
                            "friction_per_ps": FRICTION_PER_PS, "platform": args.platform, "dtype": "float32",
                            "min_time_s": args.min_time, "chunk_time_s": args.chunk_time, "max_chunk": args.chunk,
                            "warmup_steps": args.warmup_steps, "methods": args.methods, "limits": args.limits,
                            "rate": "replica-steps per second from the median chunk time",
                            "malloc_tuned": malloc_tuned,
                            "runner_processes": "shared" if args.shared_process else "one per runner"},
               "results": []}
    out_json = args.out / f"{args.name}.json"
    t_start = time.perf_counter()
    # With worker processes each worker builds its own model; this process needs none.
    models = {arch: seeded_model(arch, args.preset) if args.shared_process else None for arch in args.archs}
    for s_index, system in enumerate(args.systems):
        z, positions = build_system(system)
        r_values = args.replicas if s_index == 0 else args.atoms_replicas
        for R in r_values:
            chosen = {arch: m for arch, m in models.items() if R <= args.limits.get(arch, math.inf)}
            t0 = time.perf_counter()
            # Worker processes do not share freed memory, so their peaks add up (at R = 128 the
            # equivariant transformer's five alone hold ~17 GB): one architecture at a time.
            groups = [chosen] if args.shared_process else [{arch: m} for arch, m in chosen.items()]
            records = [rec for group in groups for rec in measure_point(group, z, positions, R, args)]
            for rec in records:
                payload["results"].append({"system": system, "n_atoms": int(len(z)), "replicas": R, **rec})
            print(f"[{time.perf_counter() - t_start:7.1f} s] {system} ({len(z)} atoms) R={R} "
                  f"({time.perf_counter() - t0:.1f} s), replica-steps per CPU-second (per wall-clock second):",
                  flush=True)
            for arch in chosen:
                rates = "  ".join(f"{r['method']} {r['replica_steps_per_cpu_s']:.1f} ({r['replica_steps_per_s']:.1f})"
                                  for r in records if r["arch"] == arch)
                print(f"    {arch:24s} {rates}", flush=True)
            payload["summary"] = summarise(payload["results"], args.platform)
            write_json(out_json, payload)  # partial results survive an interrupted run
    payload["machine"]["load_average_at_end"] = list(__import__("os").getloadavg())
    payload["wall_s"] = time.perf_counter() - t_start
    payload["summary"] = summarise(payload["results"], args.platform)
    write_json(out_json, payload)
    return payload


# --- summary, tables, plots --------------------------------------------------------------------
# Rates: per CPU-second of this (single-threaded) process, the primary measure on a shared
# machine (time the process spends descheduled is not counted; on an idle core it equals the
# wall-clock rate), and per wall-clock second from the median chunk time.
RATE_KEYS = {"cpu": "replica_steps_per_cpu_s", "wall": "replica_steps_per_s"}
RATIO_NAMES = ("batched/bare", "batched/bare-guarded", "batched/per-replica", "batched/ase")


def _rate(results, clock: str = "cpu", **key) -> float:
    for r in results:
        if all(r.get(k) == v for k, v in key.items()):
            return r.get(RATE_KEYS[clock], math.nan)
    return math.nan


def _field(results, field: str, **key) -> float:
    for r in results:
        if all(r.get(k) == v for k, v in key.items()):
            return r.get(field, math.nan)
    return math.nan


def _summary_for(results: list[dict], clock: str, platform: str = "CPU") -> dict:
    points = sorted({(r["system"], r["n_atoms"], r["arch"], r["replicas"]) for r in results},
                    key=lambda p: (p[1], DEFAULT_ARCHS.index(p[2]) if p[2] in DEFAULT_ARCHS else 99, p[3]))
    ratios = []
    for system, n_atoms, arch, R in points:
        rate = {m: _rate(results, clock, system=system, arch=arch, replicas=R, method=m) for m in METHODS}
        row = {"system": system, "n_atoms": n_atoms, "arch": arch, "replicas": R}
        if not np.isfinite(rate["per-replica"]):
            # Capped (--max-replicas per-replica=...): one Context per replica runs the replicas
            # one after another, so its rate is flat in R; use the largest R measured, and say so.
            measured = sorted(r["replicas"] for r in results if r["system"] == system and r["arch"] == arch
                              and r["method"] == "per-replica" and r["replicas"] < R)
            if measured:
                rate["per-replica"] = _rate(results, clock, system=system, arch=arch, replicas=measured[-1],
                                            method="per-replica")
                row["per_replica_rate_from_R"] = measured[-1]
        row.update({name: rate[name.split("/")[0]] / rate[name.split("/")[1]] for name in RATIO_NAMES})
        ratios.append(row)
    # Our plain-PyTorch SchNet against torchmd-net's SchNet-type graph network (same point, side by side).
    family = []
    for system, n_atoms, arch, R in points:
        if arch != "schnet":
            continue
        row = {"system": system, "n_atoms": n_atoms, "replicas": R}
        for m in ("batched", "bare", "ase"):
            row[f"{m}: schnet/graph-network"] = (
                _rate(results, clock, system=system, arch="schnet", replicas=R, method=m)
                / _rate(results, clock, system=system, arch="graph-network", replicas=R, method=m))
        family.append(row)
    targets = []
    first_system = results[0]["system"] if results else None
    spec = TARGETS_BY_PLATFORM[platform]
    for row in ratios:
        if row["system"] == first_system and row["replicas"] == spec["replicas"] and row["arch"] in SCHNET_FAMILY:
            for name, threshold in spec["ratios"].items():
                value = row[name]
                met = bool(np.isfinite(value) and value >= threshold)
                near = bool(np.isfinite(value) and value >= threshold * (1 - NOISE))
                targets.append({"system": row["system"], "arch": row["arch"], "replicas": spec["replicas"], "ratio": name,
                                "clock": clock, "value": value, "target": threshold, "met": met,
                                "status": "yes" if met else (f"within noise ({NOISE:.0%})" if near else "NO"),
                                "per_replica_rate_from_R": row.get("per_replica_rate_from_R")})
    return {"ratios": ratios, "schnet_vs_graph_network": family, "targets": targets}


def summarise(results: list[dict], platform: str = "CPU") -> dict:
    """Ratios, the schnet/graph-network comparison and the targets, per CPU-second and per
    wall-clock second (``*_wall``); on a GPU the targets are judged per wall-clock second only."""
    cpu, wall = _summary_for(results, "cpu", platform), _summary_for(results, "wall", platform)
    if TARGETS_BY_PLATFORM[platform]["clock"] == "wall":
        cpu["targets"] = []
    return {**cpu, **{f"{k}_wall": v for k, v in wall.items()}}


def print_report(payload: dict) -> None:
    results = payload["results"]
    summary = payload["summary"]
    m = payload["machine"]
    print(f"\nmachine: {m.get('cpu_model')}, nproc {m.get('nproc')}, torch {m.get('torch')}, openmm {m.get('openmm')}, "
          f"load at start {m['load_average_at_start'][0]:.2f}; glibc malloc "
          + ("tuned (freed memory kept in the process)" if payload["settings"].get("malloc_tuned")
             else "defaults (--malloc-defaults)"))
    methods = [x for x in METHODS if any(r["method"] == x for r in results)]
    for clock, suffix, title in (("cpu", "", "replica-steps per CPU-second (primary; = per second on an idle core)"),
                                 ("wall", "_wall", "replica-steps per wall-clock second (median chunk)")):
        print(f"\n{title}; float32, Langevin 0.5 fs, 500 K\n")
        rows = []
        for row in summary["ratios" + suffix]:
            rates = [_rate(results, clock, system=row["system"], arch=row["arch"], replicas=row["replicas"], method=x)
                     for x in methods]
            extra = []
            if clock == "cpu":  # share of CPU time spent in the kernel (page faults), batched / bare
                extra = [100 * _field(results, "system_cpu_fraction", system=row["system"], arch=row["arch"],
                                      replicas=row["replicas"], method=x) for x in ("batched", "bare")]
            rows.append([row["system"], row["n_atoms"], row["arch"], row["replicas"], *rates,
                         *[row[n] for n in RATIO_NAMES], *extra])
        extra_heads = ["sys % batched", "sys % bare"] if clock == "cpu" else []
        print(format_table(["system", "atoms", "arch", "R", *methods, *RATIO_NAMES, *extra_heads], rows))
        for row in summary["ratios" + suffix]:
            if row.get("per_replica_rate_from_R"):
                print(f"  {row['system']} {row['arch']} R={row['replicas']}: per-replica not run (capped); "
                      f"batched/per-replica uses its rate at R={row['per_replica_rate_from_R']}")
    family = summary["schnet_vs_graph_network"]
    if family and any(np.isfinite(v) for f in family for k, v in f.items() if "/" in k):
        print("\nour plain-PyTorch schnet / torchmd-net graph-network (same SchNet family), per CPU-second\n")
        keys = [k for k in family[0] if "/" in k]
        print(format_table(["system", "atoms", "R", *keys], [[f["system"], f["n_atoms"], f["replicas"],
                                                              *[f[k] for k in keys]] for f in family]))
    if summary["targets"] or summary["targets_wall"]:
        print("\ntargets (SchNet type)\n")
        print(format_table(["system", "arch", "ratio", "clock", "value", "target", "met"],
                           [[t["system"], t["arch"], t["ratio"], t["clock"], t["value"], f">= {t['target']:g}",
                             t.get("status", "yes" if t["met"] else "NO")]
                            for t in summary["targets"] + summary["targets_wall"]]))


STYLE = {"batched": ("C0", "o", "-"), "bare": ("k", "s", "--"), "bare-guarded": ("0.5", "s", ":"),
         "per-replica": ("C3", "^", "-"), "ase": ("C2", "v", "-")}


def plot(payload: dict, out_dir: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    if not results:
        return []
    clock = TARGETS_BY_PLATFORM[payload["settings"].get("platform", "CPU")]["clock"]
    rate_label = "replica-steps per CPU-second" if clock == "cpu" else "replica-steps per second (wall clock)"
    archs = list(dict.fromkeys(r["arch"] for r in results))
    systems = list(dict.fromkeys(r["system"] for r in results))
    methods = [x for x in METHODS if any(r["method"] == x for r in results)]
    paths = []

    first = systems[0]
    fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.8), squeeze=False, sharey=True)
    for ax, arch in zip(axes[0], archs):
        for method in methods:
            pts = sorted((r["replicas"], r[RATE_KEYS[clock]]) for r in results
                         if r["system"] == first and r["arch"] == arch and r["method"] == method)
            if pts:
                c, mk, ls = STYLE[method]
                ax.plot(*zip(*pts), color=c, marker=mk, linestyle=ls, label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{arch} ({first})")
        ax.set_xlabel("replicas R")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(rate_label)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{name}_vs_replicas.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    if len(systems) > 1:
        r_common = sorted({r["replicas"] for r in results if r["system"] == systems[-1]})
        fig, axes = plt.subplots(1, len(archs), figsize=(4.2 * len(archs), 3.8), squeeze=False, sharey=True)
        for ax, arch in zip(axes[0], archs):
            # Every method at the largest common R; the batched engine also at the smallest
            # (at R = 1 all methods but ASE coincide).
            lines = [(m, r_common[-1], 1.0) for m in methods if m != "bare-guarded"]
            if len(r_common) > 1 and "batched" in methods:
                lines.append(("batched", r_common[0], 0.4))
            for method, R, alpha in lines:
                pts = sorted((r["n_atoms"], r[RATE_KEYS[clock]]) for r in results
                             if r["arch"] == arch and r["method"] == method and r["replicas"] == R)
                if pts:
                    c, mk, ls = STYLE[method]
                    ax.plot(*zip(*pts), color=c, marker=mk, linestyle=ls, alpha=alpha, label=f"{method} R={R}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(arch)
            ax.set_xlabel("atoms per replica (" + ", ".join(systems) + ")")
            ax.grid(alpha=0.3, which="both")
        axes[0][0].set_ylabel(rate_label)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}_vs_atoms.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        import json

        payload = json.loads(args.plot_only.read_text())
        payload["summary"] = summarise(payload["results"], payload["settings"].get("platform", "CPU"))
        out_dir, name = args.plot_only.parent, args.plot_only.stem
        write_json(args.plot_only, payload)  # the summary, recomputed by this version
    else:
        payload = run(args)
        out_dir, name = args.out, args.name
    report(payload, out_dir, name, print_report, plot)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])

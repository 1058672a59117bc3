"""MACE on the CPU: our replica engine against openmm-ml's MACE route and the bare loop.

MACE-small (`create_model("mace", "small")` with the system's elements; untrained, seeded
weights) on aspirin, R replicas, three methods measured side by side (runners take turns
chunk by chunk, each in a worker process of its own; see `engine_throughput.py`):

* ``batched``   our engine: R replicas in ONE OpenMM Context, one batched TorchForce, the
                neighbour list inside the TorchScript graph;
* ``bare``      the limit: a bare batched PyTorch forward+backward loop of the same module;
* ``openmm-ml`` openmm-ml's ``MLPotential('mace', modelPath=...)``, one Context per replica:
                the same weights written as a MACE ``.model`` by `export_mace_model`
                (float32, as the engine runs), which openmm-ml 1.8 evaluates in a
                PythonForce with a host-side neighbour list at every step.

Same integrator settings as engine_throughput.py (Langevin 0.5 fs, 500 K, friction 1/ps,
float32). Rates are replica-steps per CPU-second of each runner's own process.

    python benchmarks/engine_mace.py                 # R = 32 and 128 (openmm-ml up to 32)
    python benchmarks/engine_mace.py --quick         # smoke test, in this one process
"""
from __future__ import annotations

import _common  # noqa: F401  (first: pins thread pools to one thread)

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from _common import ProcessRunner, Runner, build_system, format_table, interleaved_rates, machine_info, write_json
from engine_throughput import (FRICTION_PER_PS, TEMPERATURE_K, TIMESTEP_FS, BareRunner, EngineRunner,
                               prepare_process, start_structures)

METHODS = ("batched", "bare", "openmm-ml")
TARGETS = {"batched/openmm-ml": 3.0, "batched/bare": 0.9}
TARGET_REPLICAS = 32


def mace_model(z, preset: str):
    """The benchmark's MACE for the elements of `z`: the same seeded weights in every process."""
    import torch

    from openmm_stable.models import create_model

    torch.manual_seed(0)
    return create_model("mace", preset, atomic_numbers=sorted({int(v) for v in z}))


class OpenMMMLRunner(Runner):
    """One Context per replica from openmm-ml's ``MLPotential('mace', modelPath=...)``."""

    name = "openmm-ml"

    def __init__(self, model_path: str, z, starts: np.ndarray):
        import openmm
        from openmm import unit
        from openmmml import MLPotential

        from openmm_stable.export import topology_from_atomic_numbers
        from openmm_stable.units import NM_IN_ANGSTROM

        self.n_replicas = starts.shape[0]
        self.starts_nm = starts / NM_IN_ANGSTROM
        topology = topology_from_atomic_numbers(z)
        potential = MLPotential("mace", modelPath=model_path)
        system = potential.createSystem(topology, precision="single")
        platform = openmm.Platform.getPlatformByName("CPU")
        self.contexts = []
        for _ in range(self.n_replicas):
            integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE_K * unit.kelvin, FRICTION_PER_PS / unit.picosecond,
                                                         TIMESTEP_FS * unit.femtosecond)
            self.contexts.append((openmm.Context(system, integrator, platform), integrator))
        self._temperature = TEMPERATURE_K * unit.kelvin

    def forces_kj_per_mol_nm(self, k: int) -> np.ndarray:
        """Forces on replica k at its start structure (kJ/mol/nm)."""
        from openmm import unit

        context = self.contexts[k][0]
        context.setPositions(self.starts_nm[k])
        forces = context.getState(getForces=True).getForces(asNumpy=True)
        return np.asarray(forces.value_in_unit(unit.kilojoule_per_mole / unit.nanometer))

    def reset(self, seed: int) -> None:
        for k, (context, _) in enumerate(self.contexts):
            context.setPositions(self.starts_nm[k])
            context.setVelocitiesToTemperature(self._temperature, (seed * 1009 + k) % 2**31)

    def run(self, n_steps: int) -> None:
        for _, integrator in self.contexts:
            integrator.step(n_steps)

    def close(self) -> None:
        del self.contexts


def same_model_check(model, model_path: str, z, positions: np.ndarray) -> dict:
    """openmm-ml's forces on the exported file against our model's (autograd, float32) at one
    structure: the comparison is only fair if both routes compute the same model."""
    import torch

    from openmm_stable.models import energy_and_forces
    from openmm_stable.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM

    ours = energy_and_forces(model.float().eval(), torch.as_tensor(np.asarray(z), dtype=torch.long),
                             torch.as_tensor(positions, dtype=torch.float32),
                             torch.zeros(len(z), dtype=torch.long))[1].detach().numpy()
    ours = ours.astype(np.float64) * EV_IN_KJ_PER_MOL * NM_IN_ANGSTROM  # eV/A -> kJ/mol/nm
    theirs = OpenMMMLRunner(model_path, z, positions[None]).forces_kj_per_mol_nm(0)
    scale = float(np.abs(ours).max())
    return {"max_abs_force_kj_per_mol_nm": scale,
            "max_abs_difference_relative": float(np.abs(theirs - ours).max() / scale)}


def build_runner(method: str, preset: str, z, starts, model_path: Optional[str]) -> Runner:
    prepare_process(True)
    import torch  # noqa: F401  (before openmmtorch / openmmml)

    if method == "openmm-ml":
        import mace  # noqa: F401  (openmm-ml's torch.load of the pickled module needs mace's load setting)

        return OpenMMMLRunner(model_path, z, starts)
    model = mace_model(z, preset)
    if method == "batched":
        return EngineRunner(model, z, starts, "batched", "CPU")
    return BareRunner(model, z, starts, guarded=False)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: R = 2, short chunks, one process")
    p.add_argument("--system", default="aspirin")
    p.add_argument("--preset", default="small")
    p.add_argument("--replicas", nargs="+", type=int, default=None, help="default 32 128")
    p.add_argument("--openmm-ml-max-replicas", type=int, default=32,
                   help="largest R for openmm-ml (one Context per replica runs them one after another, so its "
                        "rate is flat in R; larger R uses the rate at the largest R measured)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--min-time", type=float, default=None, help="timed seconds per method and point (default 3)")
    p.add_argument("--chunk-time", type=float, default=0.2)
    p.add_argument("--chunk", type=int, default=20)
    p.add_argument("--shared-process", action="store_true", help="every runner in this process (quick's default)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default=None, help="default engine_mace[_quick]")
    args = p.parse_args(argv)
    if args.quick:
        args.replicas = args.replicas or [2]
        args.min_time = args.min_time or 0.2
        args.chunk_time, args.warmup_steps, args.shared_process = 0.02, 3, True
    else:
        args.warmup_steps = 20
    args.replicas = args.replicas or [32, 128]
    args.min_time = args.min_time or 3.0
    args.name = args.name or ("engine_mace_quick" if args.quick else "engine_mace")
    return args


def run(args) -> dict:
    prepare_process(True)
    import torch  # noqa: F401

    from openmm_stable.models.mace import export_mace_model

    z, positions = build_system(args.system)
    payload = {"benchmark": "engine_mace", "quick": bool(args.quick), "machine": machine_info(),
               "settings": {"system": args.system, "n_atoms": int(len(z)), "architecture": "mace", "preset": args.preset,
                            "temperature_K": TEMPERATURE_K, "timestep_fs": TIMESTEP_FS,
                            "friction_per_ps": FRICTION_PER_PS, "platform": "CPU", "dtype": "float32",
                            "openmm_ml_precision": "single", "min_time_s": args.min_time,
                            "chunk_time_s": args.chunk_time, "max_chunk": args.chunk,
                            "warmup_steps": args.warmup_steps, "methods": args.methods,
                            "runner_processes": "shared" if args.shared_process else "one per runner"},
               "results": []}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = mace_model(z, args.preset)
        model_path = str(export_mace_model(model, Path(tmp) / "mace_small.model", dtype=torch.float32))
        import mace  # noqa: F401  (as in build_runner)

        payload["same_model_check"] = check = same_model_check(model, model_path, z, positions)
        print(f"openmm-ml's forces against ours at the start structure: max |difference| / max |force| = "
              f"{check['max_abs_difference_relative']:.2e}", flush=True)
        for R in args.replicas:
            starts = start_structures(positions, R)
            methods = [m for m in args.methods if m != "openmm-ml" or R <= args.openmm_ml_max_replicas]
            runners = {}
            try:
                for method in methods:
                    if args.shared_process:
                        runners[method] = build_runner(method, args.preset, z, starts, model_path)
                    else:
                        runners[method] = ProcessRunner(method, R, build_runner, method, args.preset, z, starts,
                                                        model_path)
                        runners[method].setup_s  # noqa: B018  (one build at a time)
                stats = interleaved_rates(runners, args.min_time, chunk_s=args.chunk_time, max_chunk=args.chunk,
                                          warmup_steps=args.warmup_steps)
            finally:
                for r in runners.values():
                    r.close()
            for method in methods:
                payload["results"].append({"system": args.system, "n_atoms": int(len(z)), "replicas": R,
                                           "method": method, **stats[method]})
            print(f"[{time.perf_counter() - t_start:7.1f} s] R={R}: " + "  ".join(
                f"{m} {stats[m]['replica_steps_per_cpu_s']:.1f}" for m in methods), flush=True)
    payload["machine"]["load_average_at_end"] = list(os.getloadavg())
    payload["wall_s"] = time.perf_counter() - t_start
    payload["summary"] = summarise(payload["results"])
    write_json(args.out / f"{args.name}.json", payload)
    return payload


def summarise(results: list[dict]) -> dict:
    """Per CPU-second: the two ratios at every R (openmm-ml's rate from the largest R it ran
    at where it was capped) and the targets at R = 32."""
    def rate(method, R, key="replica_steps_per_cpu_s"):
        return next((r[key] for r in results if r["method"] == method and r["replicas"] == R), math.nan)

    rows, targets = [], []
    for R in sorted({r["replicas"] for r in results}):
        row = {"replicas": R, **{m: rate(m, R) for m in METHODS}}
        ml_from = max((r["replicas"] for r in results if r["method"] == "openmm-ml" and r["replicas"] <= R), default=None)
        if ml_from is not None and ml_from != R:
            row["openmm-ml"], row["openmm_ml_rate_from_R"] = rate("openmm-ml", ml_from), ml_from
        row["batched/openmm-ml"] = row["batched"] / row["openmm-ml"]
        row["batched/bare"] = row["batched"] / row["bare"]
        row["sys % batched"] = 100 * next((r.get("system_cpu_fraction", math.nan) for r in results
                                           if r["method"] == "batched" and r["replicas"] == R), math.nan)
        rows.append(row)
        if R == TARGET_REPLICAS:
            for name, threshold in TARGETS.items():
                value = row[name]
                targets.append({"replicas": R, "ratio": name, "value": value, "target": threshold,
                                "met": bool(np.isfinite(value) and value >= threshold)})
    return {"ratios": rows, "targets": targets}


def print_report(payload: dict) -> None:
    m = payload["machine"]
    print(f"\nmachine: {m.get('cpu_model')}, nproc {m.get('nproc')}, load at start {m['load_average_at_start'][0]:.2f}; "
          f"MACE-{payload['settings']['preset']}, {payload['settings']['system']}, replica-steps per CPU-second\n")
    heads = ["replicas", *METHODS, "batched/openmm-ml", "batched/bare", "sys % batched"]
    print(format_table(["R", *heads[1:]], [[row.get(h, math.nan) for h in heads] for row in payload["summary"]["ratios"]]))
    for row in payload["summary"]["ratios"]:
        if row.get("openmm_ml_rate_from_R"):
            print(f"  R={row['replicas']}: openmm-ml not run (capped); its rate at R={row['openmm_ml_rate_from_R']}")
    for t in payload["summary"]["targets"]:
        print(f"target R={t['replicas']} {t['ratio']} = {t['value']:.3g} (>= {t['target']:g}): "
              f"{'met' if t['met'] else 'NOT met'}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    payload = run(args)
    print_report(payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])

"""Benchmark 6: the distributed engine (Ray) against one process, and a cost model for clusters.

    python benchmarks/distributed.py                 # about 10 min on 2 cores
    python benchmarks/distributed.py --quick --out runs/q     # smoke test (default test suite)
    python benchmarks/distributed.py --resume        # skip the parts already in the results file

Measured here (CPU, 2 cores, aspirin, an untrained SchNet-small with fixed seed):

1. Throughput of `simulate`-like stepping (`run_checked`: frames every 0.05 ps, the stability
   check in the driver) at the same replica count in four ways, taking turns round by round:
   one process with 1 and with 2 threads, one Ray worker and two Ray workers (1 thread each).
   "2 workers / 1 worker" is the scaling of the distributed engine; "1 worker / one process
   (1 thread)" is the cost of Ray itself; "2 workers / one process (2 threads)" is what a user
   of this machine gains over the ordinary engine.
2. Per-update overhead at 128 replicas, aspirin and a periodic water box (64 molecules): the
   gather of one frame (ms, bytes) and the weight broadcast (ms, bytes), each against the
   same operation of the one-process engine (which also reads its states and re-scripts the
   model: the difference is what Ray adds).
3. A cost model for 8 GPUs on one node and 4 nodes x 8 GPUs, from (2) and the GPU step times
   measured in section 1b of benchmarks/README.md (H100); network figures are assumptions,
   stated in the output.

The Ray cluster of this script declares 4 logical CPUs on 2 cores, so that the 1-worker and
2-worker engines can be alive at once; only one engine runs at any moment, and every
worker runs 1 thread, so the cores are never oversubscribed.
"""
from __future__ import annotations

import _common  # noqa: F401  (one thread per process, before torch/OpenMM are imported)

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from _common import format_table, machine_info, write_json

RESULTS = Path(__file__).resolve().parent / "results"
CUDA_RESULTS = RESULTS / "engine_throughput_cuda.json"  # section 1b: H100, SchNet-small, batched engine

# Cost-model assumptions (not measured here): say them wherever they are used.
ASSUMED = {
    "network_bandwidth_GB_per_s": 3.1,  # 25 Gbit/s Ethernet between nodes, the driver's link shared
    "network_round_trip_ms": 1.0,  # one Ray call to a worker on another node and its answer
    "epoch_ps": 1.0,  # StableConfig defaults: 1 ps per epoch, frames every 0.05 ps, 0.5 fs steps
    "frame_interval_ps": 0.05,
    "timestep_fs": 0.5,
    "thermostat_bytes_per_replica": 250,  # Nose-Hoover chain state in the frame's answer (measured ~250 B)
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    p.add_argument("--out", default=str(RESULTS), help="folder for distributed[_quick].json")
    p.add_argument("--replicas", type=int, default=64, help="replicas of the throughput runs (default 64)")
    p.add_argument("--frames", type=int, default=3, help="timed frames per round and engine (default 3)")
    p.add_argument("--steps-per-frame", type=int, default=100, help="MD steps per frame (default 100 = 0.05 ps)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the four engines taking turns (default 3)")
    p.add_argument("--overhead-replicas", type=int, default=128)
    p.add_argument("--water-molecules", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10, help="timed gathers per engine (default 10)")
    p.add_argument("--resume", action="store_true", help="keep the parts already in the results file")
    args = p.parse_args(argv)
    if args.quick:
        args.replicas, args.frames, args.steps_per_frame, args.rounds = 4, 2, 5, 1
        args.overhead_replicas, args.repeats = 4, 3
    return args


# --- systems and engines -------------------------------------------------------------------------
def seeded_model():
    """The benchmark's untrained SchNet-small (seed 0), as in engine_throughput.py."""
    import torch

    from openmm_stable.models import create_model

    torch.manual_seed(0)
    return create_model("schnet", "small")


def system(name: str, n_water: int):
    """(atomic numbers, positions A, box A or None)."""
    if name == "water":
        from openmm_stable.data.water import build_water_box

        return build_water_box(n_water)
    from openmm_stable.data.molecules import build_molecule

    z, positions = build_molecule(name)
    return z, positions, None


def starts(positions: np.ndarray, n_replicas: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return positions[None] + 0.02 * rng.standard_normal((n_replicas, *positions.shape))


def local_engine(model, z, n, config, box=None, threads: int = 1):
    """A one-process engine whose OpenMM CPU platform uses `threads` threads."""
    import openmm

    from openmm_stable.engine import ReplicaEngine

    cpu = openmm.Platform.getPlatformByName("CPU")
    cpu.setPropertyDefaultValue("Threads", str(threads))
    try:
        return ReplicaEngine(model, z, n, config, box)
    finally:
        cpu.setPropertyDefaultValue("Threads", "1")


class _NoCheck:
    """A criterion that flags nothing: the frames' cost without any failure handling."""

    def __call__(self, positions):
        import torch

        return torch.zeros(positions.shape[0], dtype=torch.float64)

    def unstable(self, deviations):
        return deviations > 1.0


# --- 1. throughput ----------------------------------------------------------------------------------
def measure_throughput(args) -> dict:
    import torch

    from openmm_stable.distributed import DistributedReplicaEngine
    from openmm_stable.engine import EngineConfig

    z, positions, _ = system("aspirin", args.water_molecules)
    model, R = seeded_model(), args.replicas
    config = EngineConfig(temperature_K=500.0, platform="CPU")
    engines = {
        "one process, 1 thread": (local_engine(model, z, R, config, threads=1), 1),
        "one process, 2 threads": (local_engine(model, z, R, config, threads=2), 2),
        "1 worker": (DistributedReplicaEngine(model, z, R, dataclasses.replace(config, workers=1),
                                              threads_per_worker=1), 1),
        "2 workers": (DistributedReplicaEngine(model, z, R, dataclasses.replace(config, workers=2),
                                               threads_per_worker=1), 1),
    }
    x0, criterion, noop = starts(positions, R), _NoCheck(), (lambda frame: None)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds + 1):  # round 0: warm-up (TorchScript optimises on the first calls)
        for name, (engine, threads) in engines.items():
            torch.set_num_threads(threads)
            engine.set_states(x0, seed=r)
            frames = 1 if r == 0 else args.frames
            t0 = time.perf_counter()
            engine.run_checked(frames, args.steps_per_frame, criterion, noop)
            wall = time.perf_counter() - t0
            torch.set_num_threads(1)
            if r:
                rates[name].append(R * frames * args.steps_per_frame / wall)
                print(f"  round {r}: {name:<24} {rates[name][-1]:8.1f} replica-steps/s", flush=True)
    rows = [{"name": name, "replica_steps_per_s": float(np.median(v)), "rounds": [float(x) for x in v]}
            for name, v in rates.items()]
    return {"replicas": R, "steps_per_frame": args.steps_per_frame, "frames_per_round": args.frames,
            "rows": rows, "engines": {name: engine for name, (engine, _) in engines.items()}}


def throughput_ratios(rows: list[dict]) -> dict:
    rate = {r["name"]: r["replica_steps_per_s"] for r in rows}
    return {"2 workers / 1 worker": rate["2 workers"] / rate["1 worker"],
            "1 worker / one process (1 thread)": rate["1 worker"] / rate["one process, 1 thread"],
            "2 workers / one process (2 threads)": rate["2 workers"] / rate["one process, 2 threads"],
            "2 workers / one process (1 thread)": rate["2 workers"] / rate["one process, 1 thread"],
            "one process: 2 threads / 1 thread": rate["one process, 2 threads"] / rate["one process, 1 thread"]}


# --- 2. per-update overhead ------------------------------------------------------------------------------
def measure_overhead(name: str, args, engines: Optional[tuple] = None) -> dict:
    """Gather and broadcast at `args.overhead_replicas` replicas of `name`, 2 workers vs one
    process (`engines`: such a pair built already, for `name` at that replica count)."""
    import ray

    from openmm_stable.distributed import DistributedReplicaEngine
    from openmm_stable.distributed.engine import weights_payload
    from openmm_stable.engine import EngineConfig

    z, positions, box = system(name, args.water_molecules)
    model, R = seeded_model(), args.overhead_replicas
    config = EngineConfig(temperature_K=300.0 if box is not None else 500.0, platform="CPU",
                          integrator="nose-hoover")
    x0 = starts(positions, R)
    if engines is None:
        local = local_engine(model, z, R, config, box)
        dist = DistributedReplicaEngine(model, z, R, dataclasses.replace(config, workers=2), box,
                                        threads_per_worker=1)
    else:
        local, dist = engines
    row = {"system": name, "replicas": R, "atoms": int(len(z)), "workers": 2}
    try:
        for engine in (local, dist):
            engine.set_states(x0, seed=1)
            engine.step(2)  # thermostat chains in motion, as in a run
        local_ms = [1e3 * _timed(local.get_states) for _ in range(args.repeats)]
        dist_ms = [1e3 * _timed(dist.get_states) for _ in range(args.repeats)]
        row.update(gather_ms=float(np.median(dist_ms)), local_read_ms=float(np.median(local_ms)),
                   gather_extra_ms=float(np.median(dist_ms) - np.median(local_ms)),
                   gather_bytes=int(dist.last_gather_bytes))
        payload = weights_payload(model)
        row["broadcast_bytes"] = int(sum(v.nbytes for v in payload.values()))
        row["put_ms"] = float(np.median([1e3 * _timed(lambda: ray.put(payload)) for _ in range(args.repeats)]))
        local_update = [1e3 * _timed(lambda: local.update_model(model)) for _ in range(max(2, args.repeats // 3))]
        dist_update = [1e3 * _timed(lambda: dist.update_model(model)) for _ in range(max(2, args.repeats // 3))]
        row.update(update_ms=float(np.median(dist_update)), local_update_ms=float(np.median(local_update)),
                   broadcast_extra_ms=float(np.median(dist_update) - np.median(local_update)))
    finally:
        dist.close()
    return row


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- 3. cost model --------------------------------------------------------------------------------------------
def gpu_step_model() -> dict:
    """GPU step time t(R, N) = t0 + R N / a (seconds), fitted to the H100 points of section 1b:
    t0 from one aspirin replica (launch and synchronisation latency), a (atoms per second)
    from aspirin at the largest R, and a separate a for water (more neighbours per atom)."""
    results = json.loads(CUDA_RESULTS.read_text())["results"]
    pts = {(r["system"], r["replicas"]): r for r in results if r.get("method") == "batched" and r.get("arch") == "schnet"}
    one = pts[("aspirin", 1)]
    t0 = 1.0 / one["replica_steps_per_s"]  # 1 replica: steps/s = replica-steps/s
    big = max((k for k in pts if k[0] == "aspirin"), key=lambda k: k[1])
    t_big = big[1] / pts[big]["replica_steps_per_s"]
    a_aspirin = big[1] * pts[big]["n_atoms"] / (t_big - t0)
    water = max((k for k in pts if k[0].startswith("water")), key=lambda k: k[1])
    t_water = water[1] / pts[water]["replica_steps_per_s"]
    a_water = water[1] * pts[water]["n_atoms"] / (t_water - t0)
    return {"t0_s": t0, "atoms_per_s": {"aspirin": a_aspirin, "water": a_water},
            "fitted_to": {"aspirin": [1, big[1]], water[0]: [water[1]]}, "source": CUDA_RESULTS.name}


def gather_fit(overhead: list[dict]) -> dict:
    """Gather time on one node as latency + bytes / bandwidth, fitted to the measured gathers
    (aspirin and water: two sizes). Without a positive slope: latency only."""
    b = np.array([r["gather_bytes"] for r in overhead], dtype=float)
    t = np.array([r["gather_ms"] for r in overhead], dtype=float) * 1e-3
    if b.size >= 2 and np.ptp(b) > 0:
        slope, latency = np.polyfit(b, t, 1)
        if slope > 0 and latency > 0:
            return {"latency_s": float(latency), "bandwidth_B_per_s": float(1.0 / slope)}
    return {"latency_s": float(t.mean()), "bandwidth_B_per_s": float("inf")}


def cost_model(overhead: list[dict], gpu: dict) -> dict:
    """Epoch time and its communication share for 1 GPU, 8 GPUs on one node and 4 nodes x 8
    GPUs, at 128 and 1,024 replicas (modelled; see ASSUMED and the module doc).

    Per frame the driver gathers every replica's positions, velocities (float64) and
    thermostat chains: the latency + bytes / bandwidth fitted to the gathers measured here
    (Ray over shared memory, serialisation included) for every byte; with other nodes, the
    assumed round trip and their share of the bytes over the assumed link into the driver. Per learning epoch the weights go out once: the measured
    `ray.put`, plus one copy per other node over the link. Each worker then re-scripts the
    model and reinitialises its Context (measured here in one process: the same cost with one
    GPU or many, so it is not counted as communication, but it does not shrink with more GPUs)."""
    steps = int(round(ASSUMED["epoch_ps"] / (ASSUMED["timestep_fs"] * 1e-3)))
    frames = int(round(ASSUMED["epoch_ps"] / ASSUMED["frame_interval_ps"]))
    bw = ASSUMED["network_bandwidth_GB_per_s"] * 1e9
    rtt = ASSUMED["network_round_trip_ms"] * 1e-3
    node = gather_fit(overhead)
    rows = []
    for meas in overhead:
        name, n_atoms = meas["system"], meas["atoms"]
        a = gpu["atoms_per_s"]["water" if name == "water" else "aspirin"]
        per_replica_bytes = n_atoms * 3 * 8 * 2 + ASSUMED["thermostat_bytes_per_replica"]
        update = meas["local_update_ms"] * 1e-3
        for replicas in (128, 1024):
            one_gpu_epoch = steps * (gpu["t0_s"] + replicas * n_atoms / a) + update
            for layout, gpus, nodes in (("1 GPU", 1, 1), ("8 GPUs, 1 node", 8, 1), ("4 nodes x 8 GPUs", 32, 4)):
                per_gpu = replicas / gpus
                compute = steps * (gpu["t0_s"] + per_gpu * n_atoms / a)
                frame_bytes = replicas * per_replica_bytes
                gather = broadcast = 0.0  # one GPU: one process, no Ray
                if gpus > 1:  # every byte is (de)serialised as measured here; remote ones also cross the link
                    gather = node["latency_s"] + frame_bytes / node["bandwidth_B_per_s"]
                    broadcast = meas["put_ms"] * 1e-3
                    if nodes > 1:
                        gather += rtt + frame_bytes * (nodes - 1) / nodes / bw
                        broadcast += rtt + (nodes - 1) * meas["broadcast_bytes"] / bw
                comm = frames * gather + broadcast
                epoch = compute + comm + update
                rows.append({"system": name, "replicas": replicas, "layout": layout, "gpus": gpus,
                             "replicas_per_gpu": per_gpu, "compute_s": compute, "communication_s": comm,
                             "update_s": update, "epoch_s": epoch, "communication_fraction": comm / epoch,
                             "frame_bytes": frame_bytes, "speedup_vs_1_gpu": one_gpu_epoch / epoch})
    # More GPUs help only while a GPU's batch time R N / a is not small against the latency t0.
    knee = {name: gpu["t0_s"] * a for name, a in gpu["atoms_per_s"].items()}
    return {"assumed": ASSUMED, "steps_per_epoch": steps, "frames_per_epoch": frames, "gpu_step_model": gpu,
            "one_node_gather_fit": node, "atoms_per_gpu_at_which_batch_time_equals_latency": knee, "rows": rows}


# --- report -----------------------------------------------------------------------------------------------------
def print_report(payload: dict) -> None:
    tp = payload["throughput"]
    print(f"\n1. Throughput, aspirin, {payload['throughput_replicas']} replicas, SchNet-small (CPU, replica-steps/s)")
    print(format_table(["engine", "replica-steps/s", "rounds"],
                       [[r["name"], r["replica_steps_per_s"], " ".join(f"{x:.0f}" for x in r["rounds"])] for r in tp]))
    print(format_table(["ratio (same run)", "value"], [[k, v] for k, v in payload["ratios"].items()]))
    print("\n2. Per-update overhead, 2 workers vs one process (ms, bytes)")
    print(format_table(["system", "R", "atoms", "gather ms", "one-process read ms", "gather bytes", "put ms",
                        "update ms", "one-process update ms", "weights bytes"],
                       [[r["system"], r["replicas"], r["atoms"], r["gather_ms"], r["local_read_ms"], r["gather_bytes"],
                         r["put_ms"], r["update_ms"], r["local_update_ms"], r["broadcast_bytes"]]
                        for r in payload["overhead"]]))
    cm = payload["cost_model"]
    print(f"\n3. Cost model (modelled: GPU step time fitted to {cm['gpu_step_model']['source']}; network ASSUMED "
          f"{cm['assumed']['network_bandwidth_GB_per_s']} GB/s, {cm['assumed']['network_round_trip_ms']} ms per call; "
          f"epoch = {cm['steps_per_epoch']} steps, {cm['frames_per_epoch']} frames, one weight broadcast)")
    fit = cm["one_node_gather_fit"]
    print(f"   one-node gather fitted to the measured ones: {1e3 * fit['latency_s']:.2f} ms + bytes / "
          f"{fit['bandwidth_B_per_s'] / 1e9:.2f} GB/s; weight update (re-script + reinitialise) as measured in one "
          f"process; GPU step t0 = {1e3 * cm['gpu_step_model']['t0_s']:.2f} ms + R N / a")
    print(format_table(["system", "R", "layout", "R/GPU", "compute s", "comm. s", "update s", "epoch s",
                        "communication", "speedup vs 1 GPU"],
                       [[r["system"], r["replicas"], r["layout"], r["replicas_per_gpu"], r["compute_s"],
                         r["communication_s"], r["update_s"], r["epoch_s"], f"{100 * r['communication_fraction']:.2f} %",
                         r["speedup_vs_1_gpu"]] for r in cm["rows"]]))
    knee = cm["atoms_per_gpu_at_which_batch_time_equals_latency"]
    print("   a GPU's batch time equals its per-step latency at " +
          ", ".join(f"{v:,.0f} atoms ({name})" for name, v in knee.items()) +
          ": below that, more GPUs barely shorten a step")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    name = "distributed_quick" if args.quick else "distributed"
    path = out / f"{name}.json"
    payload = json.loads(path.read_text()) if args.resume and path.exists() else {}
    payload.update({"benchmark": "distributed", "quick": args.quick, "machine": machine_info(),
                    "settings": {k: v for k, v in vars(args).items() if k not in ("out", "resume")}})
    from openmm_stable.distributed import connect

    connect(num_cpus=4)  # 4 logical CPUs on 2 cores: engines coexist, one runs at a time (module doc)
    t_start = time.perf_counter()
    built = {}
    if "throughput" not in payload:
        print("1. throughput: four engines taking turns", flush=True)
        result = measure_throughput(args)
        payload.update(throughput=result["rows"], throughput_replicas=result["replicas"],
                       ratios=throughput_ratios(result["rows"]))
        write_json(path, payload)
        built = result["engines"]
    # The throughput run's engines (Langevin) serve aspirin's overhead when the sizes agree (--quick).
    reuse = (built["one process, 1 thread"], built["2 workers"]) if built and args.replicas == args.overhead_replicas \
        else None
    for engine in built.values():
        if hasattr(engine, "close") and (reuse is None or engine is not reuse[1]):
            engine.close()
    done = {r["system"] for r in payload.get("overhead", [])}
    for system_name in ("aspirin", "water"):
        if system_name not in done:
            print(f"2. overhead: {system_name}, {args.overhead_replicas} replicas", flush=True)
            pair = reuse if system_name == "aspirin" else None
            payload.setdefault("overhead", []).append(measure_overhead(system_name, args, pair))
            write_json(path, payload)
    payload["cost_model"] = cost_model(payload["overhead"], gpu_step_model())
    payload["wall_s_this_run"] = time.perf_counter() - t_start
    write_json(path, payload)
    print_report(payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)

"""Cost of the single-backward Boltzmann estimator against two per-sample-Jacobian forms.

`boltzmann_gradient` turns the estimator into ONE backward pass of the surrogate
sum_k c_k U(x_k). The baselines materialise dU(x_k)/dtheta for every frame (K x n_params):

* ``jacobian`` (`jacobian_gradient`): one backward pass per frame, and the rows contracted
  with the projected observable a.O(x_k) first, so it holds K x P numbers: a lean version;
* ``paper`` (`paper_jacobian_gradient`): the way the paper's reference code computes it:
  per minibatch of m frames, m rows from one VJP batched over the identity (vmap), all K
  rows kept, then the (m, d, P) product of observables and rows (d = observable bins).

For K aspirin frames (random 0.1 A perturbations of the molecule; observable h(r), MSE
loss against the h(r) of the unperturbed molecule; 500 K) this script measures for each:

* time (float32 by default, the dtype training uses), after a warm-up call on 2 frames: the
  median CPU time of the single-threaded worker (equal to the wall time on an idle core; it
  does not count the time the process waits for a core on a shared machine), and the
  wall-clock median too;
* peak memory: the growth of the peak resident set size (VmHWM) over the resident size just
  before the call, in a FRESH subprocess per measurement (see `peak_rss_growth`);
* the largest difference of the gradients, all computed in float64 (``.double()`` model),
  relative to the largest gradient component of the ``jacobian`` form:
  max_p |g - g_jac| / max_p |g_jac| (and, for ours, the same per parameter tensor, the
  stricter number, over tensors whose gradient is not zero up to round-off).

    python benchmarks/estimator_cost.py                  # K in 32 128 512, TensorNet small
    python benchmarks/estimator_cost.py --arch schnet    # another architecture
    python benchmarks/estimator_cost.py --quick          # K = 16, SchNet tiny (seconds)
"""
from __future__ import annotations

import _common  # noqa: F401  (first: pins thread pools to one thread)

import argparse
import ctypes
import gc
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from _common import format_table, machine_info, report, single_thread_torch, write_json

TEMPERATURE_K = 500.0
NOISE_ANGSTROM = 0.1
TARGET_K = 128
# Frames per minibatch of the paper-form baseline: the reference code uses 40, whose
# (40, d, P) product for TensorNet-small and 200 h(r) bins would need about 8 GB (float32).
PAPER_MINIBATCH = 8
TARGETS = {"speedup": 5.0, "memory_ratio": 10.0, "max_rel_diff": 1e-5}
WORKER_FLAG = "--worker"


# --- memory ----------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_growth(fn) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS growth in MiB) of one call of `fn`.

    Why this method: torch's CPU tensors are allocated by its own allocator (malloc/mmap), so
    `tracemalloc` sees none of them; the resident set size sees everything the call touches
    (tensors, autograd's saved activations, the Jacobian rows, Python objects). Linux keeps the
    peak (VmHWM) and lets a process reset it (``echo 5 > /proc/self/clear_refs``), so the peak
    reached during the call minus the resident size just before it is the call's peak memory
    footprint. Memory freed by earlier work can be reused without raising the RSS, so every
    measurement runs in a fresh subprocess, with only a 2-frame warm-up before it and
    ``malloc_trim`` to hand freed memory back first.
    """
    gc.collect()
    _malloc_trim()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_kb("VmHWM")
    return seconds, cpu, max(peak - before, 0) / 1024.0


def can_measure_memory() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kb("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


# --- the problem ---------------------------------------------------------------------------------
def make_problem(arch: str, preset: str, K: int, dtype_name: str, seed: int = 0, molecule: str = "aspirin",
                 device: str = "cpu"):
    """(model, energy_fn, frames, values, loss) for K perturbed frames of `molecule` (a
    built-in name or a structure file), everything on `device`."""
    import torch

    from openmm_stable.data.molecules import build_molecule
    from openmm_stable.models import create_model
    from openmm_stable.observables import HrObservable
    from openmm_stable.training.estimator import ObservableLoss, model_energy_fn

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(seed)
    model = create_model(arch, preset)
    model = (model.double() if dtype == torch.float64 else model).to(device)
    z, pos = build_molecule(molecule)
    gen = torch.Generator().manual_seed(seed + 1)
    frames = torch.as_tensor(pos)[None] + NOISE_ANGSTROM * torch.randn(K, len(z), 3, generator=gen, dtype=torch.float64)
    observable = HrObservable()
    values = observable(frames)  # (K, bins), float64
    loss = ObservableLoss(observable(torch.as_tensor(pos)[None])[0], "mse")
    return model, model_energy_fn(model, z), frames.to(device=device, dtype=dtype), values.to(device), loss


def paper_jacobian_gradient(model, energy_fn, frames, values, loss_fn, temperature_K: float,
                            minibatch: int = PAPER_MINIBATCH) -> list:
    """The estimator computed the way the paper's reference code computes it.

    Per minibatch of m frames: the m rows dU(x_k)/dtheta from one VJP batched over the rows
    of the identity (the code's ``vmap`` of ``autograd.grad``; here ``is_grads_batched``,
    the same mechanism), every row kept (K x P); then per minibatch the (m, d, P) product of
    observables and rows, reduced to a (d, P) Jacobian and contracted with dL/d<O>.
    The reference code centres each minibatch on its own means; this centres on the means
    over all K frames, so that the result is the same estimator as ours and the gradients
    can be compared. That changes no cost. The code's minibatch is 40; the default here is
    `PAPER_MINIBATCH` so that the (m, d, P) product fits this machine's memory.
    """
    import torch

    from openmm_stable.training.estimator import split_like
    from openmm_stable.units import kT_eV

    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for start in range(0, frames.shape[0], minibatch):
        energies = energy_fn(frames[start:start + minibatch])
        m = energies.shape[0]
        identity = torch.eye(m, dtype=energies.dtype, device=energies.device)
        rows.append(batched_vjp_rows(energies, params, identity))
    rows = torch.cat(rows)  # (K, P)
    values = values.detach().to(rows.dtype)
    mean_values, mean_rows = values.mean(0), rows.mean(0)
    mean = mean_values.double().requires_grad_(True)
    (loss_gradient,) = torch.autograd.grad(loss_fn(mean), mean)
    loss_gradient = loss_gradient.to(rows.dtype)[None]  # (1, d)
    flat = torch.zeros(rows.shape[1], dtype=rows.dtype, device=rows.device)
    for start in range(0, rows.shape[0], minibatch):
        g, r = values[start:start + minibatch], rows[start:start + minibatch]
        jacobian = (mean_rows[None, None, :] * mean_values[None, :, None] - r[:, None, :] * g[:, :, None]).sum(0)
        flat += torch.mm(loss_gradient, jacobian)[0]
    return split_like(flat / (rows.shape[0] * kT_eV(temperature_K)), params)


def batched_vjp_rows(energies, params, identity):
    """(m, P): the rows of the identity pulled back through the minibatch's graph, batched
    (vmap). Ops without a batching rule (torchmd-net's TensorNet kernels) get what vmap's
    own fallback does: one backward pass per row through the whole minibatch graph."""
    import torch

    m = energies.shape[0]

    def flatten(grads):
        return torch.cat([(g if g is not None else p.new_zeros((m, *p.shape))).reshape(m, -1).detach()
                          for g, p in zip(grads, params)], dim=1)

    try:
        return flatten(torch.autograd.grad(energies, params, grad_outputs=identity, is_grads_batched=True,
                                           allow_unused=True, retain_graph=True))
    except RuntimeError as error:
        if "Batching rule not implemented" not in str(error):
            raise
    per_row = [torch.autograd.grad(energies, params, grad_outputs=row, allow_unused=True, retain_graph=True)
               for row in identity]
    return flatten([torch.stack([r[i] if r[i] is not None else torch.zeros_like(p) for r in per_row])
                    for i, p in enumerate(params)])


def run_method(method: str, model, energy_fn, frames, values, loss, minibatch: Optional[int]):
    """The gradient (list of tensors, one per parameter) by one of the forms: ``single``
    (ours), ``jacobian`` (per-sample rows one backward each, contracted first) or
    ``paper`` (the reference code's batched-VJP rows and (m, d, P) product)."""
    from openmm_stable.training.estimator import boltzmann_gradient, jacobian_gradient

    model.zero_grad(set_to_none=True)
    if method == "single":
        boltzmann_gradient(energy_fn, frames, values, loss, TEMPERATURE_K, minibatch=minibatch)
        return [p.grad for p in model.parameters() if p.requires_grad]
    if method == "jacobian":
        return jacobian_gradient(model, energy_fn, frames, values, loss, TEMPERATURE_K)
    if method == "paper":
        return paper_jacobian_gradient(model, energy_fn, frames, values, loss, TEMPERATURE_K,
                                       minibatch=minibatch or PAPER_MINIBATCH)
    raise ValueError(f"unknown method {method!r}")


def peak_cuda_growth(fn) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak GPU memory growth in MiB) of one call of `fn`: the
    peak of PyTorch's CUDA allocator during the call minus what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, cpu, max(torch.cuda.max_memory_allocated() - before, 0) / 2**20


def worker_cost(spec: dict) -> dict:
    """Runs in a fresh process: time and peak memory of one method at one K."""
    if spec.get("malloc_tuned"):
        from openmm_stable.allocator import keep_freed_memory

        keep_freed_memory()
    single_thread_torch()
    device = spec.get("device", "cpu")
    model, energy_fn, frames, values, loss = make_problem(spec["arch"], spec["preset"], spec["K"], spec["dtype"],
                                                          molecule=spec.get("molecule", "aspirin"), device=device)
    mb = spec.get("minibatch")
    measure = peak_cuda_growth if device == "cuda" else peak_rss_growth
    run_method(spec["method"], model, energy_fn, frames[:2], values[:2], loss, mb)  # warm-up (kernels, caches)
    model.zero_grad(set_to_none=True)
    out = {"n_params": sum(p.numel() for p in model.parameters())}
    holder = {}
    seconds, cpu, growth = measure(lambda: holder.setdefault(
        "grad", run_method(spec["method"], model, energy_fn, frames, values, loss, mb)))
    out["peak_memory_mib"] = growth
    out["first_call_s"] = seconds
    del holder
    times, cpu_times = [seconds], [cpu]
    while sum(times) < spec["min_time"] and len(times) < 20:
        c0, t0 = time.process_time(), time.perf_counter()
        run_method(spec["method"], model, energy_fn, frames, values, loss, mb)
        if device == "cuda":
            import torch

            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    out["times_s"], out["cpu_times_s"] = times, cpu_times
    out["seconds"] = statistics.median(times)
    out["cpu_seconds"] = statistics.median(cpu_times)
    return out


def worker_compare(spec: dict) -> dict:
    """Runs in a fresh process: the per-sample-Jacobian gradient and the single-backward one
    (for each minibatch size) in float64, and their largest relative differences."""
    import torch

    single_thread_torch()
    model, energy_fn, frames, values, loss = make_problem(spec["arch"], spec["preset"], spec["K"], "float64",
                                                          molecule=spec.get("molecule", "aspirin"),
                                                          device=spec.get("device", "cpu"))
    reference = [g.detach().clone() for g in run_method("jacobian", model, energy_fn, frames, values, loss, None)]
    scale = max(float(r.abs().max()) for r in reference)
    out = {"max_abs_grad": scale, "grad_norm": float(torch.sqrt(sum((r**2).sum() for r in reference)))}
    for mb in spec["minibatches"]:
        single = run_method("single", model, energy_fn, frames, values, loss, mb or None)
        diff = max(float((a - b).abs().max()) for a, b in zip(single, reference))
        # Per tensor, over tensors whose gradient is not zero up to round-off (the last bias
        # gets exactly zero: a constant energy shift leaves the Boltzmann average unchanged).
        per_tensor = max(float((a - b).abs().max()) / float(b.abs().max())
                         for a, b in zip(single, reference) if float(b.abs().max()) > 1e-10 * scale)
        out[variant_name(mb)] = {"max_abs_diff": diff, "max_rel_diff": diff / scale,
                                 "max_rel_diff_per_tensor": per_tensor}
    if "paper" in spec.get("baselines", ()):
        paper = run_method("paper", model, energy_fn, frames, values, loss, spec.get("paper_minibatch"))
        diff = max(float((a - b).abs().max()) for a, b in zip(paper, reference))
        out["paper"] = {"max_abs_diff": diff, "max_rel_diff": diff / scale}
    return out


def variant_name(minibatch: int) -> str:
    return "single" if not minibatch else f"single-mb{minibatch}"


BASELINES = ("jacobian", "paper")
BASELINE_LABELS = {"jacobian": "per-sample Jacobian, contracted first",
                   "paper": "the paper's form (batched VJP rows, (m, d, P) product)"}


def variants(minibatches: Sequence[int], baselines: Sequence[str] = ("jacobian",),
             paper_minibatch: int = PAPER_MINIBATCH) -> list[tuple[str, Optional[int]]]:
    """(label, minibatch) of every timed variant: the single-backward ones, then the baselines."""
    return ([(variant_name(mb), mb or None) for mb in minibatches]
            + [(b, paper_minibatch if b == "paper" else None) for b in baselines])


def spawn(spec: dict, timeout: float) -> dict:
    """Run one worker measurement in a fresh Python process; its last stdout line is JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"worker failed (exit {proc.returncode}): " + " | ".join(tail)}
    return json.loads(lines[-1])


# --- driver ---------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="K = 16, SchNet tiny (seconds)")
    p.add_argument("--frames", nargs="+", type=int, default=None, help="K values (default 32 128 512)")
    p.add_argument("--arch", default=None, help="architecture (default tensornet)")
    p.add_argument("--preset", default=None, help="size preset (default small)")
    p.add_argument("--molecule", default="aspirin", help="built-in molecule or structure file (default aspirin)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the model runs; cuda: wall-clock times and the CUDA allocator's peak memory")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="dtype of the timed runs")
    p.add_argument("--minibatch", nargs="+", type=int, default=None,
                   help="frames per backward pass of the single-backward form, one variant each; 0 = all K in "
                        "one pass (default 0 4 16)")
    p.add_argument("--baselines", nargs="+", choices=BASELINES, default=list(BASELINES),
                   help="jacobian: per-frame backward passes, rows contracted with the projected observable first; "
                        "paper: the reference code's form (batched VJP rows per minibatch, then the (m, d, P) "
                        "product); default both")
    p.add_argument("--paper-minibatch", type=int, default=PAPER_MINIBATCH,
                   help=f"frames per minibatch of the paper form (the reference code: 40; default {PAPER_MINIBATCH})")
    p.add_argument("--compare-frames", nargs="*", type=int, default=None,
                   help="K values at which to compare the gradients in float64 (default: all)")
    p.add_argument("--min-time", type=float, default=1.0, help="repeat a timed call until this many seconds")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of all measurements (default 2)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per worker process")
    p.add_argument("--malloc-tuned", action="store_true",
                   help="keep freed memory in the worker processes (glibc mallopt; see openmm_stable.allocator)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default=None, help="stem of the output files (default estimator_cost[_quick])")
    p.add_argument("--plot-only", type=Path, default=None, help="re-plot and re-print a results JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.frames = args.frames or [16]
        args.minibatch = args.minibatch or [0, 4]
        args.arch = args.arch or "schnet"
        args.preset = args.preset or "tiny"
        args.min_time = min(args.min_time, 0.2)
        args.rounds = args.rounds or 1
    args.frames = args.frames or [32, 128, 512]
    args.minibatch = args.minibatch or [0, 4, 16]
    args.arch = args.arch or "tensornet"
    args.preset = args.preset or "small"
    args.rounds = args.rounds or 2
    args.compare_frames = args.frames if args.compare_frames is None else args.compare_frames
    args.name = args.name or (("estimator_cost_quick" if args.quick else "estimator_cost")
                              + ("" if args.arch == "tensornet" or args.quick else f"_{args.arch}")
                              + ("_malloc_tuned" if args.malloc_tuned else ""))
    return args


def run(args) -> dict:
    payload = {"benchmark": "estimator_cost", "quick": bool(args.quick), "machine": machine_info(),
               "settings": {"arch": args.arch, "preset": args.preset, "dtype": args.dtype, "molecule": args.molecule,
                            "device": args.device,
                            "observable": "hr", "noise_angstrom": NOISE_ANGSTROM, "temperature_K": TEMPERATURE_K,
                            "minibatches": args.minibatch, "min_time_s": args.min_time,
                            "baselines": args.baselines, "paper_minibatch": args.paper_minibatch,
                            "rounds": args.rounds, "malloc_tuned": args.malloc_tuned,
                            "memory_method": ("peak of PyTorch's CUDA allocator minus allocated before, fresh process"
                                              if args.device == "cuda" else
                                              "peak RSS growth (VmHWM after reset - VmRSS before), fresh process")},
               "results": [], "comparisons": []}
    if not can_measure_memory():
        print("warning: /proc/self/clear_refs is not available; peak memory is not measured", file=sys.stderr)
    out_json = args.out / f"{args.name}.json"
    t_start = time.perf_counter()
    # Rounds: every variant at every K once per round, so that a change of machine load
    # during the run hits all of them; the summary takes the median over rounds.
    for round_index in range(args.rounds):
        for K in args.frames:
            for method, mb in variants(args.minibatch, args.baselines, args.paper_minibatch):  # side by side, one fresh process each
                spec = {"mode": "cost", "method": method.split("-")[0], "K": K, "arch": args.arch,
                        "molecule": args.molecule, "device": args.device,
                        "preset": args.preset, "dtype": args.dtype, "minibatch": mb, "min_time": args.min_time,
                        "malloc_tuned": args.malloc_tuned}
                res = spawn(spec, args.timeout)
                payload["results"].append({"K": K, "method": method, "minibatch": mb, "round": round_index, **res})
                head = f"[{time.perf_counter() - t_start:7.1f} s] round {round_index} K={K} {method}:"
                if "error" in res:
                    print(f"{head} {res['error']}", flush=True)
                else:
                    print(f"{head} {res['cpu_seconds']:.3f} CPU-s ({res['seconds']:.3f} s wall), "
                          f"peak +{res['peak_memory_mib']:.1f} MiB", flush=True)
                payload["summary"] = summarise(payload)
                write_json(out_json, payload)
    for K in args.compare_frames:
        spec = {"mode": "compare", "K": K, "arch": args.arch, "preset": args.preset, "minibatches": args.minibatch,
                "molecule": args.molecule, "device": args.device, "baselines": args.baselines,
                "paper_minibatch": args.paper_minibatch}
        res = spawn(spec, args.timeout)
        payload["comparisons"].append({"K": K, **res})
        print(f"[{time.perf_counter() - t_start:7.1f} s] K={K} float64 gradients: "
              + (res["error"] if "error" in res else ", ".join(f"{v}: max rel diff {res[v]['max_rel_diff']:.2e}"
                                                       for v in [variant_name(mb) for mb in args.minibatch]
                                                       + [b for b in args.baselines if b in res])), flush=True)
        payload["summary"] = summarise(payload)
        write_json(out_json, payload)
    payload["machine"]["load_average_at_end"] = list(__import__("os").getloadavg())
    payload["wall_s"] = time.perf_counter() - t_start
    payload["summary"] = summarise(payload)
    write_json(out_json, payload)
    return payload


def _get(payload, K, method):
    """The measurements of one variant at one K, as medians over rounds (None if none)."""
    found = [r for r in payload["results"] if r["K"] == K and r["method"] == method and "error" not in r]
    if not found:
        return None
    return {"seconds": statistics.median(r["seconds"] for r in found),
            # (results written before CPU time was measured hold wall-clock times only)
            "cpu_seconds": statistics.median(r.get("cpu_seconds", r["seconds"]) for r in found),
            # (results written before the GPU option named this key "peak_rss_growth_mib")
            "peak_memory_mib": statistics.median(r.get("peak_memory_mib", r.get("peak_rss_growth_mib")) for r in found),
            "n_params": found[0]["n_params"], "rounds": len(found)}


def single_variants(payload: dict) -> list[str]:
    return [variant_name(mb) for mb in payload["settings"]["minibatches"]]


def summarise(payload: dict) -> dict:
    """One row per (K, single-backward variant, baseline): its cost against the baseline's."""
    on_gpu = payload["settings"].get("device", "cpu") == "cuda"
    time_key = "seconds" if on_gpu else "cpu_seconds"  # on a GPU the process's CPU time means nothing
    rows = []
    for K in sorted({r["K"] for r in payload["results"]}):
        comp = next((c for c in payload["comparisons"] if c["K"] == K and "error" not in c), None)
        for baseline in [b for b in BASELINES if _get(payload, K, b)]:
            j = _get(payload, K, baseline)
            for name in single_variants(payload):
                s = _get(payload, K, name)
                diff = (comp or {}).get(name, {})
                row = {"K": K, "variant": name, "baseline": baseline,
                       "single_s": s[time_key] if s else math.nan, "baseline_s": j[time_key],
                       "single_wall_s": s["seconds"] if s else math.nan, "baseline_wall_s": j["seconds"],
                       "single_peak_mib": s["peak_memory_mib"] if s else math.nan,
                       "baseline_peak_mib": j["peak_memory_mib"],
                       "n_params": (s or j).get("n_params"),
                       "max_rel_diff": diff.get("max_rel_diff", math.nan),
                       "max_rel_diff_per_tensor": diff.get("max_rel_diff_per_tensor", math.nan),
                       "baseline_max_rel_diff": (comp or {}).get(baseline, {}).get("max_rel_diff", 0.0
                                                                                   if baseline == "jacobian"
                                                                                   else math.nan)}
                row["speedup_wall"] = row["baseline_wall_s"] / row["single_wall_s"]
                row["speedup"] = row["baseline_s"] / row["single_s"]
                row["memory_ratio"] = row["baseline_peak_mib"] / max(row["single_peak_mib"], 1e-9)
                if row["n_params"]:
                    row["jacobian_matrix_mib"] = K * row["n_params"] * 8 / 2**20  # the float64 K x P matrix alone
                rows.append(row)
    targets = []
    for row in rows:
        if row["K"] != TARGET_K:
            continue
        for name, threshold in TARGETS.items():
            value = row[name]
            met = value <= threshold if name == "max_rel_diff" else value >= threshold
            targets.append({"K": TARGET_K, "variant": row["variant"], "baseline": row["baseline"], "quantity": name,
                            "value": value, "target": ("<= " if name == "max_rel_diff" else ">= ") + f"{threshold:g}",
                            "met": bool(np.isfinite(value) and met)})
    return {"rows": rows, "targets": targets}


def print_report(payload: dict) -> None:
    m, st = payload["machine"], payload["settings"]
    print(f"\nmachine: {m.get('cpu_model')}, nproc {m.get('nproc')}, torch {m.get('torch')}, "
          f"load at start {m['load_average_at_start'][0]:.2f}")
    print(f"{st['arch']} ({st['preset']}), {st.get('molecule', 'aspirin')} frames on {st.get('device', 'cpu')}, h(r) MSE loss, timed in {st['dtype']}, gradients "
          f"compared in float64; single = one backward over all K frames, single-mbM = minibatches of M frames; "
          f"glibc malloc {'tuned' if st.get('malloc_tuned') else 'defaults'}\n")
    rows = payload["summary"]["rows"]
    print("times: median wall-clock seconds (GPU; 'speedup' is the wall-clock ratio too)\n" if st.get("device") == "cuda" else
          "times: median CPU-seconds of this single-threaded process (= seconds on an idle core); "
          "'speedup wall' from wall-clock medians\n")
    print("baselines: " + "; ".join(f"{b} = {BASELINE_LABELS[b]}" for b in BASELINES
                                    if any(r["baseline"] == b for r in rows))
          + f" (paper minibatch {st.get('paper_minibatch', PAPER_MINIBATCH)})\n")
    print(format_table(["K", "variant", "baseline", "params", "single s", "baseline s", "speedup", "speedup wall",
                        "single MiB", "baseline MiB", "memory ratio", "K x P f64 MiB", "max rel diff",
                        "per-tensor rel diff", "baseline rel diff"],
                       [[r["K"], r["variant"], r["baseline"], r["n_params"], r["single_s"], r["baseline_s"], r["speedup"],
                         r.get("speedup_wall", math.nan),
                         r["single_peak_mib"], r["baseline_peak_mib"], r["memory_ratio"],
                         r.get("jacobian_matrix_mib", math.nan), r["max_rel_diff"], r["max_rel_diff_per_tensor"],
                         r["baseline_max_rel_diff"]]
                        for r in rows]))
    for e in [r for r in payload["results"] + payload["comparisons"] if "error" in r]:
        print(f"K={e['K']} {e.get('method', 'compare')}: {e['error']}")
    if payload["summary"]["targets"]:
        print(f"\ntargets (K = {TARGET_K})\n")
        print(format_table(["variant", "baseline", "quantity", "value", "target", "met"],
                           [[t["variant"], t.get("baseline", "jacobian"), t["quantity"], t["value"], t["target"],
                             "yes" if t["met"] else "NO"]
                            for t in payload["summary"]["targets"]]))


def plot(payload: dict, out_dir: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["summary"]["rows"]
    if not rows:
        return []
    st = payload["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, key, label in ((axes[0], "_s", "time (CPU-seconds)"), (axes[1], "_peak_mib", "peak memory growth (MiB)")):
        first = [r for r in rows if r["variant"] == rows[0]["variant"]]
        for i, variant in enumerate(single_variants(payload)):
            pts = [(r["K"], r["single" + key]) for r in rows if r["variant"] == variant and r["baseline"] == first[0]["baseline"]]
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=f"{variant} (ours)")
        for baseline, style in (("jacobian", "s-"), ("paper", "D--")):
            pts = [(r["K"], r["baseline" + key]) for r in first if r["baseline"] == baseline]
            if pts:
                ax.plot(*zip(*pts), style, color="k", label=BASELINE_LABELS[baseline])
        if key == "_peak_mib":
            pts = [(r["K"], r.get("jacobian_matrix_mib", math.nan)) for r in first if r["baseline"] == first[0]["baseline"]]
            ax.plot(*zip(*pts), ":", color="k", label="K x P float64 matrix alone")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frames K")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[1].get_legend_handles_labels()  # (the memory panel has every line)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7.5, frameon=False)
    fig.suptitle(f"Boltzmann estimator cost, {st['arch']} ({st['preset']}), aspirin, {st['dtype']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == WORKER_FLAG:
        spec = json.loads(argv[1])
        result = worker_cost(spec) if spec["mode"] == "cost" else worker_compare(spec)
        print(json.dumps(result))
        return result
    args = parse_args(argv)
    if args.plot_only:
        payload = json.loads(args.plot_only.read_text())
        payload["summary"] = summarise(payload)
        out_dir, name = args.plot_only.parent, args.plot_only.stem
        write_json(args.plot_only, payload)  # the summary, recomputed by this version
    else:
        payload = run(args)
        out_dir, name = args.out, args.name
    report(payload, out_dir, name, print_report, plot)
    return payload


if __name__ == "__main__":
    main()

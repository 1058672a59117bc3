"""Re-derive the published stability numbers with a failure at the last check counted as a failure.

Until the event flags were stored (`stability.first_instability`, metrics.json "failed"), a
replica that failed at the final check got the horizon as its stable time, the time a
survivor gets, and the statistics (`_times_and_events`: failed = time < horizon) took it
for a survivor. Kaplan-Meier medians, bootstrap intervals and log-rank p-values leaned
towards "stable". This script reads benchmarks/results/*.json and, per published number,
says whether the lost failures can be recovered, and if so what the number becomes:

* `simulate`'s metrics.json (benchmark 3 and its variants, water): its stable fraction
  came from the per-check stable mask, which did count such a replica as failed. So the
  failures at the last check = replicas at the horizon - survivors, and the statistics are
  recomputed with those flags. Which of the tied replicas failed is not stored; the
  medians and log-rank tests do not depend on it (they are tied in time), a bootstrap
  interval only through which resample draws which replica (the first ones are marked).
* benchmarks/results/stability_controlled.json (benchmark 5): its stable fractions were
  computed from the times, so the flags are gone: "not recoverable". Given instead: the
  replicas at the horizon, and an estimate of how many of them failed at the last check
  (the arm's failure rate per check over the last ps, times those replicas).
* The demo and the recipe-selection probes (README, benchmarks/README 5 and 5d) kept no
  results file.

It also records the medians that move because simulate's "median_stable_time_ps" is now
the Kaplan-Meier median (it was np.median of the times, survivors included at the horizon).

    python benchmarks/rederive_censoring.py     # writes benchmarks/results/censoring_rederived.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # the package, from a checkout without `pip install -e .`

TOL = 1e-9  # ps: a stable time this close to the horizon is at the horizon
CONTROLLED_CHECK_PS = 0.05  # stability_controlled.eval_config's check interval

# results file -> where its numbers are published
REPLICATION = {
    "stability_aspirin_schnet_recipe.json": "benchmarks/README 3 (re-run, 64 replicas) and targets table; "
                                            "README 'Does refinement work?' (converged start)",
    "stability_aspirin_schnet.json": "benchmarks/README 3 (first run) and targets table",
    "stability_Ac-Ala3-NHMe_equivariant-transformer.json": "benchmarks/README 3a",
    "stability_Ac-Ala3-NHMe_equivariant-transformer_2ps.json": "benchmarks/README 3a (2 ps check)",
    "stability_aspirin_equivariant-transformer.json": "benchmarks/README 3d",
    "stability_aspirin_tensornet.json": "benchmarks/README 3e",
    "water.json": "benchmarks/README 4 and targets table",
    "water_wholebox.json": "benchmarks/README 4 and targets table",
}
PAPERSTYLE = ("stability_aspirin_schnet_paperstyle.json", "benchmarks/README 3c",
              {"simulate_pretrained_small": "pretrained-small", "simulate_refined": "paper-style refined"})
GPU = ("stability_aspirin_schnet_gpu.json", "benchmarks/README 3b")
CONTROLLED = ("stability_controlled.json", "benchmarks/README 5a, 5c and targets table; "
              "README 'Does refinement work?' (fragile start)")
NOT_STORED = {
    "demo (make demo)": "README demo paragraph and benchmarks/README 5d: median 2.0 [1.6, 2.5] ps before, > 4 ps "
                        "after, stable at 4 ps 0.17 -> 0.70, log-rank p 1.6e-9. demo_output/ is not kept.",
    "recipe selection probes": "benchmarks/README 5, the table of refinements of the fragile start (32 replicas x "
                               "4 ps): the probe runs are not kept.",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument("--out", default=None, help="default: RESULTS_DIR/censoring_rederived.json")
    return p.parse_args(argv)


def same(a, b) -> bool:
    """Equal numbers (to 1e-9 relative), lists of them, or both None."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(np.isclose(a, b, rtol=1e-9, atol=0.0))


def pair(old, new, **extra) -> dict:
    return {"old": old, "new": new, "moved": not same(old, new), **extra}


def recovered_flags(times, stable_fraction: float, horizon: float) -> tuple[np.ndarray, int]:
    """Event flags from times and a stable fraction counted from the per-check mask: the
    replicas at the horizon beyond the survivors failed at the last check."""
    t = np.asarray(times, dtype=float)
    failed = t < horizon - TOL
    at_horizon = np.flatnonzero(~failed)
    survivors = int(round(stable_fraction * t.size))
    if not np.isclose(stable_fraction * t.size, survivors) or survivors > at_horizon.size:
        raise ValueError(f"stable fraction {stable_fraction} of {t.size} replicas does not fit {at_horizon.size} "
                         f"replicas at the horizon")
    hidden = at_horizon.size - survivors
    failed[at_horizon[:hidden]] = True
    return failed, hidden


def arm_numbers(times, failed, horizon: float, seed: int) -> dict:
    import _survival

    return _survival.summary(times, failed, horizon, seed=seed)


def replication_file(path: Path, where: str, arms_of=None) -> dict:
    """Arms of a `simulate`-metrics results file: old numbers (time-derived flags, as
    published) against new (recovered flags), and its log-rank tests if it has any."""
    import _survival

    data = json.loads(path.read_text())
    metrics = arms_of(data) if arms_of else data["metrics"]
    seed = int(data.get("settings", {}).get("seed", 0))
    arms, records = {}, {}
    for label, m in metrics.items():
        horizon, times = float(m["time_ps"]), m["stable_time_ps"]
        old_flags = np.asarray(times) < horizon - TOL
        new_flags, hidden = recovered_flags(times, m["stable_fraction"], horizon)
        old, new = arm_numbers(times, old_flags, horizon, seed), arm_numbers(times, new_flags, horizon, seed)
        records[label] = {"stable_time_ps": times, "failed": new_flags.tolist(), "old_failed": old_flags.tolist()}
        stored = data.get("statistics", {}).get("arms", {}).get(label, {})
        arms[label] = {
            "n_replicas": len(times), "horizon_ps": horizon, "replicas_at_horizon": int((~old_flags).sum()),
            "failed_at_last_check": hidden, "recoverable": True,
            # counted from the check mask all along: a failure at the last check was a failure
            "stable_fraction": pair(m["stable_fraction"], float(1 - new_flags.mean())),
            "km_median_ps": pair(old["median_stable_time_ps"], new["median_stable_time_ps"]),
            "median_interval_ps": pair(old["median_interval_ps"], new["median_interval_ps"]),
            # what the tables printed as "median stable time": np.median of the times, until
            # simulate's median became the Kaplan-Meier median
            "metrics_median_stable_time_ps": pair(m["median_stable_time_ps"], new["median_stable_time_ps"],
                                                  reason="np.median of the times -> Kaplan-Meier median"),
        }
        if new["median_stable_time_ps"] is None and m["median_stable_time_ps"] >= horizon - TOL:
            # "= the horizon" then, "beyond the horizon" now: the same statement
            arms[label]["metrics_median_stable_time_ps"]["moved"] = False
        if stored:
            arms[label]["old_matches_stored_statistics"] = (
                same(stored.get("km_median_ps"), old["median_stable_time_ps"])
                and same(stored.get("median_interval_ps"), old["median_interval_ps"]))
    out = {"published_in": where, "arms": arms}
    stored_p = data.get("statistics", {}).get("logrank_p", {})
    if stored_p:
        tests = {}
        for name, stored in stored_p.items():
            a, b = name.split(" vs ")
            ra, rb = records[a], records[b]
            horizon = min(arms[a]["horizon_ps"], arms[b]["horizon_ps"])
            old = _survival.logrank({"stable_time_ps": ra["stable_time_ps"], "failed": ra["old_failed"]},
                                    {"stable_time_ps": rb["stable_time_ps"], "failed": rb["old_failed"]}, horizon)
            new = _survival.logrank(ra, rb, horizon)
            tests[name] = pair(stored, new, old_matches_stored=same(stored, old))
        out["logrank_p"] = tests
    return out


def hidden_failures_estimate(times, horizon: float, check_ps: float, window_ps: float = 1.0) -> Optional[float]:
    """Expected failures at the last check among the replicas at the horizon: failures per
    replica-check over the last `window_ps` (those counted before the last check) times
    the replicas at the horizon. An estimate from the arm's own hazard, not a count."""
    t = np.asarray(times, dtype=float)
    at_horizon = int((t >= horizon - TOL).sum())
    start = horizon - window_ps
    failures = int(((t > start + TOL) & (t < horizon - TOL)).sum())
    checks_at_risk = float(np.sum(np.clip(np.minimum(t, horizon - check_ps) - start, 0, None)) / check_ps)
    if checks_at_risk <= 0:
        return None
    return at_horizon * failures / checks_at_risk


def controlled_file(path: Path, where: str) -> dict:
    """stability_controlled.json: stable fractions came from the times, so nothing is
    recoverable; the published numbers are listed with the replicas they hinge on."""
    import _survival

    data = json.loads(path.read_text())
    seed = 0
    experiments = {}
    for exp, result in data.items():
        if not (isinstance(result, dict) and "arms" in result and "horizon_ps" in result):
            continue
        horizon = float(result["horizon_ps"])
        arms = {}
        for arm, v in result["arms"].items():
            times = v["stable_time_ps"]
            flags = np.asarray(times) < horizon - TOL
            old = arm_numbers(times, flags, horizon, seed)
            estimate = hidden_failures_estimate(times, horizon, CONTROLLED_CHECK_PS)
            entry = {
                "n_replicas": len(times), "horizon_ps": horizon, "replicas_at_horizon": int((~flags).sum()),
                "recoverable": False,
                "why": "stable_fraction was computed from the times (t >= horizon), and no per-replica flags "
                       "were stored: a failure at the last check is indistinguishable from a survivor",
                "expected_failures_at_last_check_estimate": estimate,
                "stable_fraction": {"old": v["stable_fraction"], "new": "not recoverable"},
                "median_stable_time_ps": {"old": v["median_stable_time_ps"], "new": "not recoverable"},
                "median_interval_ps": {"old": v.get("median_interval_ps"), "new": "not recoverable"},
                "old_matches_stored_statistics": (same(v["median_stable_time_ps"], old["median_stable_time_ps"])
                                                  and same(v.get("median_interval_ps"), old["median_interval_ps"])),
            }
            for key in ("logrank_p_vs_pretrained", "logrank_p_vs_matched_control"):
                if key in v:
                    entry[key] = {"old": v[key], "new": "not recoverable"}
            arms[arm] = entry
        tests = {name: {"old": p, "new": "not recoverable",
                        "old_matches_stored": same(p, _survival.logrank(*(
                            {"stable_time_ps": result["arms"][a]["stable_time_ps"],
                             "failed": (np.asarray(result["arms"][a]["stable_time_ps"]) < horizon - TOL).tolist()}
                            for a in _controlled_pair(name, result["arms"])), horizon))}
                 for name, p in result.get("logrank_p", {}).items()}
        experiments[exp] = {"horizon_ps": horizon, "arms": arms, "logrank_p": tests,
                            "note": "every number derived from these times is affected alike, the per-group "
                                    "(per-refinement) medians and p-values of benchmarks/README 5a included"}
    return {"published_in": where, "recoverable": False, "experiments": experiments}


def _controlled_pair(name: str, arms: dict) -> tuple[str, str]:
    """'stable_vs_energy_force_only' -> ('stable', 'energy_force_only'), arm names with '_'."""
    for a in arms:
        if name.startswith(a + "_vs_") and name[len(a) + 4:] in arms:
            return a, name[len(a) + 4:]
    raise KeyError(name)


def gpu_file(path: Path, where: str) -> dict:
    data = json.loads(path.read_text())
    arms = {label: {"n_replicas": m["n_replicas"], "horizon_ps": m["time_ps"], "recoverable": False,
                    "why": "no stable times stored; the stable fraction was counted from the check mask (unaffected)",
                    "stable_fraction": pair(m["stable_fraction"], m["stable_fraction"]),
                    "note": "median printed as np.median = the horizon; more than half survived, so the "
                            "Kaplan-Meier median is beyond the horizon: the same statement"}
            for label, m in data["simulate"].items()}
    return {"published_in": where, "arms": arms}


def moved_numbers(report: dict) -> list[dict]:
    """Every recoverable number whose value changed, with its file and arm."""
    out = []
    for name, entry in report["files"].items():
        for arm, v in entry.get("arms", {}).items():
            for key, value in v.items():
                if isinstance(value, dict) and value.get("moved"):
                    out.append({"file": name, "arm": arm, "number": key, "old": value["old"], "new": value["new"],
                                **({"reason": value["reason"]} if "reason" in value else
                                   {"reason": "failures at the last check counted"})})
        for test, value in entry.get("logrank_p", {}).items():
            if isinstance(value, dict) and value.get("moved"):
                out.append({"file": name, "arm": test, "number": "logrank_p", "old": value["old"],
                            "new": value["new"], "reason": "failures at the last check counted"})
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    from openmm_stable.io import atomic_write_json

    results = Path(args.results_dir)
    files = {name: replication_file(results / name, where) for name, where in REPLICATION.items()
             if (results / name).exists()}
    name, where, labels = PAPERSTYLE
    if (results / name).exists():
        files[name] = replication_file(results / name, where,
                                       lambda d: {labels[k]: d[k] for k in labels if k in d})
    if (results / GPU[0]).exists():
        files[GPU[0]] = gpu_file(results / GPU[0], GPU[1])
    if (results / CONTROLLED[0]).exists():
        files[CONTROLLED[0]] = controlled_file(results / CONTROLLED[0], CONTROLLED[1])
    report = {"what": "published stability numbers, old (a failure at the last check counted as a survivor) and "
                      "new (counted as a failure) where the flags can be recovered; see this script's docstring",
              "files": files, "not_stored": NOT_STORED}
    report["moved"] = moved_numbers(report)
    out = Path(args.out) if args.out else results / "censoring_rederived.json"
    atomic_write_json(out, report)
    for row in report["moved"]:
        print(f"{row['file']}: {row['arm']}: {row['number']} {row['old']} -> {row['new']} ({row['reason']})")
    for exp, e in files.get(CONTROLLED[0], {}).get("experiments", {}).items():
        est = {a: v["expected_failures_at_last_check_estimate"] for a, v in e["arms"].items()}
        print(f"{CONTROLLED[0]} {exp}: not recoverable; expected failures at the last check (estimate): "
              + ", ".join(f"{a} {x:.2f}" if x is not None else f"{a} -" for a, x in est.items()))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

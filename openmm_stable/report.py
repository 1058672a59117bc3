"""Plots people would rather look at than read: survival curves, h(r), bond traces, learning curves.

Every function writes one PNG (matplotlib, Agg backend) and returns its path.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_survival(runs: Mapping[str, tuple], horizon_ps: float, path) -> Path:
    """Fraction of replicas still stable against time, one step curve per model.

    runs = {label: (stable_times, failed)}, or (stable_times, failed, run_horizon_ps) for
    a run shorter than `horizon_ps`: its curve stops at its own end instead of claiming
    its survivors stayed stable to `horizon_ps`."""
    from openmm_stable.stability import survival_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, run in runs.items():
        times, failed, *rest = run
        end = float(rest[0]) if rest else float(horizon_ps)
        t, frac = survival_curve(np.asarray(times, dtype=float), np.asarray(failed, dtype=bool), end)
        ax.step(t.numpy(), frac.numpy(), where="post", label=label)
    ax.set(xlabel="time (ps)", ylabel="fraction of replicas stable", ylim=(-0.02, 1.02), xlim=(0, horizon_ps))
    ax.legend()
    return _save(fig, path)


def plot_curves(x: np.ndarray, curves: Mapping[str, np.ndarray], path, xlabel: str, ylabel: str) -> Path:
    """Several curves on one axis, e.g. h(r) of a model against the reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, y in curves.items():
        ax.plot(np.asarray(x), np.asarray(y), label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    return _save(fig, path)


def plot_series(series: Mapping[str, tuple], path, xlabel: str, ylabel: str) -> Path:
    """Curves with their own x values, e.g. a VACF and a reference sampled more coarsely:
    series = {"model": (t, c), "reference": (t_ref, c_ref)}; a zero line for orientation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, (x, y) in series.items():
        ax.plot(np.asarray(x), np.asarray(y), marker="." if len(x) < 60 else None, label=label)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    return _save(fig, path)


def plot_bond_deviation(times_ps: np.ndarray, deviations: np.ndarray, threshold: float, path,
                        ylabel: str = "max |bond - reference| (A)") -> Path:
    """A stability criterion's value per replica against time (by default the largest
    bond-length deviation), with the threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(times_ps, np.minimum(deviations, 5 * threshold), lw=0.8, alpha=0.7)
    ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold} A")
    ax.set(xlabel="time (ps)", ylabel=ylabel)
    ax.legend()
    return _save(fig, path)


def plot_rdfs(r: np.ndarray, curves: Mapping[str, Mapping[str, np.ndarray]], path) -> Path:
    """One panel per element pair, e.g. curves = {"O-O": {"model": g, "reference": g_ref}}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(len(curves), 1), figsize=(3.4 * max(len(curves), 1), 3))
    for ax, (pair, lines) in zip(np.atleast_1d(axes), curves.items()):
        for label, g in lines.items():
            ax.plot(np.asarray(r), np.asarray(g), label=label)
        ax.set(xlabel="r (A)", ylabel="g(r)", title=pair)
        ax.legend()
    return _save(fig, path)


def plot_csv_columns(csv_path, columns: Sequence[str], path, x: str = "epoch", logy: Optional[Sequence[str]] = None) -> Path:
    """One panel per column of a CSV log (learning curves)."""
    plt = _pyplot()
    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    present = [c for c in columns if rows and c in rows[0]]
    n_cols = min(4, max(len(present), 1))
    n_rows = max(1, -(-len(present) // n_cols))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 3 * n_rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(present):]:
        ax.set_visible(False)
    for ax, column in zip(axes, present):
        xs = [float(r[x]) for r in rows if r.get(column) not in ("", None)]
        ys = [float(r[column]) for r in rows if r.get(column) not in ("", None)]
        ax.plot(xs, ys, marker=".")
        ax.set(xlabel=x, title=column)
        if logy and column in logy and all(y > 0 for y in ys):
            ax.set_yscale("log")
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    from openmm_stable.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# (metrics.json key, column title); a column shows when at least one run has the value.
COMPARE_COLUMNS = [("median_stable_time_ps", "median stable (ps)"), ("stable_fraction", "stable fraction"),
                   ("failure_rate_per_ps", "failures/replica-ps"),
                   ("hr_mae", "h(r) MAE"), ("hr_mae_occupied", "h(r) MAE occ."),
                   ("hr_noise_mae", "h(r) ref noise"), ("hr_noise_mae_split_half", "h(r) noise split"),
                   ("rdf_mae_mean", "RDF MAE mean"),
                   ("diffusivity_cm2_per_s", "D (cm^2/s)"), ("reference_diffusivity_cm2_per_s", "D ref (cm^2/s)"),
                   ("diffusivity_relative_error", "D rel. error"), ("vacf_mae", "VACF MAE"),
                   ("vacf_first_minimum_ps", "VACF min (ps)"), ("vacf_diffusivity_cm2_per_s", "D Green-Kubo"),
                   ("force_mae_meV_per_A", "force MAE (meV/A)"), ("replica_steps_per_s", "replica-steps/s")]
ALWAYS_SHOWN = ("median_stable_time_ps", "stable_fraction")


def compare_columns(metrics: Mapping[str, dict]) -> list[tuple[str, str, object]]:
    """(key, title, getter) of the table columns for these runs: the fixed columns any run
    has, plus one "RDF MAE <pair>" column per element pair of periodic runs (after h(r))."""
    pairs: list[str] = []
    for m in metrics.values():
        pairs += [p for p in (m.get("rdf_mae") or {}) if p not in pairs]
    columns = []
    for key, title in COMPARE_COLUMNS:
        if key == "rdf_mae_mean":
            columns += [(f"rdf_mae.{p}", f"RDF MAE {p}", lambda m, p=p: (m.get("rdf_mae") or {}).get(p)) for p in pairs]
        columns.append((key, title, lambda m, key=key: m.get(key)))
    return [c for c in columns if c[0] in ALWAYS_SHOWN or any(c[2](m) is not None for m in metrics.values())]


def failed_flags(metrics: dict, source="metrics.json") -> np.ndarray:
    """Each replica's event flag from a metrics.json mapping. A file written before the flag
    existed has none: then failed = stable time < horizon, with a warning, since such a
    file counts a failure at the last check as a survivor."""
    times = np.asarray(metrics["stable_time_ps"], dtype=float)
    if "failed" in metrics:
        failed = np.asarray(metrics["failed"], dtype=bool)
        if failed.shape != times.shape:
            from openmm_stable.errors import InputError

            raise InputError(f"{source}: {failed.size} failed flags for {times.size} stable times")
        return failed
    print(f"warning: {source} has no 'failed' flags (written by an older simulate); failures are taken as "
          f"stable time < {metrics['time_ps']:g} ps, so replicas that failed at the last check count as survivors",
          file=sys.stderr)
    return times < metrics["time_ps"] - 1e-9


def run_failures(m: dict) -> dict:
    """{"failures", "replica_ps"} of a run: of every segment for a renewal run (its
    metrics' own counts), else from the first-failure times and flags."""
    from openmm_stable.statistics import failure_rate

    if m.get("renewal"):
        return {"failures": int(m["failures"]), "replica_ps": float(m["replica_ps"])}
    rate = failure_rate(m["stable_time_ps"], m["failed"])
    return {"failures": rate["failures"], "replica_ps": rate["replica_ps"]}


def survival_statistics(metrics: Mapping[str, dict]) -> list[str]:
    """Lines under the comparison table: each run's Kaplan-Meier median (first segments
    of a renewal run) with a bootstrap interval and its failures and exposure; the
    log-rank test and the failure-rate ratio of every run against the first one, with the
    smallest ratio those exposures resolve (`statistics.detectable_rate_ratio`, at the
    first run's rate), so that "not significant" says how large an effect it rules out.
    Runs of different lengths are compared over the shorter one (longer times censored
    there). Each mapping needs "stable_time_ps", "failed" and "time_ps" (`load_metrics`
    fills "failed" in for old files)."""
    from openmm_stable.statistics import (bootstrap_median_interval, detectable_rate_ratio, km_median, logrank_p,
                                          rate_ratio_test)

    labels = list(metrics)
    lines = ["", "Kaplan-Meier median stable time (95 % bootstrap interval over replicas), failures per replica-ps:"]
    for label in labels:
        m = metrics[label]
        times, failed, horizon = m["stable_time_ps"], m["failed"], m["time_ps"]
        median = km_median(times, failed, horizon)
        low, high = bootstrap_median_interval(times, failed, horizon)
        rate = run_failures(m)
        shown = f">= {horizon:g} ps (beyond the horizon)" if median is None else f"{median:.3g} ps"
        design = ", renewal: every segment" if m.get("renewal") else ""
        lines.append(f"  {label}: {shown}  [{low:.3g}, {high:.3g}]  ({len(times)} replicas; "
                     f"{rate['failures']} failures in {rate['replica_ps']:.3g} replica-ps{design})")
    first = labels[0]
    for label in labels[1:]:
        a, b = metrics[first], metrics[label]
        horizon = min(a["time_ps"], b["time_ps"])
        p = logrank_p(b["stable_time_ps"], b["failed"], a["stable_time_ps"], a["failed"], horizon)
        verdict = "significant at 0.05" if p < 0.05 else "not significant at 0.05"
        window = "" if a["time_ps"] == b["time_ps"] else f" over the common {horizon:g} ps"
        lines.append(f"log-rank test, {label} vs {first}{window}: p = {p:.2g} ({verdict})")
        ra, rb = run_failures(a), run_failures(b)
        if ra["replica_ps"] > 0 and rb["replica_ps"] > 0:
            r = rate_ratio_test(rb["failures"], rb["replica_ps"], ra["failures"], ra["replica_ps"])
            lines.append(f"failure-rate ratio, {label} / {first}: {r['estimate']:.3g} "
                         f"[{r['lower95']:.3g}, {r['upper95']:.3g}], exact p = {r['p']:.2g}")
            d = detectable_rate_ratio(rb["replica_ps"], ra["replica_ps"], ra["failures"] / ra["replica_ps"])
            resolved = (f"{d:.2g} ({1 / d:.2g}x fewer failures)" if d is not None
                        else f"none ({ra['failures']} failures in {first} are too few)")
            lines.append(f"  smallest rate ratio these exposures resolve with 80 % power at alpha 0.05 (two-sided), "
                         f"at {first}'s rate: {resolved}")
    return lines


def load_metrics(folder) -> dict:
    """metrics.json of a `simulate` output folder, with "failed" filled in for old files
    (`failed_flags`); a missing, truncated or invalid file is an InputError naming it."""
    import json

    from openmm_stable.errors import InputError

    path = Path(folder) / "metrics.json"
    if not path.exists():
        raise InputError(f"{folder}: no metrics.json (is it a `simulate` output folder?)")
    try:
        metrics = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON ({err}); the run may have been killed while writing it: "
                         f"rerun it, or `simulate --resume` if its folder holds progress.json") from None
    missing = [k for k in ("stable_time_ps", "time_ps") if not isinstance(metrics, dict) or k not in metrics]
    if missing:
        raise InputError(f"{path}: not a simulate metrics file (no {', '.join(missing)})")
    metrics["failed"] = failed_flags(metrics, str(path)).tolist()
    return metrics


def compare_runs(runs: Mapping[str, Path], out_dir) -> str:
    """Side-by-side table and plots (survival; h(r), or RDFs per pair; VACF) of several
    `simulate` output folders. Periodic runs add their per-pair RDF errors, diffusivities
    and VACF summary as columns."""
    from openmm_stable.io import atomic_write_json, atomic_write_text

    metrics = {label: load_metrics(d) for label, d in runs.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    horizon = max(m["time_ps"] for m in metrics.values())
    plot_survival({label: (m["stable_time_ps"], m["failed"], m["time_ps"]) for label, m in metrics.items()}, horizon,
                  out / "survival.png")
    curves, r = {}, None
    rdf_curves: dict = {}
    vacf_series: dict = {}
    for label, d in runs.items():
        hr_file = Path(d) / "hr.npz"
        if hr_file.exists():
            data = np.load(hr_file)
            r = data["r"]
            if "reference" in data and "reference" not in curves:
                curves["reference"] = data["reference"]
            if "model" in data:
                curves[label] = data["model"]
        rdf_file = Path(d) / "rdf.npz"
        if rdf_file.exists():
            data = np.load(rdf_file)
            rdf_curves.setdefault("r", data["r"])
            for key in data.files:
                kind, _, pair = key.partition("_")
                if kind in ("model", "reference") and pair:
                    name = "reference" if kind == "reference" else label
                    rdf_curves.setdefault(pair, {}).setdefault(name, data[key])
        vacf_file = Path(d) / "vacf.npz"
        if vacf_file.exists():
            data = np.load(vacf_file)
            if "reference" in data.files and "reference" not in vacf_series:
                vacf_series["reference"] = (data["reference_lag_ps"], data["reference"])
            if "model" in data.files:
                vacf_series[label] = (data["lag_ps"], data["model"])
    if r is not None and curves:
        plot_curves(r, curves, out / "hr.png", "r (A)", "h(r) (1/A)")
    if len(rdf_curves) > 1:
        r_rdf = rdf_curves.pop("r")
        plot_rdfs(r_rdf, rdf_curves, out / "rdf.png")
    if vacf_series:
        plot_series(vacf_series, out / "vacf.png", "t (ps)", "VACF C(t)/C(0), all atoms")
    columns = compare_columns(metrics)
    widths = [max(len(title), 9) + 2 for _, title, _ in columns]
    label_width = max(12, *(len(label) + 2 for label in metrics))
    lines = [f"{'':>{label_width}}" + "".join(f"{title:>{w}}" for (_, title, _), w in zip(columns, widths))]
    def cell(key, value, m, width) -> str:
        if value is not None:
            return f"{value:>{width}.4g}"
        if key == "median_stable_time_ps":  # more than half outlived the run: a bound, not a value
            return f"{'>' + format(m['time_ps'], 'g'):>{width}}"
        return f"{'-':>{width}}"

    for label, m in metrics.items():
        cells = "".join(cell(key, get(m), m, w) for (key, _, get), w in zip(columns, widths))
        lines.append(f"{label:>{label_width}}" + cells)
    table = "\n".join(lines + survival_statistics(metrics))
    atomic_write_text(out / "comparison.txt", table + "\n")
    atomic_write_json(out / "comparison.json", metrics)
    return table

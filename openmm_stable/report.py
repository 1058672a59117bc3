"""Plots people would rather look at than read: survival curves, h(r), bond traces, learning curves.

Every function writes one PNG (matplotlib, Agg backend) and returns its path.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_survival(stable_times: Mapping[str, Sequence[float]], horizon_ps: float, path) -> Path:
    """Fraction of replicas still stable against time, one step curve per model."""
    from openmm_stable.stability import survival_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, times in stable_times.items():
        t, frac = survival_curve(np.asarray(times, dtype=float), horizon_ps)
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
    fig, axes = plt.subplots(1, max(len(present), 1), figsize=(3.2 * max(len(present), 1), 3))
    axes = np.atleast_1d(axes)
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
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


COMPARE_COLUMNS = [("median_stable_time_ps", "median stable (ps)"), ("stable_fraction", "stable fraction"),
                   ("hr_mae", "h(r) MAE"), ("force_mae_meV_per_A", "force MAE (meV/A)"),
                   ("replica_steps_per_s", "replica-steps/s")]


def compare_runs(runs: Mapping[str, Path], out_dir) -> str:
    """Side-by-side table and plots (survival, h(r)) of several `simulate` output folders."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {label: json.loads((Path(d) / "metrics.json").read_text()) for label, d in runs.items()}
    horizon = max(m["time_ps"] for m in metrics.values())
    plot_survival({label: m["stable_time_ps"] for label, m in metrics.items()}, horizon, out / "survival.png")
    curves, r = {}, None
    for label, d in runs.items():
        hr_file = Path(d) / "hr.npz"
        if hr_file.exists():
            data = np.load(hr_file)
            r = data["r"]
            if "reference" in data and "reference" not in curves:
                curves["reference"] = data["reference"]
            if "model" in data:
                curves[label] = data["model"]
    if r is not None and curves:
        plot_curves(r, curves, out / "hr.png", "r (A)", "h(r) (1/A)")
    header = f"{'':>12}" + "".join(f"{title:>20}" for _, title in COMPARE_COLUMNS)
    lines = [header]
    for label, m in metrics.items():
        cells = "".join(f"{m[key]:>20.4g}" if m.get(key) is not None else f"{'-':>20}" for key, _ in COMPARE_COLUMNS)
        lines.append(f"{label:>12}" + cells)
    table = "\n".join(lines)
    (out / "comparison.txt").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps(metrics, indent=2))
    return table

"""Statistics for stability claims: stable times are right-censored at the horizon.

A replica that never failed has stable time >= horizon: we know a lower bound, not the
value. So a comparison of two models uses the log-rank test on the censored times
(`logrank_p`), medians come from the Kaplan-Meier curve (`km_median`, None when more than
half of the replicas outlived the horizon: the median is then not measured, only bounded),
and their uncertainty from a bootstrap over replicas (`bootstrap_median_interval`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from openmm_stable.errors import InputError


def _times_and_events(stable_times, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(stable_times, dtype=np.float64).reshape(-1)
    if t.size == 0 or not np.isfinite(t).all():
        raise InputError("stable times must be a non-empty array of finite numbers")
    failed = t < horizon - 1e-9  # reached the horizon: censored, not failed
    return np.minimum(t, horizon), failed


def kaplan_meier(stable_times, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """(times, survival): the Kaplan-Meier estimate, a step function starting at (0, 1)."""
    t, failed = _times_and_events(stable_times, horizon)
    times, survival, s = [0.0], [1.0], 1.0
    for u in np.unique(t[failed]):
        at_risk = np.sum(t >= u)
        s *= 1.0 - np.sum((t == u) & failed) / at_risk
        times.append(float(u))
        survival.append(s)
    times.append(float(horizon))
    survival.append(s)
    return np.asarray(times), np.asarray(survival)


def km_median(stable_times, horizon: float) -> Optional[float]:
    """The first time the Kaplan-Meier survival drops to 0.5 or below; None if it never
    does before the horizon (the median then exceeds the horizon)."""
    times, survival = kaplan_meier(stable_times, horizon)
    below = np.flatnonzero(survival[:-1] <= 0.5)
    return None if below.size == 0 else float(times[below[0]])


def logrank_p(times_a, times_b, horizon: float) -> float:
    """Two-sided p-value of the log-rank test between two sets of censored stable times."""
    from scipy import stats

    ta, fa = _times_and_events(times_a, horizon)
    tb, fb = _times_and_events(times_b, horizon)
    if not (fa.any() or fb.any()):
        return 1.0  # no failure in either arm: no evidence of a difference
    a = stats.CensoredData(uncensored=ta[fa], right=ta[~fa])
    b = stats.CensoredData(uncensored=tb[fb], right=tb[~fb])
    return float(stats.logrank(a, b).pvalue)


def bootstrap_median_interval(stable_times, horizon: float, n_boot: int = 2000, level: float = 0.95,
                              seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the Kaplan-Meier median over replicas; a resample
    whose median is beyond the horizon counts as the horizon (so an upper end equal to the
    horizon means "at least")."""
    t = np.asarray(stable_times, dtype=np.float64).reshape(-1)
    rng = np.random.default_rng(seed)
    medians = np.empty(n_boot)
    for k in range(n_boot):
        m = km_median(t[rng.integers(0, t.size, t.size)], horizon)
        medians[k] = horizon if m is None else m
    low, high = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def fisher_p(stable_a: int, n_a: int, stable_b: int, n_b: int) -> float:
    """Two-sided Fisher exact test of two stable fractions at the horizon."""
    from scipy import stats

    return float(stats.fisher_exact([[stable_a, n_a - stable_a], [stable_b, n_b - stable_b]]).pvalue)

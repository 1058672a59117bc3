"""Statistics for stability claims: stable times are right-censored.

A replica that never failed has stable time >= its run's length: we know a lower bound,
not the value. Every function here takes an explicit event flag per replica (`failed`):
a replica that fails at the last check has the same time as a survivor, so the time alone
cannot say which it is. Times beyond `horizon` are cut to it and become censored, which
is how runs of different lengths are compared over their common window.

A comparison of two models uses the log-rank test on the censored times (`logrank_p`),
medians come from the Kaplan-Meier curve (`km_median`, None when more than half of the
replicas outlived the horizon: the median is then not measured, only bounded), and their
uncertainty from a bootstrap over replicas (`bootstrap_median_interval`). When failures
are rare, `failure_rate` (failures per replica-ps) and `rate_ratio_test` (exact test of
two Poisson rates) use every replica-ps of exposure.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from openmm_stable.errors import InputError

HORIZON_TOLERANCE = 1e-9  # ps: a time this close above the horizon is at the horizon


def _times_and_events(times, failed, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """(times cut to the horizon, event flags): a time beyond the horizon is censored there."""
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    if t.size == 0 or not np.isfinite(t).all():
        raise InputError("stable times must be a non-empty array of finite numbers")
    f = np.asarray(failed).reshape(-1)
    if f.size != t.size:
        raise InputError(f"{f.size} failed flags for {t.size} stable times (one flag per replica)")
    if f.dtype != bool and not np.isin(f, (0, 1)).all():
        raise InputError("failed flags must be true/false (or 1/0)")
    if not (np.isfinite(horizon) and horizon > 0):
        raise InputError(f"horizon must be a positive number of ps, got {horizon!r}")
    beyond = t > horizon + HORIZON_TOLERANCE
    return np.minimum(t, horizon), f.astype(bool) & ~beyond


def _km_steps(t: np.ndarray, failed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct failure times and the Kaplan-Meier survival just after each."""
    times, survival, s = [], [], 1.0
    for u in np.unique(t[failed]):
        s *= 1.0 - np.sum((t == u) & failed) / np.sum(t >= u)
        times.append(float(u))
        survival.append(s)
    return np.asarray(times), np.asarray(survival)


def kaplan_meier(times, failed, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """(times, survival): the Kaplan-Meier estimate, a step function from (0, 1) to the
    horizon (a failure at the horizon gives a last step there)."""
    t, f = _times_and_events(times, failed, horizon)
    u, s = _km_steps(t, f)
    times_out, survival = [0.0, *u.tolist()], [1.0, *s.tolist()]
    if times_out[-1] < horizon:
        times_out.append(float(horizon))
        survival.append(survival[-1])
    return np.asarray(times_out), np.asarray(survival)


def km_median(times, failed, horizon: float) -> Optional[float]:
    """The first time the Kaplan-Meier survival drops to 0.5 or below; None if it never
    does up to the horizon (the median then exceeds the horizon)."""
    u, s = _km_steps(*_times_and_events(times, failed, horizon))
    below = np.flatnonzero(s <= 0.5)
    return None if below.size == 0 else float(u[below[0]])


def logrank_p(times_a, failed_a, times_b, failed_b, horizon: float) -> float:
    """Two-sided p-value of the log-rank test between two sets of censored stable times
    (both cut to `horizon`: pass the shorter run's length when the runs differ)."""
    from scipy import stats

    ta, fa = _times_and_events(times_a, failed_a, horizon)
    tb, fb = _times_and_events(times_b, failed_b, horizon)
    if not (fa.any() or fb.any()):
        return 1.0  # no failure in either arm: no evidence of a difference
    a = stats.CensoredData(uncensored=ta[fa], right=ta[~fa])
    b = stats.CensoredData(uncensored=tb[fb], right=tb[~fb])
    p = float(stats.logrank(a, b).pvalue)
    # NaN: zero variance (every replica at risk failed at the same times in both arms), no
    # evidence of a difference
    return 1.0 if math.isnan(p) else p


def bootstrap_median_interval(times, failed, horizon: float, n_boot: int = 2000, level: float = 0.95,
                              seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the Kaplan-Meier median over replicas (time and
    event flag resampled together); a resample whose median is beyond the horizon counts
    as the horizon (so an upper end equal to the horizon means "at least")."""
    t, f = _times_and_events(times, failed, horizon)
    rng = np.random.default_rng(seed)
    medians = np.empty(n_boot)
    for k in range(n_boot):
        pick = rng.integers(0, t.size, t.size)
        m = km_median(t[pick], f[pick], horizon)
        medians[k] = horizon if m is None else m
    low, high = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def failure_rate(times, failed) -> dict:
    """Failures per replica-ps: {"failures", "replica_ps" (exposure: the sum of stable
    times, each replica's time until it failed or the run ended), "rate_per_ps"}."""
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    f = np.asarray(failed).reshape(-1).astype(bool)
    if t.size == 0 or f.size != t.size or not np.isfinite(t).all() or (t < 0).any():
        raise InputError(f"failure_rate needs one failed flag per stable time (finite, >= 0); got {t.size} times "
                         f"and {f.size} flags")
    exposure = float(t.sum())
    failures = int(f.sum())
    return {"failures": failures, "replica_ps": exposure,
            "rate_per_ps": failures / exposure if exposure > 0 else None}


def rate_ratio_test(failures_a: int, exposure_a: float, failures_b: int, exposure_b: float) -> dict:
    """Exact conditional test of two Poisson failure rates: ratio (a / b) with a 95 %
    interval and a two-sided p.

    Given n = failures_a + failures_b, under equal rates failures_a ~ Binomial(n,
    exposure_a / (exposure_a + exposure_b)); p is the binomial test's, the interval the
    Clopper-Pearson interval of that proportion mapped to the ratio. No failures in b
    gives an estimate (and upper end) of inf; none at all, estimate nan and [0, inf]."""
    from scipy import stats

    for name, k in (("failures_a", failures_a), ("failures_b", failures_b)):
        if int(k) != k or k < 0:
            raise InputError(f"{name} must be a whole number >= 0, got {k!r}")
    if not (exposure_a > 0 and exposure_b > 0):
        raise InputError(f"exposures must be positive replica-ps, got {exposure_a!r} and {exposure_b!r}")
    ka, kb = int(failures_a), int(failures_b)
    n = ka + kb
    scale = exposure_b / exposure_a  # ratio = p / (1 - p) * scale
    if n == 0:
        return {"estimate": math.nan, "lower95": 0.0, "upper95": math.inf, "p": 1.0}
    test = stats.binomtest(ka, n, exposure_a / (exposure_a + exposure_b))
    ci = test.proportion_ci(confidence_level=0.95, method="exact")

    def ratio(p: float) -> float:
        return math.inf if p >= 1.0 else p / (1.0 - p) * scale

    return {"estimate": ratio(ka / n), "lower95": ratio(ci.low), "upper95": ratio(ci.high),
            "p": float(test.pvalue)}


def fisher_p(stable_a: int, n_a: int, stable_b: int, n_b: int) -> float:
    """Two-sided Fisher exact test of two stable fractions at the horizon."""
    from scipy import stats

    return float(stats.fisher_exact([[stable_a, n_a - stable_a], [stable_b, n_b - stable_b]]).pvalue)

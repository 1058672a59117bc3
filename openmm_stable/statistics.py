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
two Poisson rates) use every replica-ps of exposure; `detectable_rate_ratio` says which
ratio that test resolves with given exposures (its power), so a "no significant
difference" can be read as "no difference as large as X".
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


def binomial_test_p_values(n: int, p0: float) -> np.ndarray:
    """Two-sided p of the exact binomial test (scipy's ``binomtest``: the sum of the
    probabilities no larger than the observed one, relative tolerance 1e-7) for every
    count 0..n at once, so a power sum over many counts needs no test call per count."""
    from scipy import stats

    pmf = stats.binom.pmf(np.arange(n + 1), n, p0)
    ordered = np.sort(pmf)
    below = np.searchsorted(ordered, pmf * (1 + 1e-7), side="right")  # how many are no larger
    return np.minimum(np.cumsum(ordered)[below - 1], 1.0)


def rate_test_power(ratio: float, exposure_a: float, exposure_b: float, rate_b: float, alpha: float = 0.05) -> float:
    """Probability that `rate_ratio_test` finds p < `alpha` when the true rates are
    rate_b * ratio (arm a) and rate_b (arm b): the total count n is Poisson, and given n
    the count of a is binomial, so the power is an exact sum over both (no simulation)."""
    from scipy import stats

    _check_power_inputs(exposure_a, exposure_b, rate_b, 0.5, alpha)
    return _power_function(exposure_a, exposure_b, rate_b, alpha, max(1.0, ratio))(ratio)


def _check_power_inputs(exposure_a, exposure_b, rate_b, power, alpha) -> None:
    for name, value in (("exposure_a", exposure_a), ("exposure_b", exposure_b)):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"{name} must be a positive number of replica-ps, got {value!r}")
    if not (math.isfinite(rate_b) and rate_b >= 0):
        raise InputError(f"rate_b must be a failure rate >= 0 per ps, got {rate_b!r}")
    if not (0 < power < 1 and 0 < alpha < 1):
        raise InputError(f"power and alpha must lie strictly between 0 and 1, got {power!r} and {alpha!r}")


def _power_function(exposure_a: float, exposure_b: float, rate_b: float, alpha: float, max_ratio: float):
    """power(ratio) for ratios up to `max_ratio`: the test's rejection set for every total
    count that has any weight is built once, then each ratio only reweights it."""
    from scipy import stats

    p0 = exposure_a / (exposure_a + exposure_b)
    mu_b = rate_b * exposure_b
    n_lo = int(stats.poisson.ppf(1e-12, mu_b))
    n_hi = int(stats.poisson.ppf(1 - 1e-12, mu_b + max_ratio * rate_b * exposure_a)) + 1
    counts = np.arange(n_lo, n_hi + 1)
    # p falls as the count's probability does (unimodal in the count), so the test rejects
    # the two tails: counts <= lower[n] and >= upper[n]
    lower, upper = np.empty(counts.size), np.empty(counts.size)
    for i, n in enumerate(counts):
        kept = np.flatnonzero(binomial_test_p_values(int(n), p0) >= alpha)
        lower[i], upper[i] = kept[0] - 1, kept[-1] + 1

    def power(ratio: float) -> float:
        mu_a = ratio * rate_b * exposure_a
        share = mu_a / (mu_a + mu_b)
        tails = stats.binom.cdf(lower, counts, share) + stats.binom.sf(upper - 1, counts, share)
        return float(np.sum(stats.poisson.pmf(counts, mu_a + mu_b) * tails))

    return power


def detectable_rate_ratio(exposure_a: float, exposure_b: float, rate_b: float, power: float = 0.8,
                          alpha: float = 0.05) -> Optional[float]:
    """The rate ratio a / b closest to 1 from below (a fails less often than b, whose rate
    is `rate_b` per ps) that `rate_ratio_test` at two-sided `alpha` detects with
    probability `power`, given the replica-ps each arm ran: the smallest improvement these
    exposures resolve. None when even a ratio near 0 is not detected that often (too few
    expected failures in b, or rate_b 0). The search bisects the exact power
    (`rate_test_power`) in log ratio; with equal exposures a ratio of 0.5 needs about 70
    expected failures in all at 80 % power."""
    _check_power_inputs(exposure_a, exposure_b, rate_b, power, alpha)
    if rate_b == 0:
        return None
    power_at = _power_function(exposure_a, exposure_b, rate_b, alpha, 1.0)
    low, high = 1e-6, 1.0  # power(low) >= power > power(high) (log-space bisection between)
    if power_at(low) < power:
        return None
    for _ in range(40):
        mid = math.sqrt(low * high)
        if power_at(mid) >= power:
            low = mid
        else:
            high = mid
        if high / low < 1 + 1e-4:
            break
    return float(low)


def fisher_p(stable_a: int, n_a: int, stable_b: int, n_b: int) -> float:
    """Two-sided Fisher exact test of two stable fractions at the horizon."""
    from scipy import stats

    return float(stats.fisher_exact([[stable_a, n_a - stable_a], [stable_b, n_b - stable_b]]).pvalue)

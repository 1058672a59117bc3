"""Survival statistics on censored stable times with explicit event flags, against values
worked out by hand."""
import math

import numpy as np
import pytest

from openmm_stable.errors import InputError
from openmm_stable.statistics import (binomial_test_p_values, bootstrap_median_interval, detectable_rate_ratio,
                                      failure_rate, fisher_p, kaplan_meier, km_median, logrank_p, rate_ratio_test,
                                      rate_test_power)


def test_kaplan_meier_by_hand():
    # 4 replicas, horizon 10: failures at 1 and 3, two censored at the horizon.
    times, survival = kaplan_meier([1.0, 3.0, 10.0, 10.0], [True, True, False, False], horizon=10.0)
    assert times.tolist() == [0.0, 1.0, 3.0, 10.0]
    assert np.allclose(survival, [1.0, 0.75, 0.5, 0.5])
    assert km_median([1.0, 3.0, 10.0, 10.0], [1, 1, 0, 0], 10.0) == 3.0
    assert km_median([1.0, 10.0, 10.0, 10.0], [True, False, False, False], 10.0) is None  # beyond the horizon
    assert km_median([2.0, 2.0, 4.0, 6.0], [True] * 4, 10.0) == 2.0


def test_a_failure_at_the_horizon_is_an_event():
    """Two of four replicas fail AT the last check (time = horizon, like the survivor): by
    hand S(1) = 3/4, S(10) = 3/4 * (1 - 2/3) = 1/4, so the median is 10, not 'beyond'."""
    t, f = [1.0, 10.0, 10.0, 10.0], [True, True, True, False]
    times, survival = kaplan_meier(t, f, 10.0)
    assert times.tolist() == [0.0, 1.0, 10.0] and np.allclose(survival, [1.0, 0.75, 0.25])
    assert km_median(t, f, 10.0) == 10.0
    # the same times read as censored (what t < horizon inferred) say the opposite
    assert km_median(t, [True, False, False, False], 10.0) is None
    # log-rank: all four failing at the horizon differs from all four surviving it
    assert logrank_p([10.0] * 8, [True] * 8, [10.0] * 8, [False] * 8, 10.0) < 0.01
    assert bootstrap_median_interval(t, f, 10.0, n_boot=200)[1] == 10.0


def test_times_beyond_the_horizon_are_censored_there():
    """A longer run's failures after the common window are survivors of that window."""
    assert km_median([1.0, 2.0, 20.0, 20.0], [True, True, True, True], 10.0) == 2.0
    times, survival = kaplan_meier([1.0, 20.0], [True, True], 10.0)
    assert times.tolist() == [0.0, 1.0, 10.0] and np.allclose(survival, [1.0, 0.5, 0.5])
    cut = logrank_p([1.0, 2.0, 20.0, 30.0], [True] * 4, [3.0, 4.0, 5.0, 6.0], [True] * 4, 10.0)
    same = logrank_p([1.0, 2.0, 10.0, 10.0], [True, True, False, False], [3.0, 4.0, 5.0, 6.0], [True] * 4, 10.0)
    assert cut == pytest.approx(same, rel=1e-12)
    with pytest.raises(InputError, match="3 failed flags for 4"):
        km_median([1.0, 2.0, 3.0, 4.0], [True] * 3, 10.0)


def test_logrank_matches_the_hand_computed_statistic():
    # arm a: a failure AT the horizon (10) besides a censored survivor there
    a, fa = [1.0, 2.0, 10.0, 10.0], [True, True, True, False]
    b, fb = [3.0, 4.0, 5.0, 6.0], [True] * 4
    horizon = 10.0
    # By hand: at each failure time, expected failures of arm a = d * n_a / n, variance
    # d n_a n_b (n - d) / (n^2 (n - 1)); chi2 = (O_a - E_a)^2 / V with one degree of freedom.
    t = np.array(a + b)
    in_a = np.array([1] * 4 + [0] * 4, bool)
    failed = np.array(fa + fb)
    o = e = v = 0.0
    for u in np.unique(t[failed]):
        at_risk = t >= u
        n, n_a = at_risk.sum(), (at_risk & in_a).sum()
        d = ((t == u) & failed).sum()
        o += ((t == u) & failed & in_a).sum()
        e += d * n_a / n
        v += d * n_a * (n - n_a) * (n - d) / (n ** 2 * (n - 1)) if n > 1 else 0.0
    from scipy.stats import chi2

    assert logrank_p(a, fa, b, fb, horizon) == pytest.approx(chi2.sf((o - e) ** 2 / v, 1), rel=1e-9)
    assert logrank_p(a, fa, a, fa, horizon) == pytest.approx(1.0)
    assert logrank_p([10.0] * 3, [False] * 3, [10.0] * 3, [False] * 3, horizon) == 1.0


def test_clearly_different_arms_are_significant_and_bootstrap_brackets_the_median():
    rng = np.random.default_rng(0)
    short = rng.exponential(1.0, 64)
    long_raw = rng.exponential(8.0, 64)
    long, long_failed = np.minimum(long_raw, 5.0), long_raw < 5.0
    short_failed = np.ones(64, bool)
    assert logrank_p(short, short_failed, long, long_failed, 5.0) < 1e-6
    low, high = bootstrap_median_interval(np.minimum(short, 5.0), short < 5.0, 5.0, n_boot=500)
    assert low <= km_median(np.minimum(short, 5.0), short < 5.0, 5.0) <= high
    assert fisher_p(32, 64, 32, 64) == pytest.approx(1.0)
    with pytest.raises(InputError):
        km_median([], [], 5.0)


def test_failure_rate_by_hand():
    rate = failure_rate([1.0, 2.5, 4.0, 4.0], [True, True, True, False])
    assert rate == {"failures": 3, "replica_ps": 11.5, "rate_per_ps": pytest.approx(3 / 11.5)}
    with pytest.raises(InputError):
        failure_rate([1.0, 2.0], [True])


def test_rate_ratio_test_is_the_exact_conditional_binomial_test():
    """10 failures in 100 replica-ps against 2 in 50: under equal rates the 10 of 12 are
    Binomial(12, 2/3). p sums the outcomes no likelier than 10 (by hand from the pmf), the
    interval is Clopper-Pearson's (beta quantiles) mapped by p / (1 - p) * 50 / 100."""
    from scipy import stats

    result = rate_ratio_test(10, 100.0, 2, 50.0)
    assert result["estimate"] == pytest.approx((10 / 100) / (2 / 50))  # 2.5
    pmf = stats.binom.pmf(np.arange(13), 12, 2 / 3)
    assert result["p"] == pytest.approx(pmf[pmf <= pmf[10] * (1 + 1e-7)].sum(), rel=1e-9)
    assert result["p"] == pytest.approx(stats.binomtest(10, 12, 2 / 3).pvalue, rel=1e-12)
    lo, hi = stats.beta.ppf(0.025, 10, 3), stats.beta.ppf(0.975, 11, 2)
    assert result["lower95"] == pytest.approx(lo / (1 - lo) * 0.5, rel=1e-6)
    assert result["upper95"] == pytest.approx(hi / (1 - hi) * 0.5, rel=1e-6)
    assert result["lower95"] < 1.0 < result["upper95"]  # 12 failures cannot tell 2.5x from 1x
    strong = rate_ratio_test(40, 10.0, 4, 10.0)
    assert strong["p"] < 1e-6 and strong["lower95"] > 3.0
    assert rate_ratio_test(3, 10.0, 0, 10.0)["upper95"] == math.inf
    none = rate_ratio_test(0, 10.0, 0, 10.0)
    assert none["p"] == 1.0 and math.isnan(none["estimate"])
    with pytest.raises(InputError):
        rate_ratio_test(1, 0.0, 1, 1.0)


def test_binomial_test_p_values_are_scipys_for_every_count():
    from scipy import stats

    for n, p0 in ((1, 0.5), (7, 0.3), (40, 0.5), (101, 0.77)):
        expected = [stats.binomtest(k, n, p0).pvalue for k in range(n + 1)]
        np.testing.assert_allclose(binomial_test_p_values(n, p0), expected, rtol=1e-9, atol=1e-15)
    assert binomial_test_p_values(0, 0.4).tolist() == [1.0]


def simulated_power(ratio, exposure_a, exposure_b, rate_b, draws=1500, seed=0):
    """The fraction of simulated experiments (Poisson counts at the true rates) in which
    `rate_ratio_test` gives p < 0.05, and its standard error."""
    rng = np.random.default_rng(seed)
    ka = rng.poisson(ratio * rate_b * exposure_a, draws)
    kb = rng.poisson(rate_b * exposure_b, draws)
    p = {(a, b): rate_ratio_test(a, exposure_a, b, exposure_b)["p"] for a, b in set(zip(ka, kb))}  # once per pair
    hits = np.mean([p[pair] < 0.05 for pair in zip(ka, kb)])
    return hits, math.sqrt(hits * (1 - hits) / draws)


def test_rate_test_power_is_the_simulated_rejection_rate():
    """The exact power sum agrees with experiments simulated at the true rates and put
    through `rate_ratio_test` itself, at unequal exposures and on both sides of 1."""
    for ratio, exposure_a, exposure_b, rate_b in ((0.5, 600.0, 900.0, 0.05), (2.0, 300.0, 200.0, 0.04),
                                                  (1.0, 500.0, 500.0, 0.05)):
        exact = rate_test_power(ratio, exposure_a, exposure_b, rate_b)
        hits, se = simulated_power(ratio, exposure_a, exposure_b, rate_b)
        assert abs(exact - hits) < 4 * se + 1e-3, (ratio, exact, hits)
    assert rate_test_power(1.0, 500.0, 500.0, 0.05) <= 0.05  # an exact test: its size is at most alpha


def test_detectable_rate_ratio_of_the_known_case():
    """A 2x rate (ratio 0.5) needs about 70 failures in all for 80 % power (the rule of
    thumb of the notes, F10): at 1,000 replica-ps per arm that is a rate of ~0.047/ps in
    b. The ratio found has 80 % power exactly, also when simulated; more exposure resolves
    a ratio closer to 1; too little resolves none."""
    ratio = detectable_rate_ratio(1000.0, 1000.0, 0.047)
    assert 0.45 < ratio < 0.53
    assert 60 < 0.047 * 1000.0 * (1 + ratio) < 80  # expected failures in both arms at that ratio
    assert rate_test_power(ratio, 1000.0, 1000.0, 0.047) == pytest.approx(0.8, abs=1e-3)
    hits, se = simulated_power(ratio, 1000.0, 1000.0, 0.047)
    assert abs(hits - 0.8) < 4 * se
    assert detectable_rate_ratio(4000.0, 4000.0, 0.047) > ratio + 0.1
    assert detectable_rate_ratio(2000.0, 1000.0, 0.047) > ratio  # more exposure in a helps too
    assert detectable_rate_ratio(10.0, 10.0, 0.05) is None  # 0.5 expected failures: nothing is detectable
    assert detectable_rate_ratio(100.0, 100.0, 0.0) is None
    with pytest.raises(InputError, match="exposure_a"):
        detectable_rate_ratio(0.0, 100.0, 0.05)
    with pytest.raises(InputError, match="power and alpha"):
        detectable_rate_ratio(100.0, 100.0, 0.05, power=1.2)

"""Survival statistics on censored stable times, against values worked out by hand."""
import numpy as np
import pytest

from openmm_stable.errors import InputError
from openmm_stable.statistics import bootstrap_median_interval, fisher_p, kaplan_meier, km_median, logrank_p


def test_kaplan_meier_by_hand():
    # 4 replicas, horizon 10: failures at 1 and 3, two censored at the horizon.
    times, survival = kaplan_meier([1.0, 3.0, 10.0, 10.0], horizon=10.0)
    assert times.tolist() == [0.0, 1.0, 3.0, 10.0]
    assert np.allclose(survival, [1.0, 0.75, 0.5, 0.5])
    assert km_median([1.0, 3.0, 10.0, 10.0], 10.0) == 3.0
    assert km_median([1.0, 10.0, 10.0, 10.0], 10.0) is None  # not measured: beyond the horizon
    assert km_median([2.0, 2.0, 4.0, 6.0], 10.0) == 2.0


def test_logrank_matches_the_hand_computed_statistic():
    a, b, horizon = [1.0, 2.0, 10.0, 10.0], [3.0, 4.0, 5.0, 6.0], 10.0
    # By hand: at each failure time, expected failures of arm a = d * n_a / n, variance
    # d n_a n_b (n - d) / (n^2 (n - 1)); chi2 = (O_a - E_a)^2 / V with one degree of freedom.
    t = np.array(a + b)
    in_a = np.array([1] * 4 + [0] * 4, bool)
    failed = t < horizon
    o = e = v = 0.0
    for u in np.unique(t[failed]):
        at_risk = t >= u
        n, n_a = at_risk.sum(), (at_risk & in_a).sum()
        d = ((t == u) & failed).sum()
        o += ((t == u) & failed & in_a).sum()
        e += d * n_a / n
        v += d * n_a * (n - n_a) * (n - d) / (n ** 2 * (n - 1)) if n > 1 else 0.0
    from scipy.stats import chi2

    assert logrank_p(a, b, horizon) == pytest.approx(chi2.sf((o - e) ** 2 / v, 1), rel=1e-9)
    assert logrank_p(a, a, horizon) == pytest.approx(1.0)
    assert logrank_p([10.0] * 3, [10.0] * 3, horizon) == 1.0


def test_clearly_different_arms_are_significant_and_bootstrap_brackets_the_median():
    rng = np.random.default_rng(0)
    short = rng.exponential(1.0, 64)
    long = np.minimum(rng.exponential(8.0, 64), 5.0)
    assert logrank_p(short, long, 5.0) < 1e-6
    low, high = bootstrap_median_interval(short, 5.0, n_boot=500)
    assert low <= km_median(short, 5.0) <= high
    assert fisher_p(32, 64, 32, 64) == pytest.approx(1.0)
    with pytest.raises(InputError):
        km_median([], 5.0)

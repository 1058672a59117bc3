"""Survival numbers of a benchmark arm: stable times WITH their event flags.

A replica that fails at the last check has the same stable time as one that survived, so
an arm is always carried as {"stable_time_ps": [...], "failed": [...]} (the flags from
each `simulate` metrics.json, pooled in the same order), never as times alone. No side
effects on import (unlike `_common`, which pins thread pools).
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np


def arm_flags(arm: dict, horizon_ps: float, source: str = "arm") -> np.ndarray:
    """The arm's event flags; for a record written before they were stored, the fallback
    (and warning) of `report.failed_flags`: failed = stable time < horizon."""
    from openmm_stable.report import failed_flags

    return failed_flags({"time_ps": horizon_ps, **arm}, source)


def pool(runs: Iterable[dict]) -> tuple[list, list]:
    """(stable times, failed flags) of several simulate metrics (`report.load_metrics`),
    concatenated in order."""
    times, failed = [], []
    for m in runs:
        times += list(m["stable_time_ps"])
        failed += [bool(f) for f in m["failed"]]
    return times, failed


def summary(times, failed, horizon_ps: float, seed: int = 0) -> dict:
    """simulate's stability numbers for these replicas (stable fraction from the flags,
    Kaplan-Meier median, failures per replica-ps) plus a bootstrap interval of the median."""
    from openmm_stable.simulate import stability_metrics
    from openmm_stable.statistics import bootstrap_median_interval

    out = stability_metrics(times, failed, horizon_ps)
    out["median_interval_ps"] = list(bootstrap_median_interval(times, failed, horizon_ps, seed=seed))
    return out


def logrank(a: dict, b: dict, horizon_ps: float) -> float:
    """Log-rank p between two arms, each {"stable_time_ps", "failed"}."""
    from openmm_stable.statistics import logrank_p

    return logrank_p(a["stable_time_ps"], arm_flags(a, horizon_ps), b["stable_time_ps"], arm_flags(b, horizon_ps),
                     horizon_ps)


def median_or_horizon(median: Optional[float], horizon_ps: float) -> float:
    """A Kaplan-Meier median for a comparison: None (beyond the horizon) counts as the
    horizon, a lower bound."""
    return horizon_ps if median is None else median

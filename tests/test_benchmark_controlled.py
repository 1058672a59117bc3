"""The controlled stability benchmark end to end in its --quick mode (tiny sizes): every
stage runs, the results file has the issue's schema, and the quantities fixed by
construction come out as constructed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "stability_controlled.py"


@pytest.mark.slow
def test_stability_controlled_quick(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    # One variant arm (the force budget) with its own control, on the fragile start.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path), "--variants", "fragile",
                           "--variant-names", "stable_force_budget_1.1", "--variant-controls"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "stability_controlled.json").read_text())
    ts = payload["teacher_student"]
    # The student is the teacher with its last layer scaled by 0.8: forces exactly 0.8x.
    assert ts["force_ratio"]["start"] == pytest.approx(0.8, abs=1e-4)
    assert set(ts["hr_mse"]) == {"start", "refined", "noise_floor"}
    for exp in ("fragile", "rare"):
        result = payload[exp]
        assert {"pretrained", "stable", "energy_force_only", "large_data"} <= set(result["arms"])
        for arm in result["arms"].values():
            assert len(arm["stable_time_ps"]) == payload["n_eval_replicas"] == 4
            assert {"median_stable_time_ps", "force_mae_meV_per_A", "hr_mae", "hr_mae_window"} <= set(arm)
            assert arm["hr_window_ps"] == 0.05  # every arm's h(r) over the same first window
        # Two refinements per refined arm (quick mode), each evaluated on its own half of the
        # replicas; each control run takes exactly as many optimizer steps as its StABlE run.
        assert result["refine_seeds"] == 2 and len(result["arms"]["stable"]["force_mae_per_refinement"]) == 2
        assert result["arms"]["energy_force_only"]["learning_steps"] == result["arms"]["stable"]["learning_steps"]
        assert {"stable_vs_pretrained", "stable_vs_energy_force_only"} <= set(result["logrank_p"])
    fragile = payload["fragile"]["arms"]
    variant, control = fragile["stable_force_budget_1.1"], fragile["energy_force_only_stable_force_budget_1.1"]
    # The variant's control takes as many optimizer steps as the variant, restore steps included.
    assert control["learning_steps"] == [max(1, s + r) for s, r in zip(variant["learning_steps"],
                                                                      variant["restore_steps"])]
    assert set(variant["verdict"]) >= {"median_at_least_3x", "force_mae_within_1.1x", "hr_mae_not_worse_same_window"}
    assert 0 <= variant["logrank_p_vs_matched_control"] <= 1
    assert (tmp_path / "stability_controlled_survival.png").stat().st_size > 0


def test_pooled_arm_counts_a_failure_at_the_last_check(tmp_path):
    """An arm pools its groups' metrics.json with their event flags: a replica that failed
    at the last check (the survivors' stable time) is a failure in the stable fraction, the
    median and the log-rank test. From the times alone the arm read 0.75 stable, median
    beyond the horizon."""
    import importlib.util

    import numpy as np

    from openmm_stable.data import QMDataset
    from openmm_stable.simulate import stability_metrics

    spec = importlib.util.spec_from_file_location("stability_controlled", SCRIPT)
    controlled = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(controlled)
    args = controlled.parse_args(["--workdir", str(tmp_path), "--replicas", "4", "--refine-seeds", "2"])
    starts = QMDataset([1, 1], np.arange(36, dtype=float).reshape(6, 2, 3))
    groups = {0: ([0.5, 1.0], [True, True]), 1: ([1.0, 1.0], [False, False])}  # group 0's second: the last check
    for g, (times, failed) in groups.items():
        out = tmp_path / f"eval_arm_g{g}of2"
        out.mkdir()
        metrics = {"time_ps": 1.0, **stability_metrics(times, failed, 1.0), "hr_mae": 0.01, "force_mae_meV_per_A": 100.0}
        (out / "metrics.json").write_text(json.dumps(metrics))
    arm = controlled.evaluate_arm([None, None], "arm", starts, None, None, 1.0, tmp_path, args)
    assert arm["stable_time_ps"] == [0.5, 1.0, 1.0, 1.0] and arm["failed"] == [True, True, False, False]
    assert arm["stable_fraction"] == 0.5 and arm["failures"] == 2
    assert arm["median_stable_time_ps"] == 1.0  # survival 0.75 after 0.5 ps, 0.5 at 1 ps
    # against 4 survivors: 2 failures, not 1 (p 0.32 from the times alone)
    survivors = {"stable_time_ps": [1.0] * 4, "failed": [False] * 4}
    assert controlled._survival.logrank(arm, survivors, 1.0) == pytest.approx(0.1278, abs=1e-4)

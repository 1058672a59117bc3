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

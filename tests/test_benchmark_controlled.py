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


def _rare_failures_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rare_failures", SCRIPT.with_name("rare_failures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rare_failure_screen_rule_and_verdict_follow_the_preregistration():
    """benchmarks/rare_failures.py: the screen picks the arm the pre-registered rule names,
    and the verdict checks every pass criterion (numbers built here, no simulation)."""
    rf = _rare_failures_module()

    def arm(failures, exposure=100.0, force=80.0, hr=0.004, noise=0.002):
        return {"failures": failures, "replica_ps": exposure, "failure_rate_per_ps": failures / exposure,
                "force_mae_meV_per_A": force, "hr_mae": hr, "hr_noise_mae": noise}

    def screen(arms):
        return {"arms": arms, "rate_ratio": {f"{a}_vs_{b}": rf.ratio(arms[a], arms[b]) for a in arms for b in arms
                                             if a != b}}

    arms = {"pretrained": arm(40), "paper": arm(30), "bank_hot": arm(10), "bank_random": arm(35), "bank_hr": arm(38),
            "energy_force_only": arm(41)}
    assert rf.choose(screen(arms))[0] == "bank_hot"
    arms["bank_hot"] = arm(36)  # no better than the random direction: nothing qualifies
    assert rf.choose(screen(arms))[0] is None
    confirm = {"pretrained": arm(80, 1000.0), "bank_hot": arm(20, 1000.0, force=83.0),
               "energy_force_only": arm(78, 1000.0), "bank_random": arm(75, 1000.0)}
    result = rf.verdict(screen(confirm), "bank_hot")
    assert result["passed"] and all(result["checks"].values())
    confirm["bank_hot"] = arm(20, 1000.0, force=90.0)  # 1.125x the start's force MAE
    result = rf.verdict(screen(confirm), "bank_hot")
    assert not result["passed"] and result["checks"]["test force MAE <= 1.05x"] is False
    confirm["bank_hot"] = arm(50, 1000.0, force=80.0)  # ratio 0.625: misses the 0.5 bound
    assert not rf.verdict(screen(confirm), "bank_hot")["checks"]["rate ratio vs pretrained"]


@pytest.mark.slow
def test_rare_failures_quick(tmp_path):
    """Every stage of benchmarks/rare_failures.py on tiny data: screen and confirmation."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(SCRIPT.with_name("rare_failures.py")), "--quick", "--workdir",
                           str(tmp_path), "--phase", "all"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = json.loads((tmp_path / "stability_controlled.json").read_text())["rare_renewal"]
    assert set(section["screen"]["arms"]) == {"pretrained", "paper", "bank_hot", "bank_random", "bank_hr",
                                              "energy_force_only"}
    assert section["chosen_arm"] is not None and "checks" in section and isinstance(section["passed"], bool)
    saved = section
    assert saved["arms"]["pretrained"]["replica_ps"] > 0 and "bank_hot_vs_pretrained" in saved["rate_ratio"]
    converged = section["converged"]  # the confirmation repeated from the start trained to convergence
    assert section["primary"] == "converged" and set(converged["arms"]) == {"pretrained", "bank_hot", "bank_random",
                                                                           "energy_force_only"}
    assert converged["seeds"][0] == 300 and converged["start"]["lbfgs_iterations_run"] >= 10
    curve = (tmp_path / "converged" / "converged_start" / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("iteration,") and len(curve) >= 3


@pytest.mark.slow
def test_stability_controlled_quick_mace(tmp_path):
    """StABlE across architectures: the fragile experiment runs end to end with a MACE start
    (pre-training, refinement through the exported MACE TorchForce, control, evaluation)."""
    pytest.importorskip("mace")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path), "--experiments",
                           "fragile", "--architecture", "mace", "--preset", "tiny"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((tmp_path / "stability_controlled.json").read_text())
    assert payload["architecture"] == "mace-tiny" and "rare" not in payload
    from openmm_stable.models import read_model_record

    assert read_model_record(tmp_path / "pretrain_fragile" / "model.pt").architecture == "mace"
    arms = payload["fragile"]["arms"]
    assert {"pretrained", "stable", "energy_force_only", "large_data"} <= set(arms)
    assert arms["energy_force_only"]["learning_steps"] == arms["stable"]["learning_steps"]
    assert all(len(arm["stable_time_ps"]) == 4 for arm in arms.values())
    bad = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path / "x"), "--architecture",
                          "mace"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "teacher_student" in bad.stderr

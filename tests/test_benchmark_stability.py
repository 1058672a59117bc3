"""Smoke test of benchmark 3 (stability replication): every stage on tiny data."""
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_stability_replication_quick(tmp_path, monkeypatch):
    pytest.importorskip("tblite")
    script = ROOT / "benchmarks" / "stability_replication.py"
    results = tmp_path / "results" / "stability_quick"
    work = tmp_path / "work"
    argv = [str(script), "--quick", "--workdir", str(work), "--results", str(results)]

    # first part of a run that spans sessions: stops after pre-training (epoch budgets, so
    # that what stops each run does not depend on the machine's speed)
    monkeypatch.setattr(sys, "argv", argv + ["--stop-after", "pretrain", "--pretrain-epochs", "2"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    assert (work / "pretrain_large" / "model.pt").exists()
    assert not (work / "refine_small").exists() and not results.with_suffix(".json").exists()
    done_before = json.loads((work / "timings.json").read_text())
    assert set(done_before) == {"generate_s", "pretrain_small_s", "pretrain_large_s"}

    # a larger budget for the small set extends its finished pre-training (the budget is what
    # stopped it); the large one is kept as it is
    first = {name: json.loads((work / f"pretrain_{name}" / "metrics.json").read_text()) for name in ("small", "large")}
    assert [first[n]["stopped_reason"] for n in ("small", "large")] == ["max_epochs", "max_epochs"]
    assert first["small"]["epochs"] == first["large"]["epochs"] == 2
    budgets = ["--pretrain-epochs", "4", "2"]
    monkeypatch.setattr(sys, "argv", argv + ["--stop-after", "pretrain", *budgets])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    second = {name: json.loads((work / f"pretrain_{name}" / "metrics.json").read_text()) for name in ("small", "large")}
    assert second["large"] == first["large"]
    assert second["small"]["epochs"] == 4 and second["small"]["stopped_reason"] == "max_epochs"
    assert second["small"]["train_time_s"] > first["small"]["train_time_s"]  # summed over both sessions

    # the rest, with the energy/force-only control: finished stages are loaded, not redone
    monkeypatch.setattr(sys, "argv", argv + ["--control", *budgets])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    timings = json.loads((work / "timings.json").read_text())
    assert {k: timings[k] for k in done_before} == done_before
    summary = json.loads(results.with_suffix(".json").read_text())
    assert set(summary["metrics"]) == {"pretrained-small", "pretrained-large", "stable-small",
                                       "energy-force-only-small"}
    from openmm_stable.data import load_dataset
    from openmm_stable.models import load_model
    from openmm_stable.statistics import km_median
    from openmm_stable.training.batching import evaluate

    test_set = load_dataset(work / "test.npz")
    model_files = {"pretrained-small": "pretrain_small", "pretrained-large": "pretrain_large",
                   "stable-small": "refine_small", "energy-force-only-small": "refine_small_energy_force_only"}
    steps = summary["refinement"]["learning_steps"]
    if steps == 0:  # no StABlE step, so no control step: the control is the pre-trained model
        model_files["energy-force-only-small"] = "pretrain_small"
    else:
        control = json.loads((work / "refine_small_energy_force_only" / "metrics.json").read_text())
        assert control["learning_steps"] == steps
    for label, metrics in summary["metrics"].items():
        assert metrics["n_replicas"] == 4
        # every replica carries its event flag: one that stopped before the end failed, and
        # the stable fraction and median come from the flags, not from the times alone
        times, failed = np.asarray(metrics["stable_time_ps"]), np.asarray(metrics["failed"], dtype=bool)
        assert failed[times < metrics["time_ps"] - 1e-9].all()
        assert metrics["stable_fraction"] == pytest.approx(1 - failed.mean())
        assert metrics["median_stable_time_ps"] == km_median(times, failed, metrics["time_ps"])
        assert summary["statistics"]["arms"][label]["km_median_ps"] == metrics["median_stable_time_ps"]
        # the test-set force error is the saved model's on the saved test frames
        expected = evaluate(load_model(work / model_files[label] / "model.pt"), test_set)["force_mae_meV_per_A"]
        assert metrics["force_mae_meV_per_A"] == pytest.approx(expected, rel=1e-4), label
    assert summary["compute"]["stable-small"]["sim_steps"] > 0
    # compute spent on pre-training: the training time summed over both sessions
    assert summary["compute"]["pretrained-small"]["wall_s"] == second["small"]["train_time_s"]
    assert len(summary["targets_met"]) == 5
    # every pair with the refined model is tested, on the same replicas
    assert set(summary["statistics"]["logrank_p"]) >= {"stable-small vs pretrained-small",
                                                       "stable-small vs energy-force-only-small"}
    assert all(0 <= p <= 1 for p in summary["statistics"]["logrank_p"].values())
    assert "| stable-small |" in results.with_suffix(".md").read_text()


def test_survival_statistics_count_a_failure_at_the_last_check():
    """Replicas that failed at the last check have the survivors' stable time; only their
    flags tell them apart. Counted as survivors (times alone), both arms would have no
    failure: no median, and a log-rank p of 1."""
    survival_statistics = runpy.run_path(str(ROOT / "benchmarks" / "stability_replication.py"))["survival_statistics"]
    metrics = {"stable-small": {"stable_time_ps": [1.0] * 8, "failed": [True] * 8},
               "pretrained-small": {"stable_time_ps": [1.0] * 8, "failed": [False] * 8}}
    statistics = survival_statistics(metrics, 1.0, 0)
    assert statistics["arms"]["stable-small"]["km_median_ps"] == 1.0
    assert statistics["arms"]["stable-small"]["median_interval_ps"] == [1.0, 1.0]
    assert statistics["arms"]["pretrained-small"]["km_median_ps"] is None
    assert statistics["logrank_p"]["stable-small vs pretrained-small"] < 1e-3


def test_logrank_of_arms_failing_together_is_one():
    """Two arms whose replicas all fail at the same first check carry no evidence of a
    difference: p = 1 (scipy's test gives NaN there, which read "not significant")."""
    survival_statistics = runpy.run_path(str(ROOT / "benchmarks" / "stability_replication.py"))["survival_statistics"]
    arm = {"stable_time_ps": [0.1] * 4, "failed": [True] * 4}
    statistics = survival_statistics({"stable-small": arm, "pretrained-small": dict(arm)}, 0.2, 0)
    assert statistics["logrank_p"]["stable-small vs pretrained-small"] == 1.0

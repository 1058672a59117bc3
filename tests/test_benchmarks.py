"""Smoke tests of the benchmark scripts: their --quick modes run and report finite, positive
ratios (not the targets: the quick modes are far too short to be meaningful timings)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, out: Path, *extra: str, timeout: float = 120) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENMM_CPU_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_engine_throughput_quick(tmp_path):
    stdout = run_script("engine_throughput.py", tmp_path)
    payload = json.loads((tmp_path / "engine_throughput_quick.json").read_text())
    assert {r["replicas"] for r in payload["results"]} == {1, 8}
    assert {r["method"] for r in payload["results"]} == {"batched", "bare", "bare-guarded", "per-replica", "ase"}
    for key in ("replica_steps_per_s", "replica_steps_per_cpu_s"):  # wall-clock and CPU-time rates
        assert all(positive_finite(r[key]) for r in payload["results"])
    for ratios in (payload["summary"]["ratios"], payload["summary"]["ratios_wall"]):
        assert len(ratios) == 2
        for row in ratios:
            for key in ("batched/bare", "batched/bare-guarded", "batched/per-replica", "batched/ase"):
                assert positive_finite(row[key]), (key, row)
    assert "batched/per-replica" in stdout and "replica-steps per CPU-second" in stdout
    assert (tmp_path / "engine_throughput_quick_vs_replicas.png").stat().st_size > 0


@pytest.mark.slow
def test_estimator_cost_quick(tmp_path):
    stdout = run_script("estimator_cost.py", tmp_path)
    payload = json.loads((tmp_path / "estimator_cost_quick.json").read_text())
    rows = payload["summary"]["rows"]
    assert [(r["variant"], r["baseline"]) for r in rows] == [
        ("single", "jacobian"), ("single-mb4", "jacobian"), ("single", "paper"), ("single-mb4", "paper")]
    for row in rows:
        for key in ("speedup", "single_s", "baseline_s"):
            assert positive_finite(row[key]), (key, row)
        # Peak-RSS growth of a tiny call can round to 0 pages; it is never negative or missing.
        for key in ("memory_ratio", "single_peak_mib", "baseline_peak_mib"):
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
        # All forms give the same gradient (float64): ours against the Jacobian, and the
        # paper's form against the Jacobian.
        assert row["max_rel_diff"] < 1e-8
        assert row["baseline_max_rel_diff"] < 1e-8
    assert "speedup" in stdout and "memory ratio" in stdout
    assert (tmp_path / "estimator_cost_quick.png").stat().st_size > 0


def test_engine_mace_quick(tmp_path):
    # our engine, the bare loop and openmm-ml's MLPotential('mace') on one exported .model (~20 s)
    stdout = run_script("engine_mace.py", tmp_path)
    payload = json.loads((tmp_path / "engine_mace_quick.json").read_text())
    assert {r["method"] for r in payload["results"]} == {"batched", "bare", "openmm-ml"}
    assert all(positive_finite(r["replica_steps_per_cpu_s"]) for r in payload["results"])
    (row,) = payload["summary"]["ratios"]
    assert row["replicas"] == 2
    assert positive_finite(row["batched/openmm-ml"]) and positive_finite(row["batched/bare"])
    assert "batched/openmm-ml" in stdout
    # both routes compute the same model: openmm-ml's forces on the exported file are ours (float32)
    assert payload["same_model_check"]["max_abs_force_kj_per_mol_nm"] > 1.0
    assert payload["same_model_check"]["max_abs_difference_relative"] < 1e-3


@pytest.mark.parametrize("script", ["engine_throughput.py", "estimator_cost.py", "engine_mace.py"])
def test_help(script):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout


# --- ProcessRunner: one worker process per runner (benchmarks/_common.py) ----------------------
sys.path.insert(0, str(BENCHMARKS))
from _common import ProcessRunner, Runner  # noqa: E402


class _SpinRunner(Runner):
    """Burns CPU in `run` and remembers its process id and last reset seed."""

    def __init__(self, n_replicas: int):
        self.n_replicas = n_replicas
        self.seed = None

    def reset(self, seed: int) -> None:
        self.seed = seed

    def run(self, n_steps: int) -> None:
        sum(i * i for i in range(20_000 * n_steps))

    def where(self) -> tuple:
        return os.getpid(), self.seed


def _spin_runner(n_replicas: int) -> Runner:
    return _SpinRunner(n_replicas)


def _broken_runner(n_replicas: int) -> Runner:
    raise ValueError(f"cannot build {n_replicas} replicas")


def test_process_runner_runs_and_times_in_its_own_process():
    runner = ProcessRunner("spin", 3, _spin_runner, 3)
    try:
        assert runner.setup_s >= 0 and runner.n_replicas == 3
        runner.reset(seed=7)
        pid, seed = runner._call("where")
        assert pid != os.getpid() and seed == 7
        wall, cpu, sys_cpu, faults = runner.timed_run(20)
        # The CPU time is the worker's: this process only waited on the pipe.
        assert wall > 0 and 0.005 < cpu <= wall + 0.01 and sys_cpu >= 0 and faults >= 0
    finally:
        runner.close()
    assert not runner._proc.is_alive()


def test_process_runner_reports_a_failed_build():
    runner = ProcessRunner("broken", 2, _broken_runner, 2)
    try:
        with pytest.raises(RuntimeError, match="cannot build 2 replicas"):
            runner.reset(seed=0)
    finally:
        runner.close()
    assert not runner._proc.is_alive()


# --- rederive_censoring.py: published numbers with failures at the last check -------------------
def test_rederive_recovers_failures_at_the_last_check(tmp_path):
    """A simulate metrics file counted its stable fraction from the check mask: of the two
    replicas at the 1 ps horizon only one survived, so one failed at the last check. The
    re-derived median and log-rank p count it; the controlled file's cannot be recovered."""
    import runpy

    rederive = runpy.run_path(str(BENCHMARKS / "rederive_censoring.py"))["main"]
    arm = lambda times, fraction: {"time_ps": 1.0, "stable_time_ps": times, "stable_fraction": fraction,  # noqa: E731
                                   "median_stable_time_ps": 1.0}
    (tmp_path / "water.json").write_text(json.dumps({
        "settings": {"seed": 0}, "metrics": {"a": arm([0.5, 1.0, 1.0], 1 / 3), "b": arm([1.0, 1.0, 1.0], 1.0)},
        "statistics": {"logrank_p": {"a vs b": 0.32}}}))
    (tmp_path / "stability_controlled.json").write_text(json.dumps({"fragile": {"horizon_ps": 1.0, "arms": {
        "stable": {"stable_time_ps": [0.5, 1.0], "stable_fraction": 0.5, "median_stable_time_ps": 0.5,
                   "median_interval_ps": [0.5, 1.0]}}, "logrank_p": {}}}))
    report = rederive(["--results-dir", str(tmp_path)])
    a = report["files"]["water.json"]["arms"]["a"]
    assert a["failed_at_last_check"] == 1 and a["replicas_at_horizon"] == 2
    assert a["stable_fraction"]["new"] == pytest.approx(1 / 3) and not a["stable_fraction"]["moved"]
    assert a["km_median_ps"]["old"] is None and a["km_median_ps"]["new"] == 1.0 and a["km_median_ps"]["moved"]
    p = report["files"]["water.json"]["logrank_p"]["a vs b"]
    assert p["old"] == 0.32 and p["new"] == pytest.approx(0.1161, abs=1e-4)  # 2 failures in 3 against none, not 1
    controlled = report["files"]["stability_controlled.json"]["experiments"]["fragile"]["arms"]["stable"]
    assert controlled["recoverable"] is False and controlled["stable_fraction"]["new"] == "not recoverable"
    assert json.loads((tmp_path / "censoring_rederived.json").read_text())["moved"] == report["moved"]

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


@pytest.mark.parametrize("script", ["engine_throughput.py", "estimator_cost.py"])
def test_help(script):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout

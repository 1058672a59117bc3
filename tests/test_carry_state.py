"""benchmarks/carry_state.py keeps the outputs of finished stages and nothing else."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "carry_state.py"


def _module():
    spec = importlib.util.spec_from_file_location("carry_state", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_save_keeps_finished_stages_and_restore_puts_them_back(tmp_path):
    work = tmp_path / "work"
    files = {
        "ethanol_xtb.npz": b"data", "ethanol_xtb.npz.partial.extxyz": b"x", "timings.json": b"{}",
        "pretrain_rare/model.pt": b"m", "pretrain_rare/checkpoint_last.pt": b"c",
        "refine_a_seed0/model.pt": b"m", "refine_a_seed0/metrics.json": b"{}", "refine_a_seed0/bank_log.csv": b"l",
        "refine_a_seed0/snapshots/cycle_001.pt": b"s",
        "refine_a_seed1/checkpoint.pt": b"c", "refine_a_seed1/bank_log.csv": b"unfinished",
        "eval_x_g0/metrics.json": b"{}", "eval_x_g0/hr.npz": b"h", "eval_x_g0/frames/chunk.npz": b"f",
        "eval_x_g1/progress.json": b"{}",
    }
    for name, content in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(content)
    state = tmp_path / "state"
    saved = _module().main(["save", str(work), str(state)])
    assert sorted(saved) == sorted(["ethanol_xtb.npz", "timings.json", "pretrain_rare/model.pt",
                                    "refine_a_seed0/model.pt", "refine_a_seed0/metrics.json",
                                    "refine_a_seed0/bank_log.csv", "eval_x_g0/metrics.json", "eval_x_g0/hr.npz"])
    fresh = tmp_path / "fresh"
    restored = _module().main(["restore", str(state), str(fresh)])
    assert sorted(restored) == sorted(saved)
    assert (fresh / "refine_a_seed0" / "bank_log.csv").read_bytes() == b"l"

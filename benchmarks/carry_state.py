"""Carry a long experiment's finished stages from one session to the next.

A session's machine and its work directories are gone when the session ends; only the
repository stays. The benchmark scripts skip every stage whose output exists, so copying
the outputs of the finished stages (data, models, evaluation metrics: small files) into
the repository and back into a fresh work directory lets the next session continue where
this one stopped. Checkpoints, frames and trajectories are left out (large, and an
unfinished stage is simply re-run from its start).

    python benchmarks/carry_state.py save ../rare_runs benchmarks/state/rare_runs
    python benchmarks/carry_state.py restore benchmarks/state/rare_runs ../rare_runs
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# What a finished stage leaves that a later stage or the combining run reads.
KEPT_NAMES = ("model.pt", "metrics.json", "bank_log.csv", "log.csv", "curve.csv", "config.yaml",
              "learning_choice.json", "timings.json")
KEPT_SUFFIXES = (".npz",)  # datasets (the evaluation's held-out starts among them), h(r) and RDF curves
SKIPPED_DIRS = ("frames", "trajectories", "snapshots")


def kept(path: Path, root: Path) -> bool:
    if any(part in SKIPPED_DIRS for part in path.relative_to(root).parts[:-1]):
        return False
    folder = path.parent
    if folder != root and not ((folder / "metrics.json").exists() or (folder / "model.pt").exists()):
        return False  # an unfinished stage: re-run from its start next time
    if path.name.endswith(".partial.extxyz") or path.name.endswith(".partial.json"):
        return False
    return path.name in KEPT_NAMES or path.suffix in KEPT_SUFFIXES


def copy_tree(source: Path, dest: Path, only_kept: bool) -> list:
    copied = []
    for path in sorted(source.rglob("*")):
        if not path.is_file() or (only_kept and not kept(path, source)):
            continue
        target = dest / path.relative_to(source)
        if target.exists() and target.stat().st_size == path.stat().st_size and not only_kept:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(str(path.relative_to(source)))
    return copied


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["save", "restore"])
    p.add_argument("source")
    p.add_argument("dest")
    args = p.parse_args(argv)
    source, dest = Path(args.source), Path(args.dest)
    if not source.is_dir():
        p.error(f"{source} is not a directory")
    copied = copy_tree(source, dest, only_kept=args.action == "save")
    size = sum((dest / name).stat().st_size for name in copied)
    print(f"{args.action}: {len(copied)} files, {size / 1e6:.1f} MB, {source} -> {dest}")
    return copied


if __name__ == "__main__":
    main()

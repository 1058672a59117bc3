"""Stages of a long benchmark that resumes across sessions (no side effects on import).

Each stage writes its outputs to a work directory and is skipped when they exist; its wall
time goes into ``<workdir>/timings.json`` once, so a resumed run reports the time the stage
took when it ran, not the time spent loading its outputs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def stage(name: str) -> None:
    print(f"\n=== {name}", flush=True)


class StageTimings:
    """``timed(key, fn)`` runs `fn` and records its wall time under `key` unless an earlier
    run recorded one (then `fn` is expected only to load the stage's outputs)."""

    def __init__(self, work: Path):
        self.path = Path(work) / "timings.json"
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __call__(self, key: str, fn: Callable[[], T]) -> T:
        if key in self.seconds:
            return fn()
        t0 = time.perf_counter()
        out = fn()
        self.seconds[key] = time.perf_counter() - t0
        self.path.write_text(json.dumps(self.seconds, indent=2))
        return out

"""Small file helpers shared by the stages: atomic writes, CSV logs, RNG state.

Checkpoints and logs are written to a temporary file and renamed, so a run killed at any
moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def atomic_write_text(path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def atomic_write_json(path, values) -> Path:
    return atomic_write_text(path, json.dumps(values, indent=2))


def atomic_torch_save(payload, path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def write_csv(path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    """The whole log each time, so after a resume it matches the checkpoint exactly."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    tmp.replace(path)
    return path


def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])

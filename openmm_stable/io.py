"""Small file helpers shared by the stages: atomic writes, safe model/checkpoint files,
CSV logs, RNG state.

Checkpoints and logs are written to a temporary file and renamed, so a run killed at any
moment leaves either the old file or the new one, never half of one.

Model files and checkpoints are files users hand each other, so they are read with
``torch.load(weights_only=True)``: tensors, numbers, strings, bytes, lists, tuples and dicts
only, never Python objects (a pickle can run code when it is opened). `save_torch_file`
writes numpy arrays and scalars in a tagged tensor form that this restricted reader
accepts, and `load_torch_file` turns them back.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def atomic_path(path):
    """For writers that take a file name (np.savez, savefig, mdtraj): yields a temporary
    name next to `path`, renamed to `path` when the block succeeds, removed when it fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


_NDARRAY_TAG = "__openmm_stable_ndarray__"


def _encode(value, where: str = "payload"):
    """`value` in the types `torch.load(weights_only=True)` reads; numpy arrays become
    {tag: uint8 tensor of their bytes, "dtype", "shape"}. Anything else is an error here,
    at write time, rather than a file nobody can open safely."""
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError(f"{where}: numpy object arrays cannot be stored safely")
        array = np.ascontiguousarray(value)
        return {_NDARRAY_TAG: torch.from_numpy(array.reshape(-1).view(np.uint8).copy()),
                "dtype": array.dtype.str, "shape": list(array.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.dtype)):
        return value
    raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a model or checkpoint file")


def _decode(value):
    if isinstance(value, dict):
        if _NDARRAY_TAG in value:
            raw = value[_NDARRAY_TAG].numpy()
            return raw.view(np.dtype(value["dtype"])).reshape(value["shape"]).copy()
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_decode(v) for v in value)
    return value


def save_torch_file(payload, path) -> Path:
    """Write `payload` (atomically) so that `load_torch_file` can read it without pickle."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(_encode(payload), tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _numpy_globals() -> list:
    """What files of earlier versions need to hold plain numeric numpy arrays (our model
    files stored atomic numbers that way): array reconstruction and numeric dtypes only."""
    from numpy import dtypes

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    numeric = [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType") and
               name not in ("ObjectDType", "VoidDType", "StringDType")]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *numeric]


def load_torch_file(path, map_location="cpu"):
    """Read a file written by `save_torch_file` (or a plain numeric one of an earlier
    version) with torch's weights-only reader; a file holding any other Python object is
    refused without running it (`InputError`)."""
    import pickle

    from openmm_stable.errors import InputError

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if found:
            raise InputError(f"{path}: refused to open: it holds Python objects that loading would have to run "
                             f"(weights-only reader: {found[0]}). openmm-stable files hold only tensors, numbers "
                             "and text; a file from elsewhere is not opened as a pickle.") from None
        lines = [line.strip() for line in str(err).split("WeightsUnpickler error:")[-1].splitlines() if line.strip()]
        raise InputError(f"{path}: not a readable openmm-stable model or checkpoint file (weights-only reader: "
                         f"{lines[0] if lines else 'unreadable'}; it is not opened as a pickle)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable openmm-stable model or checkpoint file "
                         f"({str(err).splitlines()[0]})") from None
    return _decode(payload)


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

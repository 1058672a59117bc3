"""Train/validation/test splits with human-sized counts ("1k", "50k", "0.1").

Two modes: ``random`` (numpy ``default_rng(seed)``, the usual MD17 protocol) and
``contiguous`` (train, then val, then test as consecutive blocks in time), which keeps
correlated neighbouring MD frames out of each other's splits.

Usage::

    train, val, test = split_dataset(ds, "1k", "100", "200", mode="contiguous")
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional, Union

import numpy as np

from openmm_stable.errors import InputError
from openmm_stable.data.dataset import QMDataset

Size = Union[int, float, str, None]

_SUFFIXES = {"": 1, "k": 1_000, "m": 1_000_000}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([km%]?)\s*$", re.IGNORECASE)


class Split(NamedTuple):
    train: Optional[QMDataset]
    val: Optional[QMDataset]
    test: Optional[QMDataset]


def _parse(size: Size) -> tuple[float, bool]:
    """(value, is_fraction): a count, or a fraction of the dataset in [0, 1]."""
    if isinstance(size, bool) or size is None:
        raise InputError(f"invalid size {size!r}")
    if isinstance(size, (int, np.integer)):
        value, suffix = float(size), ""
    elif isinstance(size, (float, np.floating)):
        value, suffix = float(size), ""
    else:
        match = _SIZE_RE.match(str(size))
        if not match:
            raise InputError(f"invalid size {size!r}: use a count like 200, 1k, 1.5k, 2M, a fraction like 0.1, or 10%")
        value, suffix = float(match.group(1)), match.group(2).lower()
    if value < 0:
        raise InputError(f"invalid size {size!r}: negative")
    if suffix == "%" or (suffix == "" and 0 < value < 1):
        fraction = value / 100 if suffix == "%" else value
        if fraction > 1:
            raise InputError(f"invalid size {size!r}: more than 100%")
        return fraction, True
    count = value * _SUFFIXES[suffix]
    if abs(count - round(count)) > 1e-9:
        raise InputError(f"invalid size {size!r}: not a whole number of frames")
    return float(round(count)), False


def parse_size(size: Size, n_total: Optional[int] = None) -> int:
    """Frame count from ``200``, ``"1k"``, ``"1.5k"``, ``"2M"``, ``"10%"`` or a fraction ``"0.1"``.

    A number strictly between 0 and 1, or a percentage, is a fraction of ``n_total``
    (rounded to the nearest frame), so it needs ``n_total``.
    """
    value, is_fraction = _parse(size)
    if not is_fraction:
        return int(value)
    if n_total is None:
        raise InputError(f"size {size!r} is a fraction and needs the dataset size")
    return int(round(value * n_total))


def split_indices(
    n_total: int, train: Size, val: Size, test: Size = None, mode: str = "random", seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame indices of the three splits (each sorted); ``test=None`` takes all remaining frames."""
    given = {"train": train, "val": val, "test": test}
    counts = {name: parse_size(size, n_total) for name, size in given.items() if size is not None}
    parsed = {name: _parse(size) for name, size in given.items() if size is not None}
    # A fraction > 0 that rounds to no frame would silently give an empty part (refine's
    # validation set of 10 % of 4 frames): too few frames for the split asked for.
    empty = [name for name, (value, fraction) in parsed.items() if fraction and value > 0 and counts[name] == 0]
    if empty:
        asked = " / ".join(f"{name} {given[name]}" for name in given if given[name] is not None)
        raise InputError(f"{n_total} frames: too few for a train/val/test split of {asked}: "
                         f"{' and '.join(empty)} would get 0 frames; use a larger dataset or give the sizes as counts")
    # Fractions that add up to at most 1 never ask for more frames than there are: a frame
    # too many from rounding up each part comes off the largest fractional part.
    over = sum(counts.values()) - n_total
    fractional = [name for name, (_, fraction) in parsed.items() if fraction]
    if 0 < over <= len(fractional) and sum(value for value, fraction in parsed.values() if fraction) <= 1 + 1e-12 \
            and sum(v for k, v in counts.items() if k not in fractional) == 0:
        counts[max(fractional, key=lambda name: counts[name])] -= over
    n_train, n_val = counts["train"], counts["val"]
    n_test = n_total - n_train - n_val if test is None else counts["test"]
    requested = n_train + n_val + max(n_test, 0)
    if n_test < 0 or requested > n_total:
        raise InputError(
            f"split sizes train={n_train} + val={n_val} + test={max(n_test, 0)} = {requested} "
            f"exceed the {n_total} frames of the dataset"
        )
    if mode == "contiguous":
        order = np.arange(n_total)
    elif mode == "random":
        order = np.random.default_rng(seed).permutation(n_total)
    else:
        raise InputError(f"unknown split mode {mode!r}; use 'random' or 'contiguous'")
    cuts = np.cumsum([n_train, n_val, n_test])
    return (
        np.sort(order[: cuts[0]]),
        np.sort(order[cuts[0] : cuts[1]]),
        np.sort(order[cuts[1] : cuts[2]]),
    )


def split_dataset(
    ds: QMDataset, train: Size, val: Size, test: Size = None, mode: str = "random", seed: int = 0
) -> Split:
    """Split `ds` into (train, val, test) datasets; see `parse_size` for the size syntax.

    Frames within each split stay in time order. Each part records in its metadata how it
    was made (mode, seed, sizes, parent fingerprint), so a model can name its data. A part
    of size 0 (e.g. ``test=0``) is None, since a `QMDataset` always holds frames.
    """
    parts = split_indices(len(ds), train, val, test, mode=mode, seed=seed)
    sizes = {name: int(len(idx)) for name, idx in zip(Split._fields, parts)}
    parent = ds.fingerprint()
    out = []
    for name, idx in zip(Split._fields, parts):
        if len(idx) == 0:
            out.append(None)
            continue
        part = ds.subset(idx)
        part.metadata["split"] = {"part": name, "mode": mode, "seed": seed, "sizes": sizes, "parent_fingerprint": parent}
        out.append(part)
    return Split(*out)

"""Stability criteria: per-frame numbers that say when a simulation has gone unphysical.

StABlE training watches many replicas and switches to a learning phase once enough of
them are unstable; evaluation reports how long each replica stays stable. A criterion is
one small object (like an ASE calculator, one narrow protocol):

    values = criterion(positions, box=None)   # (...,) one value per frame
    flags = criterion.unstable(values)         # bool tensor, same shape

Positions are (..., N, 3) Angstrom (tensor or ndarray); every leading dim is kept, so
(T, R, N, 3) frames of R replicas give (T, R) values, ready for `first_instability`.
Each criterion knows its direction: bond deviation is unstable ABOVE its threshold,
minimum intermolecular distance BELOW it.

Thresholds follow the paper: a bond-length deviation of 0.5 A for evaluation and 0.25 A
during training (stricter, so that learning starts before molecules fall apart), and a
minimum intermolecular distance of 1.2 A for liquid water.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Optional, Protocol, runtime_checkable

import numpy as np
import torch

from openmm_stable.errors import InputError
from openmm_stable.geometry import (ArrayLike, as_tensor, bond_lengths, find_bonds, intermolecular_pairs,
                                    minimum_pair_distance, molecule_ids)

EVALUATION_BOND_THRESHOLD = 0.5  # Angstrom
TRAINING_BOND_THRESHOLD = 0.25  # Angstrom
WATER_MIN_DISTANCE_THRESHOLD = 1.2  # Angstrom

Direction = Literal["above", "below"]


@runtime_checkable
class StabilityCriterion(Protocol):
    """Per-frame value plus a threshold and the side of it that counts as unstable."""

    threshold: float
    direction: Direction

    def __call__(self, positions: ArrayLike, box: Optional[ArrayLike] = None) -> torch.Tensor: ...

    def unstable(self, values: ArrayLike) -> torch.Tensor: ...


class _ThresholdMixin:
    threshold: float
    direction: Direction

    def unstable(self, values: ArrayLike) -> torch.Tensor:
        """Bool tensor: True where a value is past the threshold (NaN counts as unstable)."""
        v = as_tensor(values)
        bad = v > self.threshold if self.direction == "above" else v < self.threshold
        return bad | torch.isnan(v)

    is_unstable = unstable  # alias

    def check(self, positions: ArrayLike, box: Optional[ArrayLike] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, unstable flags) in one call."""
        values = self(positions, box)  # type: ignore[operator]
        return values, self.unstable(values)


def _check_direction(direction: str) -> None:
    if direction not in ("above", "below"):
        raise InputError(f"direction must be 'above' or 'below', got {direction!r}")


@dataclasses.dataclass
class BondDeviationCriterion(_ThresholdMixin):
    """max over bonds of |r_b - r_ref_b| in Angstrom; unstable above `threshold`.

    Use 0.5 A (`EVALUATION_BOND_THRESHOLD`) to report stable times and 0.25 A
    (`TRAINING_BOND_THRESHOLD`) to trigger learning during training."""

    bonds: np.ndarray  # (B, 2) int
    reference_lengths: torch.Tensor  # (B,) Angstrom
    threshold: float = EVALUATION_BOND_THRESHOLD
    direction: Direction = "above"
    box: Optional[np.ndarray] = None  # periodic box (minimum-image bond lengths); a box passed at call time wins

    def __post_init__(self) -> None:
        self.bonds = np.asarray(self.bonds, dtype=np.int64).reshape(-1, 2)
        self.reference_lengths = as_tensor(self.reference_lengths).reshape(-1)
        if self.bonds.shape[0] == 0:
            raise InputError("BondDeviationCriterion needs at least one bond")
        if self.reference_lengths.numel() != self.bonds.shape[0]:
            raise InputError(f"{self.reference_lengths.numel()} reference lengths for {self.bonds.shape[0]} bonds")
        _check_direction(self.direction)

    def __call__(self, positions: ArrayLike, box: Optional[ArrayLike] = None) -> torch.Tensor:
        pos = as_tensor(positions)
        lead = pos.shape[:-2]
        r = bond_lengths(pos, self.bonds, box if box is not None else self.box)  # (K, B)
        dev = (r - self.reference_lengths.to(r)).abs()
        return dev.amax(-1).reshape(lead)

    @classmethod
    def from_structures(
        cls,
        atomic_numbers: ArrayLike,
        positions: ArrayLike,
        threshold: float = EVALUATION_BOND_THRESHOLD,
        scale: float = 1.2,
        box: Optional[ArrayLike] = None,
    ) -> "BondDeviationCriterion":
        """Bonds from the first of the frames (F, N, 3), reference lengths = mean over all
        (minimum-image distances when a periodic `box` is given)."""
        pos = np.asarray(positions, dtype=np.float64)
        if pos.ndim == 2:
            pos = pos[None]
        bonds = find_bonds(atomic_numbers, pos[0], scale, box)
        ref = bond_lengths(torch.as_tensor(pos), bonds, box).mean(0)
        return cls(bonds, ref, threshold, box=None if box is None else np.asarray(box, dtype=np.float64))

    @classmethod
    def from_dataset(
        cls, dataset: Any, threshold: float = EVALUATION_BOND_THRESHOLD, scale: float = 1.2
    ) -> "BondDeviationCriterion":
        """From a `QMDataset`: bonds of its first frame, lengths averaged over its frames."""
        return cls.from_structures(dataset.atomic_numbers, dataset.positions, threshold, scale, dataset.box)


@dataclasses.dataclass
class MinimumDistanceCriterion(_ThresholdMixin):
    """Smallest distance between atoms of different molecules (minimum image when
    periodic); unstable BELOW `threshold` (1.2 A for water: molecules have collided).
    With `bonds`, the smallest distance between any two atoms that are not bonded: it
    also sees a molecule folding onto itself (water's two H merging), which the
    intermolecular distance misses.

    molecule_ids (N,) gives each atom's molecule; `from_atoms_per_molecule` builds it for
    systems of identical consecutive molecules. The box passed at call time overrides the
    stored one (NPT runs)."""

    molecule_ids: np.ndarray
    threshold: float = WATER_MIN_DISTANCE_THRESHOLD
    box: Optional[np.ndarray] = None
    direction: Direction = "below"
    bonds: Optional[np.ndarray] = None  # (B, 2): if given, non-bonded pairs INSIDE molecules count too

    def __post_init__(self) -> None:
        self.molecule_ids = np.asarray(self.molecule_ids, dtype=np.int64).reshape(-1)
        if self.bonds is not None:
            self.bonds = np.sort(np.asarray(self.bonds, dtype=np.int64).reshape(-1, 2), axis=1)
        self._pairs = intermolecular_pairs(self.molecule_ids, self.bonds)
        _check_direction(self.direction)

    @classmethod
    def from_atoms_per_molecule(
        cls, atoms_per_molecule: int, n_atoms: int, threshold: float = WATER_MIN_DISTANCE_THRESHOLD, box=None
    ) -> "MinimumDistanceCriterion":
        if n_atoms % atoms_per_molecule:
            raise InputError(f"{n_atoms} atoms is not a multiple of {atoms_per_molecule} atoms per molecule")
        return cls(np.arange(n_atoms) // atoms_per_molecule, threshold, box)

    def __call__(self, positions: ArrayLike, box: Optional[ArrayLike] = None) -> torch.Tensor:
        return minimum_pair_distance(positions, self._pairs, box if box is not None else self.box)


@dataclasses.dataclass
class CallableCriterion(_ThresholdMixin):
    """Wrap a user function fn(positions (..., N, 3), box) -> (...) values."""

    fn: Callable[..., Any]
    threshold: float
    direction: Direction = "above"

    def __post_init__(self) -> None:
        _check_direction(self.direction)

    def __call__(self, positions: ArrayLike, box: Optional[ArrayLike] = None) -> torch.Tensor:
        return as_tensor(self.fn(positions, box))


# --- choosing the criterion for a dataset ---------------------------------------------------
STABILITY_KINDS = ("auto", "bonds", "min_distance", "min_nonbonded_distance")


def resolve_stability(kind: str, dataset: Any) -> str:
    """'auto' -> 'min_distance' for a periodic dataset (a liquid), 'bonds' for a molecule."""
    if kind not in STABILITY_KINDS:
        raise InputError(f"unknown stability criterion {kind!r}; known: {', '.join(STABILITY_KINDS)}")
    if kind == "auto":
        return "min_distance" if getattr(dataset, "periodic", False) else "bonds"
    return kind


def make_criterion(dataset: Any, kind: str = "auto", bond_threshold: float = EVALUATION_BOND_THRESHOLD,
                   min_distance_threshold: float = WATER_MIN_DISTANCE_THRESHOLD) -> StabilityCriterion:
    """The stability criterion of `kind` (see `resolve_stability`) set up from a dataset:
    bond-length deviation (bonds and reference lengths from its frames), minimum
    intermolecular distance (molecules from `molecule_ids`, the dataset's box; the paper's
    liquid criterion), or minimum non-bonded distance (also within molecules)."""
    kind = resolve_stability(kind, dataset)
    if kind == "bonds":
        return BondDeviationCriterion.from_dataset(dataset, bond_threshold)
    bonds = None
    if kind == "min_nonbonded_distance":
        bonds = find_bonds(dataset.atomic_numbers, dataset.positions[0], box=dataset.box)
    return MinimumDistanceCriterion(molecule_ids(dataset), min_distance_threshold, box=dataset.box, bonds=bonds)


def first_instability(unstable_flags: ArrayLike, times_ps: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(stable_time (R,), failed (R,) bool) from flags (T, R) at check times (T,).

    A failed replica gets the time of its first unstable check (times_ps[0] if unstable at
    the first one), a survivor times_ps[-1] with failed False. The flag, not the time, says
    which is which: a replica that fails at the last check has the same time as a survivor
    but is an event, not a censored observation."""
    flags = torch.as_tensor(np.asarray(unstable_flags)) if not isinstance(unstable_flags, torch.Tensor) else unstable_flags
    flags = flags.bool()
    if flags.ndim == 1:
        flags = flags[:, None]
    t = as_tensor(times_ps).reshape(-1)
    if t.numel() != flags.shape[0] or t.numel() == 0:
        raise InputError(f"{t.numel()} times for {flags.shape[0]} checks (need one time per check, at least one)")
    t = t.to(flags.device)
    failed = flags.any(0)
    first = flags.to(torch.int8).argmax(0)  # index of the first True (0 if none)
    return torch.where(failed, t[first], torch.full_like(t[first], float(t[-1]))), failed


def survival_curve(
    stable_times: ArrayLike, failed: ArrayLike, horizon: float, n_points: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of replicas still stable at each time: (times, fraction_stable).

    A replica counts as stable at t if it had not failed by t: it failed after t, or never
    failed (`failed` False: censored, stable up to its time and counted as stable to the
    horizon). Without n_points the times are 0, every failure time and the horizon (plot
    as a step function, drawstyle="steps-post"); with n_points, a uniform grid on
    [0, horizon]."""
    s = as_tensor(stable_times).to(torch.float64).reshape(-1)
    f = torch.as_tensor(np.asarray(failed, dtype=bool).reshape(-1), device=s.device)
    if f.numel() != s.numel():
        raise InputError(f"{f.numel()} failed flags for {s.numel()} stable times")
    if n_points is None:
        fails = torch.unique(s[f])
        zero = torch.zeros(1, dtype=s.dtype, device=s.device)
        end = torch.full((1,), float(horizon), dtype=s.dtype, device=s.device)
        times = torch.unique(torch.cat([zero, fails[fails <= horizon], end]))
    else:
        times = torch.linspace(0.0, float(horizon), n_points, dtype=s.dtype, device=s.device)
    alive = (s[None, :] > times[:, None]) | ~f[None, :]
    return times, alive.to(s.dtype).mean(1)

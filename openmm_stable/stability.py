"""Stability criteria: per-frame numbers that say when a simulation has gone unphysical.

StABlE training watches many replicas and switches to a learning phase once enough of
them are unstable; evaluation reports how long each replica stays stable. A criterion is
one small object (like an ASE calculator, one narrow protocol):

    values = criterion(positions, box=None)   # (...,) one value per frame
    flags = criterion.unstable(values)         # bool tensor, same shape

Positions are (..., N, 3) Angstrom (tensor or ndarray); every leading dim is kept, so
(T, R, N, 3) frames of R replicas give (T, R) values, ready for `first_instability_time`.
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

from .observables import ArrayLike, _as_tensor, _box_tensor, bond_lengths, minimum_image

from openmm_stable.errors import InputError

EVALUATION_BOND_THRESHOLD = 0.5  # Angstrom
TRAINING_BOND_THRESHOLD = 0.25  # Angstrom
WATER_MIN_DISTANCE_THRESHOLD = 1.2  # Angstrom

Direction = Literal["above", "below"]


def find_bonds(atomic_numbers: ArrayLike, positions: ArrayLike, scale: float = 1.2,
               box: Optional[ArrayLike] = None) -> np.ndarray:
    """Bonded pairs (B, 2), i < j, of a reference structure: r_ij < scale (rc_i + rc_j).

    rc are ASE's covalent radii (Cordero et al.). positions (N, 3) or (F, N, 3) (the first
    frame is used; it should be a sane, e.g. optimised or dataset, structure). With a
    periodic `box` (3, 3), distances are minimum-image ones."""
    from ase.data import chemical_symbols, covalent_radii, missing

    z = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    bad = [int(a) for a in z if a < 1 or a >= len(covalent_radii) or covalent_radii[a] == missing]
    if bad:
        names = [chemical_symbols[a] if 0 < a < len(chemical_symbols) else str(a) for a in sorted(set(bad))]
        raise InputError(f"no covalent radius known for element(s) {names}; pass bonds explicitly")
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim == 3:
        pos = pos[0]
    if pos.shape != (z.size, 3):
        raise InputError(f"positions shape {pos.shape} does not match {z.size} atoms")
    i, j = np.triu_indices(z.size, k=1)
    dr = torch.as_tensor(pos[j] - pos[i])
    d = torch.linalg.vector_norm(minimum_image(dr, box), dim=-1).numpy()
    cutoff = scale * (covalent_radii[z[i]] + covalent_radii[z[j]])
    keep = d < cutoff
    return np.stack([i[keep], j[keep]], axis=1).astype(np.int64)


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
        v = _as_tensor(values)
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
        self.reference_lengths = _as_tensor(self.reference_lengths).reshape(-1)
        if self.bonds.shape[0] == 0:
            raise InputError("BondDeviationCriterion needs at least one bond")
        if self.reference_lengths.numel() != self.bonds.shape[0]:
            raise InputError(f"{self.reference_lengths.numel()} reference lengths for {self.bonds.shape[0]} bonds")
        _check_direction(self.direction)

    def __call__(self, positions: ArrayLike, box: Optional[ArrayLike] = None) -> torch.Tensor:
        pos = _as_tensor(positions)
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
        i, j = np.triu_indices(self.molecule_ids.size, k=1)
        inter = self.molecule_ids[i] != self.molecule_ids[j]
        if not inter.any():
            raise InputError("MinimumDistanceCriterion needs atoms of at least two molecules")
        if self.bonds is not None:  # every pair but the covalent bonds (e.g. water's H-H too)
            self.bonds = np.sort(np.asarray(self.bonds, dtype=np.int64).reshape(-1, 2), axis=1)
            n = self.molecule_ids.size
            inter = ~np.isin(i * n + j, self.bonds[:, 0] * n + self.bonds[:, 1])
        self._pairs = (i[inter], j[inter])
        _check_direction(self.direction)

    @classmethod
    def from_atoms_per_molecule(
        cls, atoms_per_molecule: int, n_atoms: int, threshold: float = WATER_MIN_DISTANCE_THRESHOLD, box=None
    ) -> "MinimumDistanceCriterion":
        if n_atoms % atoms_per_molecule:
            raise InputError(f"{n_atoms} atoms is not a multiple of {atoms_per_molecule} atoms per molecule")
        return cls(np.arange(n_atoms) // atoms_per_molecule, threshold, box)

    def __call__(self, positions: ArrayLike, box: Optional[ArrayLike] = None) -> torch.Tensor:
        pos = _as_tensor(positions)
        lead = pos.shape[:-2]
        frames = pos.reshape(-1, pos.shape[-2], 3)
        b = _box_tensor(box if box is not None else self.box, frames)
        if b is not None and b.ndim > 2:
            b = b.reshape(-1, 3, 3)
        i = torch.as_tensor(self._pairs[0], device=frames.device)
        j = torch.as_tensor(self._pairs[1], device=frames.device)
        d = torch.linalg.vector_norm(minimum_image(frames[:, j] - frames[:, i], b), dim=-1)
        return d.amin(-1).reshape(lead)


@dataclasses.dataclass
class CallableCriterion(_ThresholdMixin):
    """Wrap a user function fn(positions (..., N, 3), box) -> (...) values."""

    fn: Callable[..., Any]
    threshold: float
    direction: Direction = "above"

    def __post_init__(self) -> None:
        _check_direction(self.direction)

    def __call__(self, positions: ArrayLike, box: Optional[ArrayLike] = None) -> torch.Tensor:
        return _as_tensor(self.fn(positions, box))


# --- choosing the criterion for a dataset ---------------------------------------------------
STABILITY_KINDS = ("auto", "bonds", "min_distance", "min_nonbonded_distance")


def molecules_from_bonds(n_atoms: int, bonds: ArrayLike) -> np.ndarray:
    """Molecule index (N,) of every atom: connected components of the bond graph,
    numbered in order of each molecule's first atom."""
    parent = np.arange(n_atoms)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in np.asarray(bonds, dtype=np.int64).reshape(-1, 2):
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(a) for a in range(n_atoms)])
    return np.unique(roots, return_inverse=True)[1].astype(np.int64)


def molecule_ids(dataset: Any) -> np.ndarray:
    """Molecule index (N,) of every atom of a `QMDataset`: from its metadata
    (``molecule_ids``, or ``atoms_per_molecule`` for identical consecutive molecules, as
    the water generator writes), else from the covalent bonds of its first frame
    (minimum image in a periodic box)."""
    meta = getattr(dataset, "metadata", {}) or {}
    n = int(dataset.n_atoms)
    if meta.get("molecule_ids") is not None:
        ids = np.asarray(meta["molecule_ids"], dtype=np.int64).reshape(-1)
        if ids.size != n:
            raise InputError(f"{dataset.source}: metadata molecule_ids has {ids.size} entries for {n} atoms")
        return ids
    if meta.get("atoms_per_molecule"):
        k = int(meta["atoms_per_molecule"])
        if n % k:
            raise InputError(f"{dataset.source}: {n} atoms is not a multiple of atoms_per_molecule {k}")
        return np.arange(n) // k
    return molecules_from_bonds(n, find_bonds(dataset.atomic_numbers, dataset.positions[0], box=dataset.box))


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


def first_instability_time(unstable_flags: ArrayLike, times_ps: ArrayLike, horizon: Optional[float] = None) -> torch.Tensor:
    """Time (ps) of each replica's first unstable frame, (R,) from flags (T, R).

    Replicas that never failed get the horizon (default: the last time), so the result is
    the `stable_time_ps` of every replica; a replica unstable at the first check gets
    times_ps[0]."""
    flags = torch.as_tensor(np.asarray(unstable_flags)) if not isinstance(unstable_flags, torch.Tensor) else unstable_flags
    flags = flags.bool()
    if flags.ndim == 1:
        flags = flags[:, None]
    t = _as_tensor(times_ps).reshape(-1)
    if t.numel() != flags.shape[0]:
        raise InputError(f"{t.numel()} times for {flags.shape[0]} checks")
    t = t.to(flags.device)
    end = float(t[-1]) if horizon is None else float(horizon)
    failed = flags.any(0)
    first = flags.to(torch.int8).argmax(0)  # index of the first True (0 if none)
    return torch.where(failed, t[first], torch.full_like(t[first], end))


def survival_curve(
    stable_times: ArrayLike, horizon: float, n_points: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of replicas still stable at each time: (times, fraction_stable).

    A replica counts as stable at t if it failed after t, or never failed (stable time >=
    horizon). Without n_points the times are 0, every failure time and the horizon (plot
    as a step function, drawstyle="steps-post"); with n_points, a uniform grid on
    [0, horizon]."""
    s = _as_tensor(stable_times).to(torch.float64).reshape(-1)
    if n_points is None:
        fails = torch.unique(s[s < horizon])
        zero = torch.zeros(1, dtype=s.dtype, device=s.device)
        end = torch.full((1,), float(horizon), dtype=s.dtype, device=s.device)
        times = torch.unique(torch.cat([zero, fails, end]))
    else:
        times = torch.linspace(0.0, float(horizon), n_points, dtype=s.dtype, device=s.device)
    alive = (s[None, :] > times[:, None]) | (s[None, :] >= horizon)
    return times, alive.to(s.dtype).mean(1)

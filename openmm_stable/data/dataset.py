"""`QMDataset`: frames of one molecule (or one periodic box) with QM energies and forces.

Units are Angstrom, eV, eV/Angstrom, ps and Angstrom/ps throughout; loaders convert on
the way in (see `openmm_stable.units`). A dataset holds one composition: every frame has
the same atoms in the same order, which is what MD17/MD22 and MD trajectories provide.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Optional

import numpy as np

from openmm_stable.errors import InputError

MAX_ATOMIC_NUMBER = 118


def hill_formula(atomic_numbers) -> str:
    """Chemical formula in Hill order (C, H, then alphabetical): C9H8O4 for aspirin."""
    from collections import Counter

    from ase.data import chemical_symbols

    counts = Counter(chemical_symbols[int(z)] for z in np.asarray(atomic_numbers).reshape(-1))
    order = (["C", "H"] if "C" in counts else []) + sorted(s for s in counts if not ("C" in counts and s in ("C", "H")))
    return "".join(f"{s}{counts[s] if counts[s] > 1 else ''}" for s in order)


def bond_summary(atomic_numbers, bonds) -> str:
    """Bonds counted by element pair, e.g. "C-C 1, C-H 5, C-O 1, H-O 1" (ethanol)."""
    from collections import Counter

    from ase.data import chemical_symbols

    z = np.asarray(atomic_numbers).reshape(-1)
    counts = Counter("-".join(sorted((chemical_symbols[int(z[a])], chemical_symbols[int(z[b])])))
                     for a, b in np.asarray(bonds, dtype=np.int64).reshape(-1, 2))
    return ", ".join(f"{pair} {n}" for pair, n in sorted(counts.items())) or "no bonds"


def molecule_difference(atomic_numbers_a, atomic_numbers_b, bonds_a=None, bonds_b=None) -> Optional[str]:
    """None when a and b are the same molecule, else what differs (for an error message).

    The same molecule: the same Hill formula (atom order may differ: models and h(r) are
    permutation invariant) and, when both bond lists (pairs of atom indices, e.g.
    `geometry.find_bonds` on a frame) are given, the same bond graph up to atom order
    (`geometry.bond_graph_form`). The one check of "same molecule" used by export,
    simulate and refine."""
    formula_a, formula_b = hill_formula(atomic_numbers_a), hill_formula(atomic_numbers_b)
    if formula_a != formula_b:
        return f"{formula_a} vs {formula_b}"
    if bonds_a is None or bonds_b is None:
        return None
    from openmm_stable.geometry import bond_graph_form

    if bond_graph_form(atomic_numbers_a, bonds_a) == bond_graph_form(atomic_numbers_b, bonds_b):
        return None
    summary_a, summary_b = bond_summary(atomic_numbers_a, bonds_a), bond_summary(atomic_numbers_b, bonds_b)
    if summary_a == summary_b:
        return f"both {formula_a} with bonds {summary_a}, but connected differently"
    return f"both {formula_a}, but bonded differently ({summary_a} vs {summary_b})"


class DatasetError(InputError):
    """Bad dataset input; the message names the source and the field."""


@dataclasses.dataclass
class QMDataset:
    atomic_numbers: np.ndarray  # (N,) int
    positions: np.ndarray  # (F, N, 3) Angstrom
    energies: Optional[np.ndarray] = None  # (F,) eV
    forces: Optional[np.ndarray] = None  # (F, N, 3) eV/Angstrom
    box: Optional[np.ndarray] = None  # (3, 3) Angstrom, rows are box vectors; None if not periodic
    times: Optional[np.ndarray] = None  # (F,) ps, for time-ordered data
    velocities: Optional[np.ndarray] = None  # (F, N, 3) Angstrom/ps
    temperature: Optional[float] = None  # K at which the frames were sampled, if known
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # provenance, method, ...
    source: str = "<memory>"  # where the data came from, for error messages

    def __post_init__(self) -> None:
        self.atomic_numbers = np.asarray(self.atomic_numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64)
        if self.positions.ndim == 2:
            self.positions = self.positions[None]
        for name in ("energies", "forces", "times", "velocities", "box"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.float64))
        if self.energies is not None:
            self.energies = self.energies.reshape(-1)
        if self.temperature is not None:
            try:
                self.temperature = float(self.temperature)
            except (TypeError, ValueError):
                self._fail("temperature", f"not a number ({self.temperature!r})")
        self.validate()

    # --- checks -------------------------------------------------------------------------
    def _fail(self, field: str, message: str) -> None:
        raise DatasetError(f"{self.source}: field '{field}': {message}")

    def validate(self) -> None:
        """Raise `DatasetError` naming the source and field for any inconsistent input."""
        z = self.atomic_numbers
        if z.size == 0:
            self._fail("atomic_numbers", "no atoms")
        bad = z[(z < 1) | (z > MAX_ATOMIC_NUMBER)]
        if bad.size:
            self._fail("atomic_numbers", f"unknown atomic number(s) {sorted(set(bad.tolist()))}")
        n_atoms = z.size
        if self.positions.ndim != 3 or self.positions.shape[1:] != (n_atoms, 3):
            self._fail("positions", f"shape {self.positions.shape}, expected (frames, {n_atoms}, 3)")
        n_frames = self.positions.shape[0]
        if n_frames == 0:
            self._fail("positions", "no frames")
        if self.temperature is not None and not (np.isfinite(self.temperature) and self.temperature > 0):
            self._fail("temperature", f"{self.temperature!r} K; expected a positive number of kelvin (or none: unknown)")
        expected = {
            "energies": (n_frames,),
            "forces": (n_frames, n_atoms, 3),
            "times": (n_frames,),
            "velocities": (n_frames, n_atoms, 3),
            "box": (3, 3),
        }
        for name in ("positions", *expected):
            value = getattr(self, name)
            if value is None:
                continue
            if name in expected and value.shape != expected[name]:
                self._fail(name, f"shape {value.shape}, expected {expected[name]}")
            if not np.all(np.isfinite(value)):
                where = np.argwhere(~np.isfinite(value))[0]
                self._fail(name, f"non-finite value (NaN or inf) at index {tuple(where.tolist())}")

    # --- basic properties ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.positions.shape[0]

    @property
    def n_atoms(self) -> int:
        return int(self.atomic_numbers.size)

    @property
    def periodic(self) -> bool:
        return self.box is not None

    @property
    def has_labels(self) -> bool:
        return self.energies is not None and self.forces is not None

    def subset(self, indices) -> "QMDataset":
        """Frames at `indices` (order kept), sharing atoms, box and metadata."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return dataclasses.replace(
            self,
            positions=self.positions[idx],
            energies=pick(self.energies),
            forces=pick(self.forces),
            times=pick(self.times),
            velocities=pick(self.velocities),
            metadata=dict(self.metadata),
        )

    def fingerprint(self) -> str:
        """Short hash of atoms, positions and labels: identifies the data a model saw."""
        h = hashlib.sha256()
        for array in (self.atomic_numbers, self.positions, self.energies, self.forces):
            if array is not None:
                h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:16]

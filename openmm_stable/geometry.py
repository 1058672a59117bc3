"""Geometry of frames: minimum image, distances, bonds and molecules (the ground floor).

Observables, stability criteria, dynamics analysis and the models' box check all measure
the same things; this module is where they are measured, and it imports nothing of the
package but `errors`.

Conventions (shared by every module above it):
  * positions (K, N, 3) Angstrom (or (N, 3), or any leading dims where noted);
  * box (3, 3) Angstrom with box vectors as rows (or (K, 3, 3), one per frame), None for
    a molecule in vacuum;
  * tensors keep their dtype and device; numpy input becomes a float64 tensor.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from openmm_stable.errors import InputError

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]


# --- tensors ------------------------------------------------------------------------------
def as_tensor(x: ArrayLike, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tensor view of x; keeps a tensor's dtype, numpy floats become float64.

    With `like`, the result has like's dtype and device (for boxes and references)."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        t = torch.as_tensor(np.asarray(x))
        if not t.is_floating_point():
            t = t.to(torch.float64)
    if like is not None:
        t = t.to(dtype=like.dtype, device=like.device)
    return t


def as_index(x: ArrayLike, device: torch.device) -> torch.Tensor:
    """Integer (long) tensor of indices on `device`."""
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, device=device).long()


def as_frames(positions: ArrayLike) -> torch.Tensor:
    """Positions as (K, N, 3): a single (N, 3) structure becomes K = 1, leading dims flatten."""
    pos = as_tensor(positions)
    if pos.ndim < 2 or pos.shape[-1] != 3:
        raise InputError(f"positions must have shape (..., N, 3), got {tuple(pos.shape)}")
    if pos.ndim == 2:
        pos = pos[None]
    return pos.reshape(-1, pos.shape[-2], 3)


def box_tensor(box: Optional[ArrayLike], like: torch.Tensor) -> Optional[torch.Tensor]:
    """The box as a tensor of like's dtype and device, (3, 3) or (..., 3, 3); None stays None."""
    if box is None:
        return None
    b = as_tensor(box, like=like)
    if b.shape[-2:] != (3, 3):
        raise InputError(f"box must have shape (3, 3) or (K, 3, 3) (rows = box vectors), got {tuple(b.shape)}")
    return b


def frame_box(box: Optional[ArrayLike], frames: torch.Tensor) -> Optional[torch.Tensor]:
    """`box_tensor` for frames (K, N, 3): a per-frame box flattens to (K, 3, 3)."""
    b = box_tensor(box, frames)
    return b.reshape(-1, 3, 3) if b is not None and b.ndim > 2 else b


def is_orthorhombic(box: torch.Tensor) -> bool:
    off = box - torch.diag_embed(torch.diagonal(box, dim1=-2, dim2=-1))
    return bool((off == 0).all())


# --- distances ----------------------------------------------------------------------------
def minimum_image(dr: torch.Tensor, box: Optional[ArrayLike]) -> torch.Tensor:
    """Minimum-image displacement vectors.

    dr: (K, P, 3) (or (P, 3)) displacements; box: None, (3, 3) or (K, 3, 3) with rows as
    box vectors. Orthorhombic boxes use the exact rounding rule. Triclinic boxes round the
    fractional coordinates and then search the 27 neighbouring images, which is exact for
    reduced boxes (the ones OpenMM accepts) at 27x the memory.
    """
    b = box_tensor(box, dr)
    if b is None:
        return dr
    if b.ndim == 3:  # per-frame box: (K, 1, 3, 3) against (K, P, 3)
        b = b[:, None]
    if is_orthorhombic(b):
        lengths = torch.diagonal(b, dim1=-2, dim2=-1)
        return dr - lengths * torch.round(dr / lengths)
    inv = torch.linalg.inv(b)
    frac = (dr.unsqueeze(-2) @ inv).squeeze(-2)
    dr = ((frac - torch.round(frac)).unsqueeze(-2) @ b).squeeze(-2)
    shifts = torch.tensor(
        [[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=dr.dtype, device=dr.device
    )
    images = shifts @ b  # (..., 27, 3)
    cand = dr.unsqueeze(-2) + images  # (K, P, 27, 3)
    best = (cand * cand).sum(-1).argmin(-1, keepdim=True)  # (K, P, 1)
    return torch.gather(cand, -2, best.unsqueeze(-1).expand(*best.shape, 3)).squeeze(-2)


def pair_indices(n_atoms: int, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of all pairs i < j, in the order `pair_distances` returns them."""
    ij = torch.triu_indices(n_atoms, n_atoms, offset=1, device=device)
    return ij[0], ij[1]


def distances(frames: torch.Tensor, i: torch.Tensor, j: torch.Tensor, box: Optional[torch.Tensor]) -> torch.Tensor:
    """(K, P) distances of the atom pairs (i, j) in frames (K, N, 3), minimum image in a box."""
    dr = minimum_image(frames[:, j] - frames[:, i], box)
    return torch.linalg.vector_norm(dr, dim=-1)


def pair_distances(positions: ArrayLike, box: Optional[ArrayLike] = None) -> torch.Tensor:
    """All i < j interatomic distances, shape (..., P) with P = N (N - 1) / 2.

    Minimum image when a box is given. Pair order is `pair_indices(N)`."""
    pos = as_tensor(positions)
    lead = pos.shape[:-2]
    frames = as_frames(pos)
    i, j = pair_indices(frames.shape[1], device=frames.device)
    return distances(frames, i, j, frame_box(box, frames)).reshape(*lead, -1)


def bond_lengths(positions: ArrayLike, bonds: ArrayLike, box: Optional[ArrayLike] = None) -> torch.Tensor:
    """(K, B) lengths of the bonds (B, 2) in every frame, Angstrom."""
    frames = as_frames(positions)
    b = as_index(bonds, frames.device).reshape(-1, 2)
    return distances(frames, b[:, 0], b[:, 1], box_tensor(box, frames))


def half_box_width(box) -> float:
    """Half the smallest distance between opposite faces of the box (A): the largest
    radius within which minimum-image neighbour counts are complete."""
    b = np.asarray(box, dtype=float)
    volume = abs(np.linalg.det(b))
    areas = [np.linalg.norm(np.cross(b[(k + 1) % 3], b[(k + 2) % 3])) for k in range(3)]
    return 0.5 * volume / max(areas)


# --- bonds and molecules ------------------------------------------------------------------
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


def bond_graph_form(atomic_numbers: ArrayLike, bonds: ArrayLike) -> tuple:
    """A form of the bond graph (atoms coloured by element) that is the same for any atom
    order, so two structures can be compared as molecules, not as atom lists: ethanol and
    dimethyl ether share the formula C2H6O but not this form.

    Colour refinement (1-dimensional Weisfeiler-Lehman, our own few lines, no graph
    library): each round an atom's colour becomes (its colour, the sorted colours of its
    neighbours), until the number of colours stops growing; the form is the round-by-round
    sorted multiset of those colours plus the number of connected components. Isomorphic
    graphs always get equal forms; the rare non-isomorphic graphs it cannot tell apart
    (e.g. some regular graphs) do not occur as different molecules of one formula here."""
    z = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    pairs = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    neighbours: list[list[int]] = [[] for _ in range(z.size)]
    for a, b in pairs:
        neighbours[int(a)].append(int(b))
        neighbours[int(b)].append(int(a))
    colours = [int(x) for x in z]
    rounds = []
    for _ in range(max(1, z.size)):
        signatures = [(colours[a], tuple(sorted(colours[b] for b in neighbours[a]))) for a in range(z.size)]
        palette = {sig: k for k, sig in enumerate(sorted(set(signatures)))}
        rounds.append(tuple(sorted(signatures)))
        refined = [palette[sig] for sig in signatures]
        grew = len(palette) > len(set(colours))
        colours = refined
        if not grew and len(rounds) > 1:
            break
    n_components = int(molecules_from_bonds(z.size, pairs).max()) + 1 if z.size else 0
    return n_components, tuple(rounds)


def molecule_ids(dataset: Any) -> np.ndarray:
    """Molecule index (N,) of every atom of a `QMDataset`: from its metadata
    (``molecule_ids``, or ``atoms_per_molecule`` for identical consecutive molecules, as
    the water generator writes), else from the covalent bonds of its first frame
    (minimum image in a periodic box)."""
    meta = getattr(dataset, "metadata", {}) or {}
    n = int(dataset.n_atoms)
    if meta.get("molecule_ids") is not None:
        try:
            ids = np.asarray(meta["molecule_ids"], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise InputError(f"{dataset.source}: metadata molecule_ids must be a list of integers, one per atom "
                             f"(got {str(meta['molecule_ids'])[:60]!r})") from None
        if ids.size != n:
            raise InputError(f"{dataset.source}: metadata molecule_ids has {ids.size} entries for {n} atoms")
        return ids
    if meta.get("atoms_per_molecule"):
        k = meta["atoms_per_molecule"]
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"{dataset.source}: metadata atoms_per_molecule must be a positive integer, got {k!r}")
        k = int(k)
        if n % k:
            raise InputError(f"{dataset.source}: {n} atoms is not a multiple of atoms_per_molecule {k}")
        return np.arange(n) // k
    return molecules_from_bonds(n, find_bonds(dataset.atomic_numbers, dataset.positions[0], box=dataset.box))


# --- minimum intermolecular distance ------------------------------------------------------
def intermolecular_pairs(molecule_ids: ArrayLike, bonds: Optional[ArrayLike] = None) -> tuple[np.ndarray, np.ndarray]:
    """Atom pairs (i, j), i < j, of different molecules; with `bonds` (B, 2), every pair
    but the covalent bonds instead (so non-bonded pairs inside a molecule count too).

    Raises InputError when the atoms are not of at least two molecules (with the message
    `MinimumDistanceCriterion` has always given, as it and the observable call this)."""
    ids = np.asarray(molecule_ids, dtype=np.int64).reshape(-1)
    i, j = np.triu_indices(ids.size, k=1)
    keep = ids[i] != ids[j]
    if not keep.any():
        raise InputError("MinimumDistanceCriterion needs atoms of at least two molecules")
    if bonds is not None:  # every pair but the covalent bonds (e.g. water's H-H too)
        bonds = np.sort(np.asarray(bonds, dtype=np.int64).reshape(-1, 2), axis=1)
        n = ids.size
        keep = ~np.isin(i * n + j, bonds[:, 0] * n + bonds[:, 1])
    return i[keep], j[keep]


def minimum_pair_distance(positions: ArrayLike, pairs: tuple[ArrayLike, ArrayLike],
                          box: Optional[ArrayLike] = None) -> torch.Tensor:
    """Smallest distance over the atom pairs (i, j) (see `intermolecular_pairs`) in every
    frame of positions (..., N, 3), minimum image in a box; shape (...)."""
    pos = as_tensor(positions)
    lead = pos.shape[:-2]
    frames = pos.reshape(-1, pos.shape[-2], 3)
    i, j = as_index(pairs[0], frames.device), as_index(pairs[1], frames.device)
    return distances(frames, i, j, frame_box(box, frames)).amin(-1).reshape(lead)

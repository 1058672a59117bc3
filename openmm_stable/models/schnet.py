"""A SchNet-type invariant network in plain PyTorch ops.

Plain ops mean the exported TorchScript file needs no extension library: it runs from
OpenMM's C++ API and from any openmm-torch build, and it is fast for molecule-sized
replicas because neighbours are all atom pairs of the same structure within the cutoff.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


def shifted_softplus(x: Tensor) -> Tensor:
    return nn.functional.softplus(x) - math.log(2.0)


class ShiftedSoftplus(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return shifted_softplus(x)


def structure_pairs(batch: Tensor) -> tuple[Tensor, Tensor]:
    """All ordered pairs (i, j), i != j, of atoms in the same structure.

    Structures of equal size (replicas, one-composition datasets) use a tiled template,
    which is O(pairs); otherwise an O(N^2) mask. ``batch`` must be sorted.
    """
    n_total = batch.numel()
    counts = torch.bincount(batch)
    n = int(counts[0].item())
    if bool((counts == n).all()):
        local = torch.arange(n, device=batch.device)
        i_loc, j_loc = torch.meshgrid(local, local, indexing="ij")
        keep = i_loc != j_loc
        i_loc, j_loc = i_loc[keep], j_loc[keep]
        offsets = (torch.arange(counts.numel(), device=batch.device) * n).unsqueeze(1)
        return (offsets + i_loc).reshape(-1), (offsets + j_loc).reshape(-1)
    same = batch.unsqueeze(0) == batch.unsqueeze(1)
    same = same & ~torch.eye(n_total, dtype=torch.bool, device=batch.device)
    idx = same.nonzero()
    return idx[:, 0], idx[:, 1]


def pair_vectors(pos: Tensor, i: Tensor, j: Tensor, box: Optional[Tensor]) -> Tensor:
    """r_j - r_i, wrapped to the minimum image when a (3, 3) box is given."""
    vec = pos[j] - pos[i]
    if box is not None:
        box = box.to(pos.dtype)
        frac = torch.linalg.solve(box.transpose(0, 1), vec.transpose(0, 1)).transpose(0, 1)
        vec = vec - torch.round(frac) @ box
    return vec


class GaussianRBF(nn.Module):
    def __init__(self, cutoff: float, n_rbf: int):
        super().__init__()
        self.register_buffer("centers", torch.linspace(0.0, cutoff, n_rbf))
        self.gamma = 0.5 / (cutoff / (n_rbf - 1)) ** 2

    def forward(self, r: Tensor) -> Tensor:
        return torch.exp(-self.gamma * (r.unsqueeze(-1) - self.centers.to(r.dtype)) ** 2)


class Interaction(nn.Module):
    """Continuous-filter convolution followed by an atom-wise update (residual)."""

    def __init__(self, features: int, n_rbf: int):
        super().__init__()
        self.filter = nn.Sequential(nn.Linear(n_rbf, features), ShiftedSoftplus(), nn.Linear(features, features))
        self.in_proj = nn.Linear(features, features, bias=False)
        self.out = nn.Sequential(nn.Linear(features, features), ShiftedSoftplus(), nn.Linear(features, features))

    def forward(self, h: Tensor, rbf: Tensor, envelope: Tensor, i: Tensor, j: Tensor) -> Tensor:
        w = self.filter(rbf) * envelope.unsqueeze(-1)
        messages = self.in_proj(h)[j] * w
        aggregated = torch.zeros_like(h).index_add(0, i, messages)
        return h + self.out(aggregated)


class SchNet(nn.Module):
    """Invariant message passing on interatomic distances (Schuett et al., 2018)."""

    def __init__(self, features: int = 64, layers: int = 3, n_rbf: int = 32, cutoff: float = 5.0, max_z: int = 119):
        super().__init__()
        self.cutoff = float(cutoff)
        self.embedding = nn.Embedding(max_z, features)
        self.rbf = GaussianRBF(cutoff, n_rbf)
        self.interactions = nn.ModuleList([Interaction(features, n_rbf) for _ in range(layers)])
        self.readout = nn.Sequential(nn.Linear(features, features // 2), ShiftedSoftplus(), nn.Linear(features // 2, 1))

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        atom_energy = self.atom_energies(z, pos, batch, box)
        n_structures = int(batch[-1].item()) + 1
        return torch.zeros(n_structures, dtype=pos.dtype, device=pos.device).index_add(0, batch, atom_energy)

    def atom_energies(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Per-atom energies (N,): the readout of each atom's features; their sum per
        structure is `forward`. StABlE's local-neighbourhood samples need them."""
        i, j = structure_pairs(batch)
        r = torch.linalg.norm(pair_vectors(pos, i, j, box), dim=-1)
        inside = r < self.cutoff
        i, j, r = i[inside], j[inside], r[inside]
        envelope = 0.5 * (torch.cos(r * (math.pi / self.cutoff)) + 1.0)
        rbf = self.rbf(r)
        h = self.embedding(z).to(pos.dtype)
        for interaction in self.interactions:
            h = interaction(h, rbf, envelope, i, j)
        return self.readout(h).squeeze(-1)


def _build(features: int, layers: int, n_rbf: int, cutoff: float) -> SchNet:
    return SchNet(features=features, layers=layers, n_rbf=n_rbf, cutoff=cutoff)


def _family():
    from openmm_stable.models.registry import ArchitectureFamily

    return ArchitectureFamily(
        name="schnet",
        presets={
            "tiny": {"features": 16, "layers": 1, "n_rbf": 16, "cutoff": 5.0},
            "small": {"features": 64, "layers": 3, "n_rbf": 32, "cutoff": 5.0},
            "medium": {"features": 128, "layers": 4, "n_rbf": 50, "cutoff": 5.0},
            "large": {"features": 256, "layers": 6, "n_rbf": 64, "cutoff": 6.0},
        },
        build=_build,
        extension_imports=(),  # plain PyTorch ops: the exported file needs no extension library
        description="invariant SchNet in plain PyTorch (portable, fast on CPU, per-atom energies)",
    )


# The registry's entry for this family (entry point `schnet` of group openmm_stable.architectures).
FAMILY = _family()

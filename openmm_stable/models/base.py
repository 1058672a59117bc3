"""The model protocol and the wrapper every architecture lives in.

Protocol: a `torch.nn.Module` whose ``forward(z, pos, batch, box)`` returns the energies
(eV) of a batch of structures, shape ``(n_structures,)``, from atomic numbers ``z`` (N,),
positions ``pos`` (N, 3) in Angstrom, a structure index ``batch`` (N,) sorted ascending, and
an optional periodic box ``box`` (3, 3) in Angstrom (rows are box vectors). Forces come from
autograd. Anything meeting it can be trained, exported and refined; `NNIP` adds the fitted
per-element energy offsets and the energy scale around such a network.

Optional: a network with ``atom_energies(z, pos, batch, box)`` returning per-atom energies
(N,) that sum to ``forward`` per structure (our ``schnet``) also gives `NNIP.atom_energies`,
which StABlE's local-neighbourhood samples need (`supports_atom_energies`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from openmm_stable.errors import InputError
from openmm_stable.geometry import half_box_width

MAX_Z = 119


class NNIP(nn.Module):
    """Energy (float64, eV) = scale * net(z, pos, batch, box) + sum of per-element offsets.

    The offsets (fitted on the training split) carry the large atomisation part of QM
    energies so that the network only learns the small, geometry-dependent remainder.
    ``spec`` records how to rebuild the network (architecture name and hyper-parameters);
    it is plain Python data, kept outside TorchScript.
    """

    def __init__(self, net: nn.Module, spec: Optional[dict] = None):
        super().__init__()
        self.net = net
        self.register_buffer("atom_energies", torch.zeros(MAX_Z, dtype=torch.float64))
        self.register_buffer("energy_scale", torch.ones((), dtype=torch.float64))
        self.spec: dict = dict(spec or {})

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        n_structures = int(batch[-1].item()) + 1 if batch.numel() > 0 else 0
        # float64 output: QM energies are ~1e4 eV, where float32 resolves only ~1 meV.
        energy = self.net(z, pos, batch, box).reshape(-1).to(torch.float64) * self.energy_scale.to(torch.float64)
        offsets = self.atom_energies.to(torch.float64)[z]
        return energy + torch.zeros(n_structures, dtype=torch.float64, device=energy.device).index_add(0, batch, offsets)

    def atom_energies_of(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Per-atom energies (N,), float64 eV, summing per structure to `forward`: the
        network's per-atom output times the energy scale, plus each atom's element offset.
        Raises NotImplementedError for networks without per-atom energies."""
        if not supports_atom_energies(self):
            raise NotImplementedError(
                f"architecture {self.spec.get('architecture', type(self.net).__name__)!r} does not expose per-atom "
                "energies (needed for local-neighbourhood samples); use the 'schnet' architecture")
        energy = self.net.atom_energies(z, pos, batch, box).reshape(-1).to(torch.float64)
        return energy * self.energy_scale.to(torch.float64) + self.atom_energies.to(torch.float64)[z]


def supports_atom_energies(model: nn.Module) -> bool:
    """Whether `model` (an `NNIP`) can give per-atom energies (`NNIP.atom_energies_of`)."""
    return isinstance(model, NNIP) and callable(getattr(model.net, "atom_energies", None))


def energy_and_forces(
    model: nn.Module,
    z: Tensor,
    pos: Tensor,
    batch: Tensor,
    box: Optional[Tensor] = None,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """Energies (n_structures,) in eV and forces (N, 3) in eV/Angstrom by autograd.

    ``create_graph=True`` keeps the graph so a force loss can be back-propagated into the
    parameters (training); evaluation leaves it off.
    """
    pos = pos.detach().requires_grad_(True)
    energies = model(z, pos, batch, box)
    (grad,) = torch.autograd.grad(energies.sum(), pos, create_graph=create_graph)
    return energies, -grad


def batch_index(n_structures: int, n_atoms: int, device=None) -> Tensor:
    """Structure index for ``n_structures`` copies of an ``n_atoms`` molecule."""
    return torch.arange(n_structures, device=device).repeat_interleave(n_atoms)


def model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters())).device


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(iter(model.parameters())).dtype


def model_cutoff(model: nn.Module) -> Optional[float]:
    """The model's interaction cutoff (A), from its spec or its network, if it has one."""
    cutoff = (getattr(model, "spec", None) or {}).get("hparams", {}).get("cutoff")
    if cutoff is None:
        cutoff = getattr(getattr(model, "net", model), "cutoff", None)
    return None if cutoff is None else float(cutoff)


def check_cutoff_fits_box(model: nn.Module, box) -> None:
    """Raise ValueError unless the cutoff is below half the box width: beyond it the
    minimum image misses neighbours (and the energy jumps as atoms cross the boundary)."""
    if box is None:
        return
    cutoff, half = model_cutoff(model), half_box_width(box)
    if cutoff is not None and cutoff >= half:
        raise InputError(f"model cutoff {cutoff:g} A is not below half the periodic box width ({half:.3f} A); "
                         f"use a smaller cutoff (pretrain --cutoff) or a bigger box")

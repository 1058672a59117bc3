"""An ASE calculator for every model this project writes, so that ASE users can run,
optimise or check a pre-trained or refined model with the tools they already use.

>>> from ase.optimize import BFGS
>>> from openmm_stable.ase import Calculator
>>> atoms.calc = Calculator("refined.pt")              # a file from pretrain, refine or import
>>> BFGS(atoms).run(fmax=0.05)

Units are ASE's: eV, eV/Angstrom and eV/Angstrom^3. Energies and forces come from the same
`energy_and_forces` as training and the replica engine use; stress (periodic cells only)
is the derivative of the energy with respect to a strain of the positions and the cell,
by autograd where the network's box gradient is exact (checked once against a finite
difference: torchmd-net's neighbour ops do not differentiate through the box), otherwise
by central differences of the energy (12 energies per call).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from ase.calculators.calculator import Calculator as _AseCalculator
from ase.calculators.calculator import all_changes
from torch import nn

from openmm_stable.errors import InputError
from openmm_stable.models.base import NNIP, check_cutoff_fits_box, energy_and_forces

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


def _formula(numbers: Sequence[int]) -> str:
    from openmm_stable.data.dataset import hill_formula

    return hill_formula(np.asarray(numbers, dtype=np.int64))


class _StandardCell(nn.Module):
    """Runs `model` with the cell rotated to the lower-triangular form (a = (ax, 0, 0),
    b = (bx, by, 0)) that OpenMM and torchmd-net's neighbour lists assume; positions rotate
    with it. The rotation is a constant of each call, so autograd gives forces and strain
    derivatives in the caller's frame (the energy does not change under a rotation)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z, pos, batch, box=None):
        if box is None or float(torch.triu(box.detach(), 1).abs().max()) <= 1e-12:
            return self.model(z, pos, batch, box)
        from ase.cell import Cell

        _, q = Cell(box.detach().to(torch.float64).cpu().numpy()).standard_form()  # rcell @ q = cell
        rotation = torch.as_tensor(q.T, dtype=pos.dtype, device=pos.device)
        return self.model(z, pos @ rotation, batch, box @ rotation)


class Calculator(_AseCalculator):
    """ASE calculator around an openmm-stable model file (or an in-memory model).

    model: a file written by `save_model` (pretrain, refine, `openmm-stable import`) or a
        module meeting the model protocol (`openmm_stable.models.base`), of which the
        calculator keeps a copy (later changes to the module are not seen).
    device, dtype: where and in which precision the network runs (default float64: ASE's
        optimisers and finite-difference checks want it; per-element offsets stay float64).
    atomic_numbers: the molecule the model is for, when `model` is a module (a file's
        record says it); None skips the check.
    check_molecule: refuse Atoms whose atomic numbers (in order) differ from the model's
        molecule, the structure it was trained on; False uses it outside that molecule.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: Union[str, Path, nn.Module], device="cpu", dtype=torch.float64,
                 atomic_numbers: Optional[Sequence[int]] = None, check_molecule: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.record = None
        if isinstance(model, (str, Path)):
            from openmm_stable.models import model_from_record, read_model_record

            self.record = read_model_record(model)  # weights only: no pickle
            model = model_from_record(self.record)
            if atomic_numbers is None:
                atomic_numbers = self.record.atomic_numbers
        elif isinstance(model, nn.Module):
            model = copy.deepcopy(model)  # its own dtype and device, leaving the caller's model as it is
        else:
            raise InputError(f"model must be a model file or a torch module, not {type(model).__name__}")
        self.device = torch.device(device)
        self.dtype = _as_dtype(dtype)
        model = model.to(self.device)
        (model.net if isinstance(model, NNIP) else model).to(self.dtype)  # NNIP's offsets stay float64
        self.model = model.eval()
        self._evaluate = _StandardCell(self.model)
        self.expected_numbers = (None if atomic_numbers is None
                                 else np.asarray(atomic_numbers, dtype=np.int64).reshape(-1))
        self.check_molecule = bool(check_molecule)
        self._box_gradient_exact: Optional[bool] = None
        self._float64_copy: Optional[nn.Module] = None

    # --- input ---------------------------------------------------------------------------
    def _check_numbers(self, numbers: np.ndarray) -> None:
        expected = self.expected_numbers
        if not self.check_molecule or expected is None:
            return
        if numbers.shape == expected.shape and (numbers == expected).all():
            return
        if numbers.shape != expected.shape:
            detail = f"{numbers.size} atoms ({_formula(numbers)}) against {expected.size} ({_formula(expected)})"
        else:
            first = int(np.flatnonzero(numbers != expected)[0])
            detail = (f"atom {first} is Z={int(numbers[first])}, the model's Z={int(expected[first])}"
                      + ("" if _formula(numbers) != _formula(expected) else " (same formula, other atom order)"))
        raise InputError(f"these Atoms are not the molecule the model was trained on: {detail}; reorder the atoms, "
                         "or pass check_molecule=False to use the model outside its training molecule")

    def _box(self, atoms) -> Optional[np.ndarray]:
        """The cell (rows = box vectors, Angstrom) of a fully periodic system, None in vacuum."""
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if not pbc.any():
            return None
        if not pbc.all():
            raise InputError(f"pbc={pbc.tolist()}: only fully periodic cells or none are supported")
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        if abs(np.linalg.det(cell)) < 1e-12:
            raise InputError("pbc is set but the cell has no volume; set atoms.cell or pbc=False")
        check_cutoff_fits_box(self.model, cell)
        return cell

    def _tensors(self, atoms):
        numbers = np.asarray(atoms.numbers, dtype=np.int64)
        self._check_numbers(numbers)
        box = self._box(atoms)
        z = torch.as_tensor(numbers, device=self.device)
        pos = torch.as_tensor(np.asarray(atoms.positions, dtype=np.float64), device=self.device).to(self.dtype)
        batch = torch.zeros(len(numbers), dtype=torch.long, device=self.device)
        box_t = None if box is None else torch.as_tensor(box, device=self.device).to(self.dtype)
        return z, pos, batch, box_t

    # --- properties ----------------------------------------------------------------------
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        z, pos, batch, box = self._tensors(self.atoms)
        energies, forces = energy_and_forces(self._evaluate, z, pos, batch, box)
        energy = float(energies.detach().sum())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = forces.detach().to(torch.float64).cpu().numpy()
        if "stress" in properties:
            if box is None:
                from ase.calculators.calculator import PropertyNotImplementedError

                raise PropertyNotImplementedError("stress needs a periodic cell (pbc=True)")
            self.results["stress"] = self._stress(z, pos, batch, box)

    def _strain_derivative(self, model, z, pos, batch, box) -> torch.Tensor:
        """dE/d(strain) at zero strain: positions and cell both deformed by (1 + strain)."""
        strain = torch.zeros(3, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
        deform = torch.eye(3, dtype=pos.dtype, device=pos.device) + strain
        energy = model(z, pos @ deform, batch, box @ deform).sum()
        (grad,) = torch.autograd.grad(energy, strain)
        return grad

    def _stress(self, z, pos, batch, box) -> np.ndarray:
        if self._box_gradient_exact is None:
            self._box_gradient_exact = self._check_box_gradient(z, pos, batch, box)
            if not self._box_gradient_exact:
                warnings.warn("this model's energy has no exact gradient with respect to the cell (its neighbour "
                              "list does not differentiate through the box, as in torchmd-net); stress is computed "
                              "by central differences (12 energies per call)", stacklevel=3)
        volume = abs(float(torch.linalg.det(box.to(torch.float64))))
        if self._box_gradient_exact:
            grad = self._strain_derivative(self._evaluate, z, pos, batch, box).detach().to(torch.float64).cpu()
        else:
            grad = self._numeric_strain_derivative(z, pos, batch, box)
        sigma = 0.5 * (grad + grad.T).numpy() / volume
        return sigma[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # Voigt order xx yy zz yz xz xy

    def _model64(self) -> nn.Module:
        """A float64 copy of the model, for finite differences that float32 cannot resolve."""
        if self._float64_copy is None:
            model = copy.deepcopy(self.model)
            (model.net if isinstance(model, NNIP) else model).to(torch.float64)
            self._float64_copy = _StandardCell(model)
        return self._float64_copy

    def _strained_energy(self, model, z, pos, batch, box, strain: torch.Tensor) -> float:
        deform = torch.eye(3, dtype=torch.float64, device=pos.device) + strain
        with torch.no_grad():
            return float(model(z, pos.to(torch.float64) @ deform, batch, box.to(torch.float64) @ deform).sum())

    def _numeric_strain_derivative(self, z, pos, batch, box, h: float = 1e-5) -> torch.Tensor:
        """dE/d(strain) (symmetric) by central differences over the 6 symmetric strains."""
        model, grad = self._model64(), torch.zeros(3, 3, dtype=torch.float64)
        for a, b in ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)):
            step = torch.zeros(3, 3, dtype=torch.float64, device=pos.device)
            step[a, b] = step[b, a] = h
            diff = (self._strained_energy(model, z, pos, batch, box, step)
                    - self._strained_energy(model, z, pos, batch, box, -step)) / (2 * h)
            grad[a, b] = grad[b, a] = diff if a == b else 0.5 * diff  # an off-diagonal step moves both entries
        return grad

    def _check_box_gradient(self, z, pos, batch, box, h: float = 1e-5) -> bool:
        """Whether autograd's strain derivative matches a central difference along one
        random symmetric strain (float64 copy of the model, this structure)."""
        model = self._model64()
        pos64, box64 = pos.to(torch.float64), box.to(torch.float64)
        generator = torch.Generator().manual_seed(0)
        direction = torch.randn(3, 3, generator=generator, dtype=torch.float64)
        direction = (0.5 * (direction + direction.T)).to(pos64.device)
        analytic = float((self._strain_derivative(model, z, pos64, batch, box64) * direction).sum())
        numeric = (self._strained_energy(model, z, pos, batch, box, h * direction)
                   - self._strained_energy(model, z, pos, batch, box, -h * direction)) / (2 * h)
        return abs(analytic - numeric) <= 1e-5 * max(1.0, abs(numeric))


__all__ = ["Calculator"]

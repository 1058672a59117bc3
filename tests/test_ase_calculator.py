"""`openmm_stable.ase.Calculator`: ASE's view of our models, checked against our own
forces (`energy_and_forces`), finite differences of its energy and ASE's numerical stress."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.optimize import BFGS

from openmm_stable.ase import Calculator
from openmm_stable.errors import InputError
from openmm_stable.models import create_model, energy_and_forces, load_model, save_model

ARCHITECTURES = ["schnet", "graph-network"]  # our plain-PyTorch network and a torchmd-net family one


def make_model(architecture: str, cutoff: float = 4.0, seed: int = 0):
    """A tiny model with non-zero element offsets and energy scale (so both are exercised)."""
    torch.manual_seed(seed)
    model = create_model(architecture, "tiny", cutoff=cutoff)
    with torch.no_grad():
        model.atom_energies[[1, 6, 8]] = torch.tensor([-13.6, -1029.5, -2041.8], dtype=torch.float64)
        model.energy_scale.fill_(1.7)
    return model


def water_box(n_side: int = 2, spacing: float = 3.5, seed: int = 5) -> Atoms:
    """n_side^3 jittered water molecules on a cubic grid, periodic."""
    rng = np.random.default_rng(seed)
    positions = []
    for i in range(n_side):
        for j in range(n_side):
            for k in range(n_side):
                o = spacing * np.array([i, j, k]) + 0.2 * rng.standard_normal(3)
                positions += [o, o + [0.96, 0.0, 0.0], o + [-0.24, 0.93, 0.0]]
    length = spacing * n_side
    return Atoms("OH2" * n_side**3, positions=np.array(positions), cell=np.eye(3) * length, pbc=True)


@pytest.fixture
def ethanol_atoms(ethanol):
    z, positions = ethanol
    return Atoms(numbers=z, positions=positions)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_file_calculator_gives_our_forces_and_finite_differences(architecture, ethanol_atoms, tmp_path):
    model = make_model(architecture)
    path = tmp_path / "model.pt"
    save_model(model, path, atomic_numbers=ethanol_atoms.numbers)
    atoms = ethanol_atoms.copy()
    atoms.rattle(0.05, seed=1)
    atoms.calc = Calculator(path)  # float64 by default

    reference = load_model(path)
    reference.net.double()
    z = torch.as_tensor(atoms.numbers)
    batch = torch.zeros(len(atoms), dtype=torch.long)
    energy, forces = energy_and_forces(reference, z, torch.as_tensor(atoms.positions), batch)
    assert atoms.get_potential_energy() == pytest.approx(float(energy.detach()), rel=1e-12)
    assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()
    np.testing.assert_allclose(atoms.get_forces(), forces.numpy(), rtol=1e-10, atol=1e-12)
    assert np.abs(atoms.get_forces()).max() > 1e-3

    numeric = calculate_numerical_forces(atoms, eps=1e-5)  # ASE's central differences of our energy
    np.testing.assert_allclose(atoms.get_forces(), numeric, rtol=1e-5, atol=1e-7)


def test_in_memory_model_float32_and_bfgs(ethanol_atoms):
    model = make_model("schnet")
    atoms = ethanol_atoms.copy()
    atoms.rattle(0.15, seed=2)
    atoms.calc = Calculator(model, dtype="float32", atomic_numbers=ethanol_atoms.numbers)
    assert atoms.calc.model.atom_energies.dtype == torch.float64  # the offsets keep their precision
    assert next(model.net.parameters()).dtype == torch.float32  # the caller's model is left as it was
    e32 = atoms.get_potential_energy()
    atoms.calc = Calculator(model, dtype="float64")
    assert e32 == pytest.approx(atoms.get_potential_energy(), abs=1e-3)  # -3e3 eV of offsets, float32 network

    start = atoms.get_potential_energy()
    BFGS(atoms, logfile=None).run(fmax=1e-4, steps=8)
    assert atoms.get_potential_energy() < start - 1e-4


def test_other_molecule_refused(ethanol_atoms, tmp_path):
    path = tmp_path / "model.pt"
    save_model(make_model("schnet"), path, atomic_numbers=ethanol_atoms.numbers)
    calc = Calculator(path)
    swapped = ethanol_atoms.copy()
    swapped.numbers[[0, 2]] = swapped.numbers[[2, 0]]  # C and O exchanged: same formula, another molecule
    swapped.calc = calc
    with pytest.raises(InputError, match="atom 0 is Z=8.*other atom order"):
        swapped.get_potential_energy()
    smaller = ethanol_atoms[:-1]
    smaller.calc = calc
    with pytest.raises(InputError, match="8 atoms .* against 9"):
        smaller.get_forces()
    smaller.calc = Calculator(path, check_molecule=False)  # the explicit way out
    assert np.isfinite(smaller.get_potential_energy())
    with pytest.raises(InputError, match="dtype"):
        Calculator(path, dtype="float16")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_periodic_box_forces_and_stress(architecture):
    model = make_model(architecture, cutoff=3.0, seed=3)
    atoms = water_box()
    atoms.calc = Calculator(model)

    reference = make_model(architecture, cutoff=3.0, seed=3)
    reference.net.double()
    energy, forces = energy_and_forces(reference, torch.as_tensor(atoms.numbers), torch.as_tensor(atoms.positions),
                                       torch.zeros(len(atoms), dtype=torch.long), torch.as_tensor(atoms.cell.array))
    assert atoms.get_potential_energy() == pytest.approx(float(energy.detach()), rel=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), forces.numpy(), rtol=1e-10, atol=1e-12)

    # The box matters: the same positions in vacuum give other forces.
    vacuum = atoms.copy()
    vacuum.pbc = False
    vacuum.calc = Calculator(model)
    assert np.abs(vacuum.get_forces() - atoms.get_forces()).max() > 1e-4

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stress = atoms.get_stress()
    numeric = calculate_numerical_stress(atoms, eps=1e-4)  # ASE's own strain differences
    assert np.abs(numeric).max() > 1e-6
    np.testing.assert_allclose(stress, numeric, rtol=1e-5, atol=1e-10)
    # our SchNet differentiates through the box; torchmd-net's neighbour ops do not (fallback)
    assert atoms.calc._box_gradient_exact == (architecture == "schnet")
    assert any("finite differences" in str(w.message) or "central differences" in str(w.message)
               for w in caught) == (architecture != "schnet")

    # A rotated cell (not lower triangular) is the same system: same energy, rotated forces.
    rotated = atoms.copy()
    rotated.rotate(30, "z", rotate_cell=True)
    rotated.rotate(20, "x", rotate_cell=True)
    rotated.calc = Calculator(model)
    assert rotated.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), rel=1e-9)
    rotation = np.linalg.solve(atoms.cell.array, rotated.cell.array)  # cell @ rotation = rotated cell
    np.testing.assert_allclose(rotated.get_forces(), atoms.get_forces() @ rotation, atol=1e-9)


def test_bad_periodic_input_refused():
    model = make_model("schnet", cutoff=3.0)
    atoms = water_box()
    atoms.calc = Calculator(model)
    atoms.pbc = [True, True, False]
    with pytest.raises(InputError, match="fully periodic"):
        atoms.get_potential_energy()
    atoms.pbc = True
    atoms.calc = Calculator(make_model("schnet", cutoff=4.0))  # 4 A is not below half of the 7 A box
    with pytest.raises(InputError, match="half the periodic box"):
        atoms.get_forces()
    molecule = atoms.copy()
    molecule.pbc = False
    molecule.calc = Calculator(model)
    with pytest.raises(Exception, match="periodic cell"):
        molecule.get_stress()


def test_mace_model_file(tmp_path):
    """A MACE model file (the `mace` extra) through the same calculator: our forces, and a
    stress by autograd (its neighbour list differentiates through the box) equal to ASE's."""
    pytest.importorskip("mace")
    torch.manual_seed(4)
    atoms = water_box()
    path = tmp_path / "mace.pt"
    save_model(create_model("mace", "tiny", atomic_numbers=[1, 8], cutoff=3.0), path, atomic_numbers=atoms.numbers)
    atoms.calc = Calculator(path)
    reference = load_model(path)
    reference.net.double()
    energy, forces = energy_and_forces(reference, torch.as_tensor(atoms.numbers), torch.as_tensor(atoms.positions),
                                       torch.zeros(len(atoms), dtype=torch.long), torch.as_tensor(atoms.cell.array))
    assert atoms.get_potential_energy() == pytest.approx(float(energy.detach()), rel=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), forces.numpy(), rtol=1e-10, atol=1e-12)
    stress = atoms.get_stress()
    assert atoms.calc._box_gradient_exact
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, eps=1e-4), rtol=1e-5, atol=1e-8)
    assert np.abs(stress).max() > 1e-4

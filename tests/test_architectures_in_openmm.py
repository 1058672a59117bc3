"""Every architecture we ship runs inside an OpenMM Context as the engine runs it.

test_models.py checks the four families in PyTorch alone and test_export.py checks the
OpenMM side for schnet and graph-network; here each of the four (the torchmd-net
equivariant transformer and TensorNet included) is scripted in replica form (2 replicas),
put in a TorchForce on the Reference and CPU platforms (CPU: what the engine runs on
without a GPU), and OpenMM's energy and forces (kJ/mol, nm) are compared with the PyTorch
model's (eV, Angstrom), replica by replica. Two forms: the guarded module the replica
engine builds (energy and forces out of the module, ``setOutputsForces``) and an exported
file loaded by TorchForce (forces by OpenMM's autograd), which for torchmd-net models
needs its warp ops registered.

Tolerance: float32 model against float32 PyTorch, 1e-4 relative (the energy to the sum of
the replicas' |energies|, every force component to the largest one: a small component has
no useful relative error of its own); the measured errors are 1e-7 to 1e-6. A real fault
(a unit factor, swapped replicas, a missing dtype cast) is of the order of the values.
"""
from __future__ import annotations

import torch  # noqa: I001  (torch before openmm/openmmtorch: it preloads the CUDA libraries they link)
import numpy as np
import openmm
import pytest
from openmm import unit

import torchmdnet.models.model  # noqa: F401  (registers the warp ops torchmd-net's scripted models call)
from openmm_stable.export import export_model, make_torch_force, script_force_module
from openmm_stable.models import batch_index, create_model, energy_and_forces
from openmm_stable.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM

ARCHITECTURES = ["schnet", "graph-network", "equivariant-transformer", "tensornet"]
N_REPLICAS = 2
TOLERANCE = 1e-4
EV_A_IN_KJ_MOL_NM = EV_IN_KJ_PER_MOL * NM_IN_ANGSTROM


def _replica_frames(positions: np.ndarray) -> np.ndarray:
    """Two different geometries of the molecule (R, N, 3), Angstrom: off the symmetric
    structure, and far enough apart that swapped replicas would show."""
    rng = np.random.default_rng(7)
    frames = positions[None] + 0.08 * rng.standard_normal((N_REPLICAS,) + positions.shape)
    assert np.abs(frames[0] - frames[1]).max() > 0.1
    return frames


def _openmm_energy_forces(force, n_particles: int, frames: np.ndarray, platform: str) -> tuple[float, np.ndarray]:
    """Energy (kJ/mol) and forces (R, N, 3) kJ/mol/nm of a one-force System on `platform`
    (both platforms hand TorchForce the positions in float64)."""
    system = openmm.System()
    for _ in range(n_particles):
        system.addParticle(1.0)  # masses play no part in energy or forces
    system.addForce(force)
    properties = {"Threads": "1"} if platform == "CPU" else {}
    context = openmm.Context(system, openmm.VerletIntegrator(1e-4), openmm.Platform.getPlatformByName(platform),
                             properties)
    context.setPositions(frames.reshape(-1, 3) / NM_IN_ANGSTROM)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return energy, np.asarray(forces).reshape(frames.shape)


def _pytorch_energies_forces(model, z: np.ndarray, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-replica energies (R,) kJ/mol and forces (R, N, 3) kJ/mol/nm of the float32 model."""
    n_replicas, n_atoms = frames.shape[:2]
    energies, forces = energy_and_forces(model, torch.as_tensor(np.tile(z, n_replicas)),
                                         torch.as_tensor(frames.reshape(-1, 3), dtype=torch.float32),
                                         batch_index(n_replicas, n_atoms))
    return (energies.detach().double().numpy() * EV_IN_KJ_PER_MOL,
            forces.detach().double().numpy().reshape(frames.shape) * EV_A_IN_KJ_MOL_NM)


@pytest.mark.parametrize("platform", ["Reference", "CPU"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_replica_torchforce_matches_the_pytorch_model(architecture, platform, ethanol, tmp_path):
    z, positions = ethanol
    frames = _replica_frames(positions)
    torch.manual_seed(0)
    model = create_model(architecture, "tiny").eval()
    assert next(model.net.parameters()).dtype == torch.float32
    expected_e, expected_f = _pytorch_energies_forces(model, z, frames)
    scale = np.abs(expected_f).max()
    # The input the comparison needs: forces well above float32 noise, and replicas that differ.
    assert scale > 1.0  # kJ/mol/nm
    assert np.abs(expected_f[0] - expected_f[1]).max() > 100 * TOLERANCE * scale

    forms = {
        # what ReplicaEngine builds: the guarded module returns energy and forces itself
        "engine": make_torch_force(script_force_module(model, z, N_REPLICAS, dtype=torch.float32, guarded=True),
                                   outputs_forces=True),
        # an exported file, as a production script loads it; OpenMM takes forces by autograd
        "file": make_torch_force(str(export_model(model, tmp_path / "model.pt", z, N_REPLICAS))),
    }
    for form, force in forms.items():
        energy, forces = _openmm_energy_forces(force, N_REPLICAS * len(z), frames, platform)
        total = expected_e.sum()
        assert abs(energy - total) <= TOLERANCE * np.abs(expected_e).sum(), (form, platform, energy, total)
        for k in range(N_REPLICAS):
            error = np.abs(forces[k] - expected_f[k]).max()
            assert error <= TOLERANCE * scale, (form, platform, k, error, scale)

"""Export as an OpenMM force: parity with PyTorch, replicas, periodic boxes, loading paths,
the openmm-ml plugin, energy conservation, the export CLI and the production example.

Parity is measured as relative errors: |E_openmm - E_torch| / |E_torch| for energies and
max |F_openmm - F_torch| / max |F_torch| for forces, against the PyTorch model run in the
same precision as the exported module.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch  # noqa: I001  (torch before openmm/openmmtorch: it preloads the CUDA libraries they link)
import numpy as np
import openmm
import pytest
from openmm import app, unit

from openmm_stable.export import (
    add_model_force,
    create_system,
    export_model,
    make_torch_force,
    script_force_module,
    topology_from_atomic_numbers,
)
from openmm_stable.models import batch_index, create_model, energy_and_forces, save_model
from openmm_stable.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM


def _available_platforms() -> list[str]:
    """Reference and CPU always; CUDA too where OpenMM has it (GPU machines), so that the same
    parity tests check the GPU path there."""
    names = {openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())}
    return ["Reference", "CPU"] + (["CUDA"] if "CUDA" in names else [])


PLATFORMS = _available_platforms()
EV_A_IN_KJ_MOL_NM = EV_IN_KJ_PER_MOL * NM_IN_ANGSTROM
PARITY = 1e-4  # relative, float32 export against float32 PyTorch
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "production_md.py"


# --------------------------------------------------------------------------- helpers


def _context(system, platform: str, integrator=None, precision: str = "single"):
    """A Context on `platform`; `precision` applies to GPU platforms (their default is single,
    which rounds the positions handed to the model to float32)."""
    integrator = integrator or openmm.VerletIntegrator(0.1 * unit.femtoseconds)
    properties = {"Threads": "1"} if platform == "CPU" else {}
    if platform in ("CUDA", "OpenCL"):
        properties["Precision"] = precision
    return openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform), properties)


def _system(z, n_copies: int = 1, box_angstrom=None):
    system = openmm.System()
    for _ in range(n_copies):
        for number in z:
            system.addParticle(app.Element.getByAtomicNumber(int(number)).mass)
    if box_angstrom is not None:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) / NM_IN_ANGSTROM for row in box_angstrom])
    return system


def openmm_energy_forces(system, positions_angstrom, platform: str, precision: str = "single"):
    """Energy (kJ/mol) and forces (kJ/mol/nm) of `system` at positions (N, 3) Angstrom."""
    context = _context(system, platform, precision=precision)
    assert context.getPlatform().getName() == platform
    context.setPositions(np.asarray(positions_angstrom).reshape(-1, 3) / NM_IN_ANGSTROM)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return energy, np.asarray(forces)


def torch_energy_forces(model, z, positions_angstrom, dtype=torch.float32, box_angstrom=None):
    """Energy (kJ/mol) and forces (kJ/mol/nm) of ONE structure, the network run in `dtype`."""
    reference = copy.deepcopy(model).eval()
    reference.net.to(dtype)  # as the exported module does: offsets stay float64
    zt = torch.as_tensor(np.asarray(z), dtype=torch.long)
    pos = torch.as_tensor(np.asarray(positions_angstrom), dtype=dtype)
    box = None if box_angstrom is None else torch.as_tensor(np.asarray(box_angstrom), dtype=dtype)
    energy, forces = energy_and_forces(reference, zt, pos, batch_index(1, len(z)), box)
    return float(energy.detach()) * EV_IN_KJ_PER_MOL, forces.double().numpy() * EV_A_IN_KJ_MOL_NM


def relative_errors(e_omm, f_omm, e_ref, f_ref) -> tuple[float, float]:
    return abs(e_omm - e_ref) / abs(e_ref), np.abs(f_omm - f_ref).max() / np.abs(f_ref).max()


def _elastic_network(positions: np.ndarray, bonds):
    """Harmonic springs on bonds (30 eV/A^2, a C-H stretch) and 1-3 pairs (5 eV/A^2)."""
    bonds = {tuple(sorted(b)) for b in bonds}
    n = len(positions)
    neighbours = [{m for m in range(n) if tuple(sorted((a, m))) in bonds} for a in range(n)]
    d0 = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    pairs, k = [], []
    for i in range(n):
        for j in range(i + 1, n):
            if (i, j) in bonds:
                pairs.append((i, j))
                k.append(30.0)
            elif neighbours[i] & neighbours[j]:  # i-m-j: an angle
                pairs.append((i, j))
                k.append(5.0)
    i, j = (torch.tensor(c) for c in zip(*pairs))
    r0 = torch.as_tensor(d0[i, j])
    k = torch.tensor(k, dtype=torch.float64)

    def energy(pos: torch.Tensor) -> torch.Tensor:  # (B, N, 3) -> (B,)
        r = (pos[:, j] - pos[:, i]).norm(dim=-1)
        return 0.5 * (k * (r - r0) ** 2).sum(-1)

    return energy


@pytest.fixture(scope="module")
def fitted_schnet(ethanol_shared, ethanol_bonds):
    """A tiny SchNet fitted (float64, 120 Adam steps, ~2 s) to an elastic network of ethanol.

    Random tiny SchNets have tiny, structureless forces (~0.01 eV/A) and no minimum: fine
    for parity, meaningless for dynamics. The fit gives the molecule bonds and angles with
    realistic stiffness: at 0.08 A displacements the reference force RMS is 3.0 eV/A and
    the fit's error 0.33 eV/A (99 % of the force variance explained), so NVE dynamics
    vibrate like a molecule at roughly the right frequencies.
    """
    atomic_numbers, positions = ethanol_shared
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model("schnet", "tiny").double()
    reference = _elastic_network(positions, ethanol_bonds)
    n_batch, n_atoms = 32, len(atomic_numbers)
    z = torch.as_tensor(np.tile(atomic_numbers, n_batch))
    batch = batch_index(n_batch, n_atoms)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(120):
        x = torch.as_tensor(positions[None] + 0.08 * rng.standard_normal((n_batch, n_atoms, 3)))
        x.requires_grad_(True)
        e_ref = reference(x)
        (f_ref,) = torch.autograd.grad(-e_ref.sum(), x)
        e, f = energy_and_forces(model, z, x.detach().reshape(-1, 3), batch, create_graph=True)
        loss = ((e - e.mean()) - (e_ref - e_ref.mean()).detach()).pow(2).mean() + (f - f_ref.reshape(-1, 3)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.net.float()  # float32 weights, the default export precision; offsets stay float64
    return model.eval()


@pytest.fixture(scope="module")
def graph_network():
    torch.manual_seed(1)
    return create_model("graph-network", "tiny").eval()


@pytest.fixture
def models(request):
    """arch -> model, built on first use (a machine without torchmd-net can run the schnet cases)."""
    fixture_of = {"schnet": "fitted_schnet", "graph-network": "graph_network"}

    class _Lazy(dict):
        def __missing__(self, arch):
            self[arch] = request.getfixturevalue(fixture_of[arch])
            return self[arch]

    return _Lazy()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("arch", ["schnet", "graph-network"])
def test_single_molecule_parity(arch, platform, models, ethanol, rng):
    z, pos = ethanol
    pos = pos + 0.05 * rng.standard_normal(pos.shape)
    model = models[arch]
    system = _system(z)
    system.addForce(make_torch_force(script_force_module(model, z)))
    e_omm, f_omm = openmm_energy_forces(system, pos, platform)
    e_ref, f_ref = torch_energy_forces(model, z, pos)
    e_rel, f_rel = relative_errors(e_omm, f_omm, e_ref, f_ref)
    assert e_rel < PARITY and f_rel < PARITY, (e_rel, f_rel)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_float64_export_is_exact(platform, fitted_schnet, ethanol, rng):
    """In float64 the only differences left are round-off: parity to 1e-10."""
    z, pos = ethanol
    pos = pos + 0.05 * rng.standard_normal(pos.shape)
    system = _system(z)
    system.addForce(make_torch_force(script_force_module(fitted_schnet, z, dtype=torch.float64)))
    e_rel, f_rel = relative_errors(*openmm_energy_forces(system, pos, platform, precision="double"),
                                   *torch_energy_forces(fitted_schnet, z, pos, torch.float64))
    assert e_rel < 1e-10 and f_rel < 1e-10, (e_rel, f_rel)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("arch", ["schnet", "graph-network"])
def test_replicas_match_separate_evaluation(arch, platform, models, ethanol, rng):
    """R = 3 copies in one batched force: each replica's forces equal its own evaluation."""
    z, pos = ethanol
    n_rep, n = 3, len(z)
    frames = pos[None] + 0.08 * rng.standard_normal((n_rep,) + pos.shape)
    model = models[arch]
    module = script_force_module(model, z, n_replicas=n_rep)
    system = _system(z, n_rep)
    system.addForce(make_torch_force(module))
    e_omm, f_omm = openmm_energy_forces(system, frames, platform)
    separate = [torch_energy_forces(model, z, frames[k]) for k in range(n_rep)]
    e_ref = sum(e for e, _ in separate)
    assert abs(e_omm - e_ref) / abs(e_ref) < PARITY
    for k, (_, f_ref) in enumerate(separate):
        f_k = f_omm[k * n:(k + 1) * n]
        assert np.abs(f_k - f_ref).max() / np.abs(f_ref).max() < PARITY, k
    # The module's per-replica energies are the separate energies too.
    pos_nm = torch.as_tensor(frames.reshape(-1, 3) / NM_IN_ANGSTROM)
    replica_e = module.replica_energies(pos_nm).detach().numpy()
    np.testing.assert_allclose(replica_e, [e for e, _ in separate], rtol=PARITY)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("arch", ["schnet", "graph-network"])
def test_engine_force_matches_separate_evaluation(arch, platform, models, ethanol, rng):
    """The force the replica engine runs (`guarded=True`: the module returns energy and
    forces, TorchForce.setOutputsForces) on R = 3 replicas: each replica's forces equal its
    own PyTorch evaluation; and the engine built on that force reports the same energies."""
    from openmm_stable.engine import EngineConfig, ReplicaEngine

    z, pos = ethanol
    n_rep, n = 3, len(z)
    frames = pos[None] + 0.08 * rng.standard_normal((n_rep,) + pos.shape)
    model = models[arch]
    system = _system(z, n_rep)
    system.addForce(make_torch_force(script_force_module(model, z, n_replicas=n_rep, guarded=True),
                                     outputs_forces=True))
    e_omm, f_omm = openmm_energy_forces(system, frames, platform)
    separate = [torch_energy_forces(model, z, frames[k]) for k in range(n_rep)]
    e_ref = sum(e for e, _ in separate)
    assert abs(e_omm - e_ref) / abs(e_ref) < PARITY
    for k, (_, f_ref) in enumerate(separate):
        f_k = f_omm[k * n:(k + 1) * n]
        assert np.abs(f_k - f_ref).max() / np.abs(f_ref).max() < PARITY, k
    engine = ReplicaEngine(model, z, n_rep, EngineConfig(platform=platform, temperature_K=300.0))
    assert engine.platform_name == platform
    engine.set_states(frames)
    assert abs(float(engine.potential_energies().sum()) - e_ref) / abs(e_ref) < PARITY


@pytest.mark.parametrize("platform", PLATFORMS)
def test_engine_force_zeroes_a_broken_replica_only(platform, fitted_schnet, ethanol, rng):
    """A replica whose energy is NaN (an atom pulled 20 A away, see test_engine.NaNBeyond)
    gets zero energy and forces from the guarded force; the others keep their own."""
    from test_engine import NaNBeyond

    z, pos = ethanol
    n_rep, n = 3, len(z)
    frames = pos[None] + 0.08 * rng.standard_normal((n_rep,) + pos.shape)
    frames[1, 8] += [20.0, 0.0, 0.0]
    module = script_force_module(NaNBeyond(fitted_schnet, radius=8.0), z, n_replicas=n_rep, guarded=True)
    system = _system(z, n_rep)
    system.addForce(make_torch_force(module, outputs_forces=True))
    e_omm, f_omm = openmm_energy_forces(system, frames, platform)
    assert np.isfinite(e_omm) and np.isfinite(f_omm).all()
    assert np.abs(f_omm[n:2 * n]).max() == 0.0
    good = [torch_energy_forces(fitted_schnet, z, frames[k]) for k in (0, 2)]
    e_ref = sum(e for e, _ in good)
    assert abs(e_omm - e_ref) / abs(e_ref) < PARITY
    for k, (_, f_ref) in zip((0, 2), good):
        assert np.abs(f_omm[k * n:(k + 1) * n] - f_ref).max() / np.abs(f_ref).max() < PARITY, k


@pytest.mark.parametrize("platform", PLATFORMS)
def test_periodic_molecule_across_the_boundary(platform, fitted_schnet, ethanol, rng):
    """Box 1.2 nm, ethanol straddling the x = 0 face, positions wrapped into the box: the
    minimum image must reassemble the molecule (PyTorch reference: the whole molecule, no box)."""
    z, pos = ethanol
    box = np.diag([12.0, 12.0, 12.0])
    whole = pos + 0.05 * rng.standard_normal(pos.shape) + np.array([0.2, 6.0, 6.0])
    wrapped = whole % 12.0
    assert np.abs(wrapped - whole).max() > 6.0  # atoms really sit on both sides of the box
    system = _system(z, box_angstrom=box)
    system.addForce(make_torch_force(script_force_module(fitted_schnet, z), periodic=True))
    assert system.usesPeriodicBoundaryConditions()
    e_omm, f_omm = openmm_energy_forces(system, wrapped, platform)
    e_rel, f_rel = relative_errors(e_omm, f_omm, *torch_energy_forces(fitted_schnet, z, whole))
    assert e_rel < PARITY and f_rel < PARITY, (e_rel, f_rel)
    # Without periodicity the wrapped molecule is torn apart: the test can tell the difference.
    system_free = _system(z)
    system_free.addForce(make_torch_force(script_force_module(fitted_schnet, z)))
    assert abs(openmm_energy_forces(system_free, wrapped, platform)[0] - e_omm) > 1.0


# --------------------------------------------------------------------------- loading paths


@pytest.mark.parametrize("arch", ["schnet", "graph-network"])
def test_exported_file_loads_with_plain_torchforce(arch, models, ethanol, tmp_path):
    """``openmmtorch.TorchForce(path)``: what any OpenMM script does with the exported file.
    (For graph-network, `import torchmdnet.models.model` has registered its ops already.)"""
    from openmmtorch import TorchForce

    z, pos = ethanol
    model = models[arch]
    path = export_model(model, tmp_path / "model_openmm.pt", z, n_replicas=1)
    system = _system(z)
    system.addForce(TorchForce(str(path)))
    e_rel, f_rel = relative_errors(*openmm_energy_forces(system, pos, "CPU"), *torch_energy_forces(model, z, pos))
    assert e_rel < PARITY and f_rel < PARITY


@pytest.mark.parametrize("arch", ["schnet", "graph-network"])
def test_exported_file_loads_in_a_fresh_process(arch, models, ethanol, tmp_path):
    """A new process loads an exported file with `make_torch_force` and `load_exported`;
    torchmd-net (and warp, with its CUDA-driver banner) is imported only for a file that
    calls torchmd-net's ops."""
    z, _ = ethanol
    path = export_model(models[arch], tmp_path / "model_openmm.pt", z, n_replicas=1)
    code = ("import sys, torch\n"
            "from openmm_stable.export import load_exported, make_torch_force\n"
            f"load_exported({str(path)!r}); make_torch_force({str(path)!r})\n"
            "print('torchmdnet imported:', 'torchmdnet' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"torchmdnet imported: {arch != 'schnet'}" in proc.stdout
    if arch == "schnet":
        assert "Warp" not in proc.stderr


def test_openmmml_plugin_create_system(fitted_schnet, ethanol, tmp_path):
    from openmmml import MLPotential

    z, pos = ethanol
    path = tmp_path / "model.ckpt"
    save_model(fitted_schnet, path)
    topology = topology_from_atomic_numbers(z)
    system = MLPotential("openmm-stable", modelPath=str(path)).createSystem(topology)
    names = [force.getName() for force in system.getForces()]
    assert names == ["TorchForce", "CMMotionRemover"]
    e_rel, f_rel = relative_errors(*openmm_energy_forces(system, pos, "CPU"),
                                   *torch_energy_forces(fitted_schnet, z, pos))
    assert e_rel < PARITY and f_rel < PARITY
    # create_system (no openmm-ml) builds the same System.
    ours = create_system(topology, path)
    np.testing.assert_allclose(openmm_energy_forces(ours, pos, "CPU")[1], openmm_energy_forces(system, pos, "CPU")[1])


def test_model_on_an_atom_subset(fitted_schnet, ethanol):
    """openmm-ml's `atoms`: the model sees only the chosen particles (here the second copy)."""
    z, pos = ethanol
    topology = topology_from_atomic_numbers(z, n_copies=2)
    system = _system(z, 2)
    add_model_force(system, topology, fitted_schnet, atoms=range(9, 18))
    both = np.concatenate([pos + np.array([20.0, 0.0, 0.0]), pos])
    e_omm, f_omm = openmm_energy_forces(system, both, "Reference")
    e_ref, f_ref = torch_energy_forces(fitted_schnet, z, pos)
    assert np.abs(f_omm[:9]).max() == 0.0
    e_rel, f_rel = relative_errors(e_omm, f_omm[9:], e_ref, f_ref)
    assert e_rel < PARITY and f_rel < PARITY


# --------------------------------------------------------------------------- NVE


def _nve_run(module, z, pos, dt_fs: float, n_steps: int, n_samples: int = 100):
    system = _system(z)  # no CMMotionRemover: it would touch the velocities
    system.addForce(make_torch_force(module))
    integrator = openmm.VerletIntegrator(dt_fs * unit.femtoseconds)
    context = _context(system, "CPU", integrator)
    context.setPositions(pos / NM_IN_ANGSTROM)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 7)
    kinetic, total, max_bond_change = [], [], 0.0
    d0 = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    for sample in range(n_samples + 1):
        state = context.getState(getEnergy=True, getPositions=True)
        ke = state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole)
        kinetic.append(ke)
        total.append(ke + state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        x = state.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        max_bond_change = max(max_bond_change, np.abs(d - d0)[d0 < 1.6].max())
        if sample < n_samples:
            integrator.step(n_steps // n_samples)
    kinetic, total = np.array(kinetic), np.array(total)
    slope = np.polyfit(np.arange(total.size), total, 1)[0]
    ke_mean = kinetic.mean()
    return {
        "drift": abs(slope) * (total.size - 1) / ke_mean,  # linear trend over the run
        "fluctuation": total.std() / ke_mean,
        "ke_mean": ke_mean,
        "max_bond_change": max_bond_change,
    }


def test_nve_conserves_energy(fitted_schnet, ethanol):
    """Velocity Verlet, float64 export, 300 K, 1,000 steps of 0.1 fs (0.1 ps), CPU platform.

    Measured, relative to the mean kinetic energy (~50 kJ/mol: the start is not the fitted
    model's minimum): fluctuation (std of the total energy) 5.2e-5, linear trend over the run
    1.5e-5. Both scale as dt^2 (0.05 / 0.1 / 0.2 fs: 1.3e-5 / 5.2e-5 / 2.1e-4 fluctuation,
    3.8e-6 / 1.5e-5 / 6.1e-5 trend), so the "trend" is the integrator's bounded oscillation
    seen over a short window, not a secular drift; an energy-force mismatch would give a
    drift that does not shrink with dt.
    Bounds: fluctuation < 1e-3, trend < 2e-4 (margins 19x and 13x). The ceiling reasoning:
    Verlet's energy error oscillates with an amplitude ~(omega dt)^2/8 of the energy in the
    fastest mode; for an O-H stretch (~9 fs period) at 0.1 fs that is ~6e-4. The test also
    checks the dt^2 scaling of the fluctuation (ratio 3-5 when dt doubles).
    """
    z, pos = ethanol
    module = script_force_module(fitted_schnet, z, dtype=torch.float64)
    fine = _nve_run(module, z, pos, 0.1, 1000)
    coarse = _nve_run(module, z, pos, 0.2, 500)
    assert fine["max_bond_change"] < 0.3, fine  # the molecule vibrates, it does not fall apart
    assert fine["max_bond_change"] > 0.01, fine  # ... and it does move
    assert fine["fluctuation"] < 1e-3, fine
    assert fine["drift"] < 2e-4, fine
    assert 3.0 < coarse["fluctuation"] / fine["fluctuation"] < 5.0, (fine, coarse)


# --------------------------------------------------------------------------- CLI


def test_cli_export_from_checkpoint_atomic_numbers(fitted_schnet, ethanol, tmp_path, capsys):
    from openmmtorch import TorchForce

    from openmm_stable.cli import main

    z, pos = ethanol
    ckpt = tmp_path / "model.ckpt"
    save_model(fitted_schnet, ckpt, atomic_numbers=z.tolist())
    out = tmp_path / "exported" / "model_openmm.pt"
    assert main(["export", str(ckpt), "--out", str(out), "--replicas", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "TorchForce(" in printed and "2 replicas" in printed
    assert "torchmdnet" not in printed  # plain-PyTorch SchNet: no extension import needed
    system = _system(z, 2)
    system.addForce(TorchForce(str(out)))
    e_omm, f_omm = openmm_energy_forces(system, np.concatenate([pos, pos]), "CPU")
    e_ref, f_ref = torch_energy_forces(fitted_schnet, z, pos)
    assert abs(e_omm - 2 * e_ref) / abs(2 * e_ref) < PARITY
    assert np.abs(f_omm[9:] - f_ref).max() / np.abs(f_ref).max() < PARITY


def test_cli_export_atoms_from_dataset(graph_network, ethanol, tmp_path, capsys):
    from openmm_stable.cli import main
    from openmm_stable.data import QMDataset, save_dataset

    z, pos = ethanol
    ckpt = tmp_path / "gn.ckpt"
    save_model(graph_network, ckpt)
    data = save_dataset(QMDataset(atomic_numbers=z, positions=pos[None]), tmp_path / "frames.npz")
    out = tmp_path / "gn64.pt"
    assert main(["export", str(ckpt), "--atoms-from", str(data), "--dtype", "float64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "import torchmdnet.models.model" in printed and "float64" in printed
    e_ref, _ = torch_energy_forces(graph_network, z, pos, torch.float64)
    exported = torch.jit.load(str(out))
    e = float(exported(torch.as_tensor(pos / NM_IN_ANGSTROM)))
    assert abs(e - e_ref) <= 1e-10 * abs(e_ref)


def test_cli_export_errors(graph_network, tmp_path, capsys):
    from openmm_stable.cli import main

    ckpt = tmp_path / "gn.ckpt"
    save_model(graph_network, ckpt)  # no atomic numbers stored
    assert main(["export", str(ckpt), "--out", str(tmp_path / "x.pt")]) == 2
    assert "stores no atomic numbers" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--replicas", "0", "--molecule", "water"]) == 2
    assert "--replicas" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- example


def test_production_example_runs(fitted_schnet, ethanol, tmp_path):
    """examples/production_md.py, 20 steps on the CPU platform from an .xyz file.

    Run as its own process, as a user would: the script imports openmm before torch, the
    order in which openmm-torch's plugins fail to load at `import openmm` (see
    `openmm_stable.export._load_torch_kernels`).
    """
    z, pos = ethanol
    ckpt = tmp_path / "model.ckpt"
    save_model(fitted_schnet, ckpt)
    xyz = tmp_path / "ethanol.xyz"
    symbols = {1: "H", 6: "C", 8: "O"}
    xyz.write_text(f"{len(z)}\nethanol\n" + "".join(f"{symbols[int(k)]} {x:.6f} {y:.6f} {w:.6f}\n"
                                                  for k, (x, y, w) in zip(z, pos)))
    out = tmp_path / "md"
    command = [sys.executable, str(EXAMPLE), str(ckpt), "--structure", str(xyz), "--steps", "20",
               "--report-interval", "10", "--temperature", "300", "--platform", "CPU", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENMM_CPU_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "platform CPU" in result.stdout and "minimised potential energy" in result.stdout
    rows = [line for line in (out / "state.csv").read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == 2
    assert all(np.isfinite(float(v)) for row in rows for v in row.split(",")[:6])
    assert (out / "trajectory.dcd").stat().st_size > 0
    assert app.PDBFile(str(out / "start.pdb")).topology.getNumAtoms() == len(z)

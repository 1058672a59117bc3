"""Periodic water end to end: SPC/Fw reference data, minimum-image models in one periodic
Context (replicas never see each other), stability by minimum intermolecular distance,
RDF and diffusivity metrics, and `simulate` / `refine` on a tiny box.

A box of 8 waters (6.2 A) keeps everything fast; model cutoffs stay below half of it.
Element-pair RDFs against mdtraj are in test_observables.py.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import openmm
import pytest
import torch
from torch import Tensor, nn
from typing import Optional

from openmm_stable.cli import main
from openmm_stable.data import QMDataset, load_dataset
from openmm_stable.data.water import SPCFW, WaterReference, box_length
from openmm_stable.engine import EngineConfig, ReplicaEngine, masses_amu
from openmm_stable.export import export_model, make_torch_force
from openmm_stable.models import create_model
from openmm_stable.models.base import batch_index, energy_and_forces
from openmm_stable.models.schnet import pair_vectors, structure_pairs
from openmm_stable.observables import RdfObservable
from openmm_stable.dynamics import molecular_diffusivity
from openmm_stable.simulate import SimulationConfig, simulate
from openmm_stable.stability import (BondDeviationCriterion, MinimumDistanceCriterion, make_criterion, molecule_ids,
                                     resolve_stability)
from openmm_stable.training.stable import StableConfig, StableTrainer
from openmm_stable.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM

N_WATERS = 8
KJ_MOL_NM_PER_EV_A = EV_IN_KJ_PER_MOL * NM_IN_ANGSTROM


@pytest.fixture(scope="module")
def water_files(tmp_path_factory):
    """`data generate --system water`: 8 waters, 40 labelled frames, a 1 ps trajectory."""
    out = tmp_path_factory.mktemp("water") / "water.npz"
    code = main(["data", "generate", "--system", "water", "--molecules", str(N_WATERS), "--frames", "40",
                 "--stride", "10", "--equilibration-steps", "2000", "--trajectory-ps", "1",
                 "--trajectory-interval", "0.025", "--out", str(out), "--no-progress"])
    assert code == 0
    return out, out.with_name("water_traj.npz")


@pytest.fixture(scope="module")
def water(water_files):
    return load_dataset(water_files[0])


@pytest.fixture(scope="module")
def water_traj(water_files):
    return load_dataset(water_files[1])


def wrapped(positions: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Every atom put into the box on its own: molecules at the faces are split."""
    lengths = np.diag(box)
    return positions - lengths * np.floor(positions / lengths)


def split_molecules(positions: np.ndarray, box: np.ndarray) -> int:
    """How many molecules (O, H, H) have atoms on both sides of a box face."""
    w = wrapped(positions, box).reshape(-1, 3, 3)
    span = w.max(axis=1) - w.min(axis=1)
    return int((span > 0.5 * np.diag(box)).any(axis=1).sum())


def straddling(positions: np.ndarray, box: np.ndarray, molecule: int = 0) -> np.ndarray:
    """The frame (whole molecules) translated so that a box face passes between `molecule`'s
    O and first H, along the axis on which they lie farthest apart: wrapped, that molecule
    is split, whatever the frame. A rigid translation changes no periodic energy or force."""
    o, h = positions[3 * molecule], positions[3 * molecule + 1]
    axis = int(np.argmax(np.abs(h - o)))
    shift = np.zeros(3)
    shift[axis] = -0.5 * (o[axis] + h[axis])
    moved = positions + shift
    assert split_molecules(moved, box) >= 1
    return moved


def min_image_distances(x: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(N, N) minimum-image distances of one frame in a rectangular box (brute force)."""
    d = x[:, None] - x[None]
    lengths = np.diag(box)
    d -= lengths * np.round(d / lengths)
    return np.linalg.norm(d, axis=-1)


def lattice_water(n_side: int = 2, r_oh: float = SPCFW["r_OH"],
                  h_h: float = 2 * SPCFW["r_OH"] * np.sin(np.radians(SPCFW["theta_HOH"]) / 2)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(positions (3 M, 3), box) of M = n_side^3 waters (SPC/Fw's shape unless told O-H and
    H-H) built by hand at water's density: every O on a simple cubic lattice (spacing 3.1 A for 8 waters), all molecules
    alike (H-H along the xy diagonal, bisector along z), so the nearest atoms of different
    molecules are 2.25 A apart. The lattice is shifted so that the layer of molecules 0-3
    straddles the x = 0 face (each O at x = 0.3 A, its second H at x = -0.3 A). Molecules
    are whole (not wrapped)."""
    L = box_length(n_side ** 3)
    a = L / n_side
    r, half = r_oh, np.arcsin(0.5 * h_h / r_oh)
    across, bisector = np.array([1.0, 1.0, 0.0]) / np.sqrt(2), np.array([0.0, 0.0, 1.0])
    local = np.stack([np.zeros(3), r * np.sin(half) * across + r * np.cos(half) * bisector,
                      -r * np.sin(half) * across + r * np.cos(half) * bisector])
    cells = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = ((cells[:, None] + 0.5) * a + local[None]).reshape(-1, 3)
    positions[:, 0] += 0.3 - 0.5 * a
    return positions, np.eye(3) * L


def lattice_dataset(n_frames: int = 1, temperature: float = 300.0) -> QMDataset:
    """`lattice_water` as a periodic dataset (its frames identical), 3 atoms per molecule."""
    x, box = lattice_water()
    return QMDataset(np.tile([8, 1, 1], N_WATERS), np.repeat(x[None], n_frames, 0), box=box,
                     temperature=temperature, metadata={"atoms_per_molecule": 3}, source="lattice")


# --- reference data ------------------------------------------------------------------------
def test_generated_water_frames(water, water_traj):
    L = box_length(N_WATERS)
    for ds in (water, water_traj):
        assert ds.periodic and ds.has_labels and ds.velocities is not None
        np.testing.assert_allclose(ds.box, np.eye(3) * L)
        assert ds.temperature == 300.0 and ds.metadata["atoms_per_molecule"] == 3
        np.testing.assert_array_equal(ds.atomic_numbers, np.tile([8, 1, 1], N_WATERS))
        oh = np.linalg.norm(ds.positions[:, 1::3] - ds.positions[:, 0::3], axis=-1)  # molecules stay whole
        assert 0.85 < oh.min() and oh.max() < 1.2 and abs(oh.mean() - SPCFW["r_OH"]) < 0.05
    np.testing.assert_allclose(np.diff(water.times), 10 * 0.5e-3)
    np.testing.assert_allclose(np.diff(water_traj.times), 0.025)
    assert water_traj.times[0] > water.times[-1]  # the same run, continued
    assert len(water_traj) == 40
    np.testing.assert_array_equal(molecule_ids(water), np.repeat(np.arange(N_WATERS), 3))


def test_labels_are_the_reference_energy_and_its_gradient(water):
    """Stored energies/forces (CPU platform) equal SPC/Fw's in double precision (Reference
    platform), and forces are minus the finite-difference gradient of the energy."""
    ref = WaterReference(N_WATERS, water.box, platform="Reference")
    for k in (0, len(water) - 1):
        energy, forces = ref(water.positions[k])
        assert abs(energy - water.energies[k]) < 2e-3  # eV, of ~ -3.7 eV
        np.testing.assert_allclose(water.forces[k], forces, rtol=0, atol=5e-3)
    k = len(water) // 2
    x, h = straddling(water.positions[k], water.box), 1e-4  # the stored forces hold after a translation
    energy, forces = ref(x)
    for atom, axis in ((0, 0), (4, 1), (20, 2)):
        plus, minus = x.copy(), x.copy()
        plus[atom, axis] += h
        minus[atom, axis] -= h
        fd = -(ref(plus)[0] - ref(minus)[0]) / (2 * h)
        assert abs(fd - forces[atom, axis]) < 2e-3 * max(1.0, abs(forces[atom, axis]))
        assert abs(fd - water.forces[k, atom, axis]) < 1e-2
    # the reference itself is periodic: splitting molecules across the faces changes nothing
    e_wrapped, f_wrapped = ref(wrapped(x, water.box))
    assert abs(e_wrapped - energy) < 1e-6
    np.testing.assert_allclose(f_wrapped, forces, rtol=0, atol=1e-6)


# --- periodic models in OpenMM -----------------------------------------------------------------
class ToyWater(nn.Module):
    """A water-like reference potential in the model protocol: harmonic springs inside
    each molecule (O-H and H-H) and truncated Lennard-Jones between atoms of different
    molecules, minimum-image pairs within one structure (schnet's `pair_vectors`)."""

    def __init__(self, cutoff: float = 3.0):
        super().__init__()
        self.cutoff = cutoff
        self.k = 40.0  # eV/A^2
        self.sigma = {8: 3.0, 1: 1.6}
        self.eps = {8: 0.0067, 1: 0.002}  # eV
        self.register_buffer("sig", torch.zeros(9, dtype=torch.float64))
        self.register_buffer("ep", torch.zeros(9, dtype=torch.float64))
        for z in (1, 8):
            self.sig[z], self.ep[z] = self.sigma[z], self.eps[z]

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        i, j = structure_pairs(batch)
        r = torch.linalg.norm(pair_vectors(pos, i, j, box), dim=-1)
        n_per = int((batch == 0).sum().item())
        mol = (torch.arange(pos.shape[0], device=pos.device) % n_per) // 3
        same = mol[i] == mol[j]
        r0 = torch.where(z[i] == z[j], torch.full_like(r, 1.6), torch.full_like(r, 1.0))
        spring = 0.5 * self.k * (r - r0) ** 2
        sigma = 0.5 * (self.sig[z[i]] + self.sig[z[j]]).to(r.dtype)
        eps = torch.sqrt(self.ep[z[i]] * self.ep[z[j]]).to(r.dtype)
        s6 = (sigma / r) ** 6
        lj = torch.where(r < self.cutoff, 4 * eps * (s6 * s6 - s6), torch.zeros_like(r))
        pair = torch.where(same, spring, lj)
        n_structures = int(batch[-1].item()) + 1
        return torch.zeros(n_structures, dtype=pos.dtype, device=pos.device).index_add(0, batch[i], 0.5 * pair)


def toy_openmm_system(box: np.ndarray, n_waters: int, toy: ToyWater):
    """The same potential with OpenMM's own forces (springs, NonbondedForce CutoffPeriodic)."""
    system = openmm.System()
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) / NM_IN_ANGSTROM for row in box])
    springs = openmm.HarmonicBondForce()
    lj = openmm.NonbondedForce()
    lj.setNonbondedMethod(openmm.NonbondedForce.CutoffPeriodic)
    lj.setCutoffDistance(toy.cutoff / NM_IN_ANGSTROM)
    lj.setUseDispersionCorrection(False)
    k = toy.k * KJ_MOL_NM_PER_EV_A * NM_IN_ANGSTROM
    for m in range(n_waters):
        atoms = [system.addParticle(mass) for mass in (16.0, 1.008, 1.008)]
        for z, a in zip((8, 1, 1), atoms):
            lj.addParticle(0.0, toy.sigma[z] / NM_IN_ANGSTROM, toy.eps[z] * EV_IN_KJ_PER_MOL)
        for a, b, r0 in ((0, 1, 1.0), (0, 2, 1.0), (1, 2, 1.6)):
            springs.addBond(atoms[a], atoms[b], r0 / NM_IN_ANGSTROM, k)
            lj.addException(atoms[a], atoms[b], 0.0, 1.0, 0.0)
    springs.setUsesPeriodicBoundaryConditions(True)
    system.addForce(springs)
    system.addForce(lj)
    return system


def _energy_forces(system, positions_angstrom):
    context = openmm.Context(system, openmm.VerletIntegrator(1e-4), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions_angstrom.reshape(-1, 3) / NM_IN_ANGSTROM)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer))


def _replica_system(module_or_path, box, n_atoms_total):
    system = openmm.System()
    for _ in range(n_atoms_total):
        system.addParticle(1.0)
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) / NM_IN_ANGSTROM for row in box])
    system.addForce(make_torch_force(module_or_path, periodic=True))
    return system


def test_replicas_in_one_periodic_context_match_openmm_reference_potential(water, tmp_path):
    """3 replicas of the box in ONE Context, overlapping in space, atoms wrapped so that
    molecules straddle the faces: each replica's forces equal OpenMM's own periodic
    implementation of the same potential on that box alone (no cross-replica pairs)."""
    toy = ToyWater()
    frames = np.stack([wrapped(straddling(water.positions[k], water.box, molecule=m), water.box)
                       for k, m in ((0, 0), (15, 3), (30, 6))])
    path = export_model(toy, tmp_path / "toy.pt", water.atomic_numbers, n_replicas=3, dtype=torch.float64)
    energy, forces = _energy_forces(_replica_system(str(path), water.box, 3 * water.n_atoms), frames)
    native = toy_openmm_system(water.box, N_WATERS, toy)
    expected = [_energy_forces(native, f) for f in frames]
    assert energy == pytest.approx(sum(e for e, _ in expected), rel=1e-9, abs=1e-9)
    np.testing.assert_allclose(forces.reshape(3, -1, 3), np.stack([f for _, f in expected]), rtol=1e-7, atol=1e-6)


def test_exported_periodic_schnet_matches_pytorch(water, tmp_path):
    """A SchNet (cutoff below half the box) exported in replica form: OpenMM on wrapped,
    split molecules = PyTorch on the whole, unwrapped box, replica by replica."""
    torch.manual_seed(0)
    model = create_model("schnet", "tiny", cutoff=3.0).double()
    frames = np.stack([straddling(water.positions[5], water.box, 1), straddling(water.positions[25], water.box, 5)])
    path = export_model(model, tmp_path / "schnet.pt", water.atomic_numbers, n_replicas=2, dtype=torch.float64)
    energy, forces = _energy_forces(_replica_system(str(path), water.box, 2 * water.n_atoms),
                                    np.stack([wrapped(f, water.box) for f in frames]))
    z = torch.as_tensor(water.atomic_numbers)
    box = torch.as_tensor(water.box)
    expected_e, expected_f = 0.0, []
    for f in frames:
        e, fr = energy_and_forces(model, z, torch.as_tensor(f), batch_index(1, water.n_atoms), box)
        expected_e += float(e.detach()) * EV_IN_KJ_PER_MOL
        expected_f.append(fr.numpy() * KJ_MOL_NM_PER_EV_A)
    assert energy == pytest.approx(expected_e, rel=1e-10)
    np.testing.assert_allclose(forces.reshape(2, -1, 3), np.stack(expected_f), rtol=1e-8, atol=1e-8)


def test_engine_rejects_cutoff_beyond_half_the_box(water):
    model = create_model("schnet", "tiny")  # 5 A cutoff, box 6.2 A
    with pytest.raises(ValueError, match="half the periodic box"):
        ReplicaEngine(model, water.atomic_numbers, 2, EngineConfig(platform="CPU"), water.box)


# --- stability and observables ---------------------------------------------------------------
def test_criterion_choice_and_collisions_across_the_face(water, ethanol):
    """On a box built by hand (`lattice_water`: nearest atoms of different molecules 2.25 A
    apart, molecules 0-3 split by the x face), so that every distance the assertions name is
    the one the test put there, on any machine."""
    z, positions = ethanol
    molecule = QMDataset(z, positions[None])
    assert resolve_stability("auto", molecule) == "bonds" and resolve_stability("auto", water) == "min_distance"
    assert isinstance(make_criterion(molecule), BondDeviationCriterion)
    lattice = lattice_dataset()
    criterion = make_criterion(lattice, min_distance_threshold=1.2)
    assert isinstance(criterion, MinimumDistanceCriterion) and criterion.threshold == 1.2
    x = wrapped(lattice.positions[0], lattice.box)
    assert split_molecules(lattice.positions[0], lattice.box) == 4
    distances = min_image_distances(x, lattice.box)
    ids = np.repeat(np.arange(N_WATERS), 3)
    inter = distances[ids[:, None] != ids[None]].min()
    assert criterion(x).item() == pytest.approx(inter, abs=1e-6) and inter == pytest.approx(2.255, abs=1e-3)
    assert not criterion.unstable(criterion(x)).item()
    # molecules from minimum-image bonds of the wrapped box (4 of them split): O, H, H blocks
    no_meta = QMDataset(lattice.atomic_numbers, x[None], box=lattice.box)
    np.testing.assert_array_equal(molecule_ids(no_meta), ids)
    # put molecule 0's and molecule 1's oxygens 0.9 A apart through the x face, in the empty
    # middle of a face of the lattice (every other atom > 1.3 A from both)
    bad = x.copy()
    L = lattice.box[0, 0]
    bad[0] = [0.45, 0.5 * L, 0.5 * L]
    bad[3] = [L - 0.45, 0.5 * L, 0.5 * L]
    d_bad = min_image_distances(bad, lattice.box)
    for atom in (0, 3):
        others = (ids != ids[atom]) & ~np.isin(np.arange(len(ids)), (0, 3))
        assert d_bad[atom, others].min() > 1.3
    assert criterion(bad).item() == pytest.approx(0.9, abs=1e-6)
    assert criterion.unstable(criterion(bad)).item()
    bonds = make_criterion(lattice, "bonds")  # bonds and lengths through the faces too
    assert bonds.bonds.shape == (2 * N_WATERS, 2) and bonds(x).item() == pytest.approx(0.0, abs=1e-6)
    assert bonds(bad).item() > 1.0 and bonds.unstable(bonds(bad)).item()  # the moved O left its H
    # a molecule folding onto itself (its two H 0.3 A apart, O-H bonds intact) is invisible to
    # the intermolecular and the bond criteria; the non-bonded distance sees it
    folded = x.copy()
    h1, h2 = 3 * 5 + 1, 3 * 5 + 2  # molecule 5's hydrogens, moved along their (whole) H-H line
    folded[h2] = folded[h1] + 0.3 * (folded[h2] - folded[h1]) / np.linalg.norm(folded[h2] - folded[h1])
    nonbonded = make_criterion(lattice, "min_nonbonded_distance")
    assert criterion(folded).item() == pytest.approx(inter, abs=1e-6) and not criterion.unstable(criterion(folded))
    assert nonbonded(folded).item() == pytest.approx(0.3, abs=1e-6) and nonbonded.unstable(nonbonded(folded)).item()
    h_h = 2 * SPCFW["r_OH"] * np.sin(np.radians(SPCFW["theta_HOH"]) / 2)  # 1.69 A, the closest non-bonded pair
    assert nonbonded(x).item() == pytest.approx(h_h, abs=1e-6)


def test_multi_pair_rdf_and_com_diffusivity(water_traj):
    pairs = ((8, 8), (8, 1), (1, 1))
    both = RdfObservable(pairs=pairs, r_max=3.0, n_bins=30, sigma=0.0)(
        water_traj.positions, water_traj.atomic_numbers, water_traj.box)
    parts = [RdfObservable(pair=p, r_max=3.0, n_bins=30, sigma=0.0)(
        water_traj.positions, water_traj.atomic_numbers, water_traj.box) for p in pairs]
    torch.testing.assert_close(both, torch.cat(parts, -1))
    # diffusivity: invariant to wrapping and to a drift of the whole box
    ids, masses = molecule_ids(water_traj), np.tile([16.0, 1.0, 1.0], N_WATERS)
    d = molecular_diffusivity(water_traj.positions, water_traj.box, 0.025, ids, masses, 20)
    drift = water_traj.positions + 3.0 * water_traj.times[:, None, None]
    d_wrapped_drift = molecular_diffusivity(wrapped(drift, water_traj.box), water_traj.box, 0.025, ids, masses, 20)
    assert d > 0 and d_wrapped_drift == pytest.approx(d, rel=1e-6)


# --- simulate and refine ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def water_model_file(water_files, tmp_path_factory):
    """A tiny SchNet pre-trained on the CPU (the platform every number below was measured on)."""
    out = tmp_path_factory.mktemp("water_pre")
    code = main(["pretrain", str(water_files[0]), "--out", str(out), "--preset", "tiny", "--cutoff", "3.0",
                 "--train", "32", "--val", "8", "--test", "0", "--epochs", "30", "--lr", "5e-3",
                 "--batch-size", "16", "--device", "cpu", "--no-progress"])
    assert code == 0
    return out / "model.pt"


# ToyWater runs start from `lattice_water` built with ToyWater's own geometry (O-H 1.0 A,
# H-H 1.6 A), so they start near its minimum, not from SPC/Fw frames that it would push
# apart. Their stability threshold is 0.9 A: two H of different ToyWater molecules 0.9 A
# apart repel with 8 eV (300 kT at 300 K; an O 2.3 A closer still), which no replica
# reaches in a fraction of a picosecond, so every replica is stable by construction.
TOY_THRESHOLD = 0.9


def toy_lattice_dataset(n_frames: int = 4) -> QMDataset:
    x, box = lattice_water(r_oh=1.0, h_h=1.6)
    return QMDataset(np.tile([8, 1, 1], N_WATERS), np.repeat(x[None], n_frames, 0), box=box, temperature=300.0,
                     metadata={"atoms_per_molecule": 3}, source="toy lattice")


def test_simulate_water_writes_rdf_and_diffusivity(water, water_traj, tmp_path):
    """A stable (physical) periodic model: per-pair RDF errors and both diffusivities, each
    checked against a recomputation from the files the run wrote (trajectories, vacf.npz)."""
    import mdtraj

    from openmm_stable.dynamics import A2_PER_PS_IN_CM2_PER_S, first_minimum, green_kubo_diffusivity

    start = toy_lattice_dataset()
    config = SimulationConfig(n_replicas=2, time_ps=0.4, check_interval_ps=0.02, write_trajectories=True,
                              min_distance_threshold=TOY_THRESHOLD,
                              engine=EngineConfig(temperature_K=300.0, platform="CPU"))
    metrics = simulate(ToyWater(), start, config, tmp_path, reference=water_traj, progress=False)
    assert metrics["stability"] == "min_distance" and metrics["stable_fraction"] == 1.0
    assert metrics["stable_time_ps"] == pytest.approx([0.4, 0.4])
    assert set(metrics["rdf_mae"]) == {"O-O", "O-H", "H-H"}
    rdf = np.load(tmp_path / "rdf.npz")
    assert rdf["r"].max() < 0.5 * start.box[0, 0] and {"model_O-H", "reference_H-H"} <= set(rdf.files)
    for pair, mae in metrics["rdf_mae"].items():
        assert mae == pytest.approx(np.abs(rdf[f"model_{pair}"] - rdf[f"reference_{pair}"]).mean(), rel=1e-9)
    assert (tmp_path / "rdf.png").exists() and (tmp_path / "min_distance.png").exists()
    assert not (tmp_path / "hr.npz").exists()
    # Einstein (MSD) diffusivity: the same number from the written trajectories (every frame
    # stable: lags up to half of each replica's 20 frames, replicas weighted alike)
    folder = tmp_path / "trajectories"
    ids, masses = molecule_ids(start), masses_amu(start.atomic_numbers)
    per_replica = [molecular_diffusivity(mdtraj.load(str(folder / f"replica_{k:03d}.dcd"),
                                                     top=str(folder / "topology.pdb")).xyz * 10.0,
                                         start.box, 0.02, ids, masses, 10) for k in range(2)]
    assert metrics["diffusivity_cm2_per_s"] == pytest.approx(np.mean(per_replica) * A2_PER_PS_IN_CM2_PER_S, rel=1e-3)
    assert metrics["diffusivity_cm2_per_s"] > 0 and metrics["reference_diffusivity_cm2_per_s"] > 0
    assert metrics["diffusivity_relative_error"] == pytest.approx(
        metrics["diffusivity_cm2_per_s"] / metrics["reference_diffusivity_cm2_per_s"] - 1, rel=1e-9)
    # VACF: the reference trajectory's velocities (every 0.025 ps) are compared at their lags
    # (every 10th of the run's, 2.5 fs apart) but are too sparse for their own first minimum
    # or Green-Kubo integral
    v = np.load(tmp_path / "vacf.npz")
    assert metrics["vacf_interval_ps"] == pytest.approx(0.0025)
    n = min(len(v["model"][::10]), len(v["reference"]))
    assert n > 2 and metrics["vacf_mae"] == pytest.approx(np.abs(v["model"][::10][1:n] - v["reference"][1:n]).mean(),
                                                           rel=1e-9)
    # the first minimum of the all-atom VACF: half an O-H vibration (ToyWater: ~10 fs period)
    assert metrics["vacf_first_minimum_ps"] == pytest.approx(first_minimum(v["model"]) * 0.0025)
    assert 0 < metrics["vacf_first_minimum_ps"] < 0.02
    # Green-Kubo: the integral of the saved molecular VACF. (Whether it agrees with the MSD
    # slope is a question of statistics that 2 replicas x 0.4 ps cannot settle; the two
    # estimators are compared on an Ornstein-Uhlenbeck process in test_simulate.py.)
    assert metrics["vacf_diffusivity_cm2_per_s"] == pytest.approx(
        green_kubo_diffusivity(v["model_molecular"], 0.0025) * A2_PER_PS_IN_CM2_PER_S, rel=1e-9)
    assert "reference_vacf_first_minimum_ps" not in metrics and "reference_vacf_diffusivity_cm2_per_s" not in metrics
    assert (tmp_path / "vacf.csv").exists()


def test_compare_shows_water_columns(water, water_traj, tmp_path, capsys):
    """`compare` on periodic runs: one RDF-MAE column per pair, diffusivities and the VACF
    summary; no h(r) column (no run has one); RDF and VACF plots of every run."""
    start = toy_lattice_dataset()
    for label, threshold in (("a", TOY_THRESHOLD), ("b", TOY_THRESHOLD + 0.1)):
        config = SimulationConfig(n_replicas=2, time_ps=0.2, check_interval_ps=0.02, min_distance_threshold=threshold,
                                  engine=EngineConfig(temperature_K=300.0, platform="CPU"))
        simulate(ToyWater(), start, config, tmp_path / label, reference=water_traj, progress=False)
    assert main(["compare", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    header, row_a, row_b = printed.splitlines()[:3]
    for title in ("RDF MAE O-O", "RDF MAE O-H", "RDF MAE H-H", "RDF MAE mean", "D (cm^2/s)", "D ref (cm^2/s)",
                  "VACF MAE", "D Green-Kubo"):
        assert title in header, title
    assert "h(r) MAE" not in header and "force MAE" not in header
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    cells = row_a.split()
    assert cells[0] == "a" and f"{metrics['rdf_mae']['O-H']:.4g}" in cells
    assert f"{metrics['diffusivity_cm2_per_s']:.4g}" in cells and f"{metrics['vacf_mae']:.4g}" in cells
    assert (tmp_path / "cmp" / "comparison.txt").read_text().splitlines()[1] == row_a
    for name in ("survival.png", "rdf.png", "vacf.png"):
        assert (tmp_path / "cmp" / name).stat().st_size > 1000 and f"cmp/{name}" in printed
    assert not (tmp_path / "cmp" / "hr.png").exists()


def test_simulate_and_refine_cli_on_water(water_files, water_model_file, tmp_path):
    data, traj = map(str, water_files)
    # no --temperature: the 300 K that water.npz records, not the molecular default of 500 K
    code = main(["simulate", str(water_model_file), "--data", data, "--reference", traj, "--test-data", traj,
                 "--replicas", "2", "--time", "0.2", "--check-interval", "0.02", "--platform", "CPU",
                 "--min-distance-threshold", "1.1", "--out", str(tmp_path / "sim"), "--no-progress"])
    assert code == 0
    metrics = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert metrics["temperature_K"] == 300.0
    assert metrics["stability"] == "min_distance" and metrics["min_distance_threshold_A"] == 1.1
    assert metrics["reference_diffusivity_cm2_per_s"] > 0
    # the test-set force error: the model's forces on every frame of the trajectory file
    from openmm_stable.models import load_model

    model, test = load_model(water_model_file), load_dataset(traj)
    z, box = torch.as_tensor(test.atomic_numbers), torch.as_tensor(test.box, dtype=torch.float32)
    errors = [np.abs(energy_and_forces(model, z, torch.as_tensor(x, dtype=torch.float32), batch_index(1, test.n_atoms),
                                       box)[1]
                     .detach().double().numpy() - f) for x, f in zip(test.positions, test.forces)]
    assert metrics["force_mae_meV_per_A"] == pytest.approx(1000 * np.mean(errors), rel=1e-4)
    assert {"reference_O-O", "reference_O-H", "reference_H-H"} <= set(np.load(tmp_path / "sim" / "rdf.npz").files)

    (tmp_path / "refine.yaml").write_text(
        "n_replicas: 2\nepoch_ps: 0.1\nframe_interval_ps: 0.01\nequilibration_ps: 0.02\nmax_epochs: 2\n"
        "unstable_fraction: 0.01\nmin_distance_threshold: 5.0\nengine: {platform: CPU}\n")
    code = main(["refine", str(water_model_file), "--data", data, "--reference", traj, "--config",
                 str(tmp_path / "refine.yaml"), "--out", str(tmp_path / "ref"), "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert summary["stability"] == "MinimumDistanceCriterion"
    assert summary["observable"]["name"] == "rdf" and len(summary["observable"]["pairs"]) == 3
    # threshold 5 A: every replica is unstable in epoch 1, so epoch 2 takes one learning step
    assert summary["epochs"] == 2 and summary["learning_steps"] == 1
    assert np.isfinite(summary["last_observable_loss"]) and summary["last_observable_loss"] > 0
    assert (tmp_path / "ref" / "model.pt").exists()
    import yaml

    assert yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())["engine"]["temperature_K"] == 300.0


def test_default_temperature_from_the_dataset(water, capsys):
    """The sampling temperature the file records; else metadata (older files); else 500 K
    with a line saying so. An explicit --temperature is tested with the CLI."""
    from openmm_stable.temperature import dataset_temperature

    assert dataset_temperature(water) == 300.0
    old = QMDataset(water.atomic_numbers, water.positions[:2], box=water.box, metadata={"temperature_K": 310.0},
                    source="old.npz")
    assert dataset_temperature(old) == 310.0
    bare = QMDataset(water.atomic_numbers, water.positions[:2], box=water.box, source="bare.npz")
    assert dataset_temperature(bare) == 500.0
    err = capsys.readouterr().err
    assert "bare.npz records no sampling temperature; simulating at 500 K" in err


def test_estimator_sees_the_box(water, water_model_file, tmp_path):
    """Refinement gradients are the same for wrapped (split) and whole samples: the
    Boltzmann estimator evaluates the model with the box."""
    from openmm_stable.models import load_model

    config = StableConfig(n_replicas=2, epoch_ps=0.1, frame_interval_ps=0.01, equilibration_ps=0.02, lr=1e-12,
                          energy_force_weight=0.0, engine=EngineConfig(temperature_K=300.0, platform="CPU"))
    trainer = StableTrainer(load_model(water_model_file), water, config, tmp_path, progress=False)
    samples = np.stack([straddling(water.positions[k], water.box, k % N_WATERS) for k in range(12)])
    whole = trainer._learning_step(samples)
    split = trainer._learning_step(np.stack([wrapped(x, water.box) for x in samples]))
    assert whole["observable_grad_norm"] > 0
    assert split["observable_grad_norm"] == pytest.approx(whole["observable_grad_norm"], rel=1e-3)


def test_local_neighbourhood_learning_step(water, water_model_file, tmp_path):
    """local_neighbourhoods: every O and H environment of every frame is a sample (8 O + 8 O
    + 16 H centres per frame for O-O, O-H, H-H); the step sees the box (wrapping changes
    nothing) and needs the rdf observable and per-atom energies."""
    from openmm_stable.models import create_model, load_model

    config = StableConfig(n_replicas=2, epoch_ps=0.1, frame_interval_ps=0.01, equilibration_ps=0.02, lr=1e-12,
                          energy_force_weight=0.0, local_neighbourhoods=True, neighbourhood_radius=2.8,
                          engine=EngineConfig(temperature_K=300.0, platform="CPU"))
    trainer = StableTrainer(load_model(water_model_file), water, config, tmp_path, progress=False)
    samples = np.stack([straddling(water.positions[k], water.box, k % N_WATERS) for k in range(12)])
    whole = trainer._learning_step(samples)
    split = trainer._learning_step(np.stack([wrapped(x, water.box) for x in samples]))
    assert whole["n_samples"] == 12 and whole["n_local_samples"] == 12 * (8 + 8 + 16)
    assert whole["observable_grad_norm"] > 0
    assert split["observable_grad_norm"] == pytest.approx(whole["observable_grad_norm"], rel=1e-3)
    assert whole["observable_loss"] == pytest.approx(trainer.observable_loss_of(samples), rel=1e-9)
    with pytest.raises(ValueError, match="only for the rdf observable"):
        StableTrainer(load_model(water_model_file), water,
                      dataclasses.replace(config, observable={"name": "bond_lengths"}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="per-atom energies"):
        StableTrainer(create_model("graph-network", "tiny", cutoff=3.0), water, config, tmp_path, progress=False)


@pytest.mark.slow
def test_water_benchmark_quick(tmp_path, monkeypatch):
    """benchmarks/water.py --quick: every stage on 8 waters, a results table with both models."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "water.py"
    results = tmp_path / "results" / "water_quick"
    monkeypatch.setattr(sys, "argv", [str(script), "--quick", "--workdir", str(tmp_path / "work"),
                                      "--results", str(results), "--local-neighbourhoods"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    summary = json.loads(results.with_suffix(".json").read_text())
    assert set(summary["metrics"]) == {"pretrained", "refined"}
    results.with_suffix(".md").unlink()
    runpy.run_path(str(script))["main"](["--plot-only", str(results.with_suffix(".json"))])
    assert results.with_suffix(".md").exists()
    for metrics in summary["metrics"].values():
        assert metrics["stability"] == "min_nonbonded_distance" and metrics["reference_diffusivity_cm2_per_s"] > 0
        assert "vacf_interval_ps" in metrics  # (no VACF MAE when no replica stays stable for 4 velocity frames)
        assert metrics["force_mae_meV_per_A"] > 0
    assert summary["compute"]["refined"]["sim_steps"] > 0 and summary["settings"]["local_neighbourhoods"]
    assert "n_local_samples" in (tmp_path / "work" / "refine" / "log.csv").read_text().splitlines()[0]
    assert "| refined |" in results.with_suffix(".md").read_text()
    assert (results.parent / "water_quick_rdf.png").exists()

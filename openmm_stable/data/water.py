"""Periodic flexible water: reference data from a classical potential run in OpenMM.

The condensed-phase counterpart of `openmm_stable.data.generate` (which runs xTB on
molecules). No quantum chemistry and no download: the reference potential is **SPC/Fw**,
the flexible simple-point-charge water of Wu, Tepper and Voth (J. Chem. Phys. 124,
024503, 2006), built here from OpenMM's HarmonicBondForce, HarmonicAngleForce and a PME
NonbondedForce. OpenMM ships water force fields (``spce.xml``, ``tip3p.xml``, ...) whose
harmonic terms only exist so that ``rigidWater=False`` does something; they are not
parametrised flexible models, so we build the published flexible model ourselves.

One Langevin run at ``temperature`` (LangevinMiddleIntegrator, NVT, fixed box at the
given density) gives two files:

* ``out_path``: ``n_frames`` labelled frames, one every ``stride`` steps (the training
  data: positions, energies, forces, velocities, times, box);
* ``trajectory_path`` (optional): the run continued for ``trajectory_ps``, one frame every
  ``trajectory_interval_ps``, with the same fields: the long reference trajectory for
  RDFs, diffusivity and VACF, and a labelled test set.

Positions are OpenMM's, not wrapped into the box: every molecule stays whole and the
trajectory is continuous (``unwrap`` is a no-op on it). Units: A, eV, eV/A, ps, A/ps.
Atoms come as O, H, H per molecule (``metadata["atoms_per_molecule"] = 3``).

Usage::

    from openmm_stable.data.water import generate_water_dataset
    data, trajectory = generate_water_dataset("water.npz", n_molecules=64, n_frames=1000,
                                              trajectory_path="water_traj.npz", trajectory_ps=50)
"""
from __future__ import annotations

import datetime
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from openmm_stable.errors import InputError
from openmm_stable.data.dataset import QMDataset
from openmm_stable.data.formats import save_dataset
from openmm_stable.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM

KCAL_IN_KJ = 4.184
WATER_MASS_AMU = 15.9994 + 2 * 1.00794
AVOGADRO = 6.02214076e23
DEFAULT_DENSITY = 0.997  # g/cm^3, liquid water at 298-300 K
DEFAULT_TEMPERATURE = 300.0  # K
DEFAULT_FRICTION_PER_PS = 1.0  # the replica engine's default, so reference and model runs compare
DEFAULT_EQUILIBRATION_PS = 10.0
MAX_NONBONDED_CUTOFF = 9.0  # Angstrom; smaller boxes use just under half the box

# SPC/Fw (Wu, Tepper, Voth 2006). Harmonic terms are k/2 (x - x0)^2, as in OpenMM.
SPCFW = {
    "r_OH": 1.012,  # Angstrom
    "k_bond": 1059.162,  # kcal/mol/A^2
    "theta_HOH": 113.24,  # degrees
    "k_angle": 75.90,  # kcal/mol/rad^2
    "q_O": -0.82,
    "q_H": 0.41,
    "sigma_O": 3.165492,  # Angstrom
    "epsilon_O": 0.1554253,  # kcal/mol
}
REFERENCE_NAME = "SPC/Fw flexible water (Wu, Tepper, Voth 2006), PME, OpenMM"


def box_length(n_molecules: int, density: float = DEFAULT_DENSITY) -> float:
    """Edge (A) of the cubic box that holds `n_molecules` waters at `density` g/cm^3."""
    volume_cm3 = n_molecules * WATER_MASS_AMU / AVOGADRO / density
    return (volume_cm3 * 1e24) ** (1.0 / 3.0)


def nonbonded_cutoff(length: float) -> float:
    """Real-space cutoff (A): 9 A, or just under half the box for small boxes."""
    return min(MAX_NONBONDED_CUTOFF, 0.5 * length - 0.01)


def build_water_box(n_molecules: int, density: float = DEFAULT_DENSITY,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(atomic numbers (3M,), positions (3M, 3) A, box (3, 3) A): molecules at the SPC/Fw
    geometry on a cubic grid with random orientations (minimise before running MD)."""
    if n_molecules < 2:
        raise InputError("a water box needs at least 2 molecules")
    length = box_length(n_molecules, density)
    per_side = math.ceil(n_molecules ** (1.0 / 3.0) - 1e-9)
    spacing = length / per_side
    rng = np.random.default_rng(seed)
    cells = rng.permutation(per_side**3)[:n_molecules]
    half = math.radians(SPCFW["theta_HOH"]) / 2
    r = SPCFW["r_OH"]
    local = np.array([[0.0, 0.0, 0.0], [r * math.sin(half), 0.0, r * math.cos(half)],
                      [-r * math.sin(half), 0.0, r * math.cos(half)]])
    positions = []
    for cell in sorted(cells):
        centre = (np.array(np.unravel_index(cell, (per_side,) * 3)) + 0.5) * spacing
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))  # a random rotation (or reflection: same shape)
        positions.append(centre + local @ q.T)
    z = np.tile([8, 1, 1], n_molecules)
    return z, np.concatenate(positions), np.eye(3) * length


def spcfw_system(n_molecules: int, box_angstrom: np.ndarray, cutoff: Optional[float] = None,
                 ewald_tolerance: float = 5e-4):
    """An OpenMM System of `n_molecules` SPC/Fw waters (atoms O, H, H per molecule) in a
    periodic box: harmonic O-H bonds and H-O-H angle (minimum image, so molecules split
    across the faces are fine), Coulomb with PME, Lennard-Jones on O with the long-range
    dispersion correction; intramolecular nonbonded pairs excluded."""
    import openmm
    from openmm import app, unit

    p = SPCFW
    box = np.asarray(box_angstrom, dtype=float)
    widths = np.diag(box)
    cutoff = nonbonded_cutoff(float(widths.min())) if cutoff is None else float(cutoff)
    if cutoff >= 0.5 * widths.min():
        raise InputError(f"nonbonded cutoff {cutoff} A must be below half the box ({0.5 * widths.min():.3f} A)")
    system = openmm.System()
    system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) / NM_IN_ANGSTROM for row in box])
    bonds = openmm.HarmonicBondForce()
    angles = openmm.HarmonicAngleForce()
    nonbonded = openmm.NonbondedForce()
    nonbonded.setNonbondedMethod(openmm.NonbondedForce.PME)
    nonbonded.setCutoffDistance(cutoff / NM_IN_ANGSTROM)
    nonbonded.setEwaldErrorTolerance(ewald_tolerance)
    nonbonded.setUseDispersionCorrection(True)
    mass_o = app.element.oxygen.mass.value_in_unit(unit.dalton)
    mass_h = app.element.hydrogen.mass.value_in_unit(unit.dalton)
    k_bond = p["k_bond"] * KCAL_IN_KJ * 100.0  # kJ/mol/nm^2
    k_angle = p["k_angle"] * KCAL_IN_KJ  # kJ/mol/rad^2
    sigma_nm, epsilon_kj = p["sigma_O"] / NM_IN_ANGSTROM, p["epsilon_O"] * KCAL_IN_KJ
    for m in range(n_molecules):
        o = system.addParticle(mass_o)
        h1 = system.addParticle(mass_h)
        h2 = system.addParticle(mass_h)
        nonbonded.addParticle(p["q_O"], sigma_nm, epsilon_kj)
        nonbonded.addParticle(p["q_H"], 1.0, 0.0)
        nonbonded.addParticle(p["q_H"], 1.0, 0.0)
        for h in (h1, h2):
            bonds.addBond(o, h, p["r_OH"] / NM_IN_ANGSTROM, k_bond)
        angles.addAngle(h1, o, h2, math.radians(p["theta_HOH"]), k_angle)
        for i, j in ((o, h1), (o, h2), (h1, h2)):
            nonbonded.addException(i, j, 0.0, 1.0, 0.0)
    for force in (bonds, angles):  # minimum image also for bonded terms: frames may be wrapped atom by atom
        force.setUsesPeriodicBoundaryConditions(True)
    for force in (bonds, angles, nonbonded):
        system.addForce(force)
    return system


def _platform(name: Optional[str]):
    import openmm

    return openmm.Platform.getPlatformByName(name or "CPU")


def make_whole(positions: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Positions (..., 3M, 3) with each H moved to the periodic image nearest its O
    (molecules O, H, H), so no molecule is split across a face of the (orthorhombic) box."""
    x = np.array(positions, dtype=float)
    lengths = np.diag(np.asarray(box, dtype=float))
    oxygen = x[..., 0::3, :]
    for h in (1, 2):
        d = x[..., h::3, :] - oxygen
        x[..., h::3, :] = oxygen + d - lengths * np.round(d / lengths)
    return x


class WaterReference:
    """SPC/Fw energies (eV) and forces (eV/A) of a water box at given positions (A), which
    may be wrapped atom by atom: molecules are made whole first (`make_whole`), because
    OpenMM's PME exclusion correction for the intramolecular pairs uses the raw, not the
    minimum-image, distance (measured: a split molecule changes the energy by ~1000 kJ/mol).

    >>> ref = WaterReference(n_molecules=16, box_angstrom=box, platform="Reference")  # doctest: +SKIP
    >>> energy, forces = ref(positions)
    """

    def __init__(self, n_molecules: int, box_angstrom: np.ndarray, platform: Optional[str] = "Reference",
                 cutoff: Optional[float] = None):
        import openmm

        self.box = np.asarray(box_angstrom, dtype=float)
        self.system = spcfw_system(n_molecules, self.box, cutoff)
        self.context = openmm.Context(self.system, openmm.VerletIntegrator(1e-3), _platform(platform))

    def __call__(self, positions_angstrom: np.ndarray) -> tuple[float, np.ndarray]:
        self.context.setPositions(make_whole(positions_angstrom, self.box) / NM_IN_ANGSTROM)
        return _energy_forces(self.context)


def _energy_forces(context) -> tuple[float, np.ndarray]:
    from openmm import unit

    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / EV_IN_KJ_PER_MOL
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return energy, np.asarray(forces) / EV_IN_KJ_PER_MOL / NM_IN_ANGSTROM


def _frame(context, time_ps: float) -> dict:
    state = context.getState(getPositions=True, getVelocities=True)
    energy, forces = _energy_forces(context)
    return {"positions": state.getPositions(asNumpy=True)._value * NM_IN_ANGSTROM,
            "velocities": state.getVelocities(asNumpy=True)._value * NM_IN_ANGSTROM,
            "energy": energy, "forces": forces, "time": time_ps}


def generate_water_dataset(
    out_path: str | os.PathLike,
    n_molecules: int = 64,
    n_frames: int = 1000,
    stride: int = 20,
    temperature: float = DEFAULT_TEMPERATURE,
    timestep_fs: float = 0.5,
    density: float = DEFAULT_DENSITY,
    equilibration_ps: float = DEFAULT_EQUILIBRATION_PS,
    friction_per_ps: float = DEFAULT_FRICTION_PER_PS,
    trajectory_path: Optional[str | os.PathLike] = None,
    trajectory_ps: float = 0.0,
    trajectory_interval_ps: float = 0.05,
    seed: int = 0,
    platform: Optional[str] = None,
    progress: bool = True,
) -> tuple[QMDataset, Optional[QMDataset]]:
    """Run SPC/Fw water in OpenMM and write the labelled frames (and the long reference
    trajectory when `trajectory_path` and `trajectory_ps` > 0); see the module doc.

    Frame k of `out_path` is taken (k + 1) * stride steps after equilibration; the
    trajectory continues the same run. Returns (dataset, trajectory or None).
    """
    import openmm
    from tqdm.auto import tqdm

    if n_frames < 1 or stride < 1 or equilibration_ps < 0 or trajectory_ps < 0:
        raise InputError("n_frames and stride must be >= 1; equilibration_ps and trajectory_ps >= 0")
    if temperature <= 0 or timestep_fs <= 0 or friction_per_ps <= 0 or density <= 0 or trajectory_interval_ps <= 0:
        raise InputError("temperature, timestep, friction, density and trajectory interval must be positive")
    if trajectory_ps > 0 and trajectory_path is None:
        raise InputError("trajectory_ps > 0 needs a trajectory_path")
    z, positions, box = build_water_box(n_molecules, density, seed)
    system = spcfw_system(n_molecules, box)
    dt_ps = timestep_fs * 1e-3
    integrator = openmm.LangevinMiddleIntegrator(temperature, friction_per_ps, dt_ps)
    integrator.setRandomNumberSeed(int(seed) % 2**31 + 1)
    plat = _platform(platform)
    context = openmm.Context(system, integrator, plat)
    context.setPositions(positions / NM_IN_ANGSTROM)
    openmm.LocalEnergyMinimizer.minimize(context, 1.0, 1000)
    context.setVelocitiesToTemperature(temperature, int(seed) % 2**31 + 1)
    settings = {
        "generator": "openmm_stable.data.water.generate_water_dataset",
        "system": "water",
        "method": REFERENCE_NAME,
        "reference_parameters": dict(SPCFW),
        "nonbonded_cutoff_A": nonbonded_cutoff(float(box[0, 0])),
        "n_molecules": int(n_molecules),
        "atoms_per_molecule": 3,
        "density_g_per_cm3": float(density),
        "temperature_K": float(temperature),
        "timestep_fs": float(timestep_fs),
        "friction_per_ps": float(friction_per_ps),
        "thermostat": "openmm.LangevinMiddleIntegrator",
        "equilibration_ps": float(equilibration_ps),
        "seed": int(seed),
        "platform": plat.getName(),
        "versions": {"openmm": openmm.__version__},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_format": "generated",
        "original_units": {"energy": "kJ/mol", "length": "nm"},
    }
    interval_steps = max(1, round(trajectory_interval_ps / dt_ps))
    n_trajectory = int(round(trajectory_ps / (interval_steps * dt_ps))) if trajectory_path is not None else 0
    bar = tqdm(total=n_frames + n_trajectory, unit="frame", desc=f"SPC/Fw water x{n_molecules}",
               disable=not progress, dynamic_ncols=True)
    integrator.step(int(round(equilibration_ps / dt_ps)))
    t_start = time.perf_counter()
    frames, steps = [], 0
    for _ in range(n_frames):
        integrator.step(stride)
        steps += stride
        frames.append(_frame(context, steps * dt_ps))
        bar.update(1)
    wall = time.perf_counter() - t_start
    trajectory = []
    for _ in range(n_trajectory):
        integrator.step(interval_steps)
        steps += interval_steps
        trajectory.append(_frame(context, steps * dt_ps))
        bar.update(1)
    bar.close()
    total_wall = time.perf_counter() - t_start
    settings["timing"] = {"wall_seconds": total_wall, "frames_per_second": n_frames / wall if wall > 0 else None,
                          "steps_per_second": steps / total_wall if total_wall > 0 else None}
    dataset = _to_dataset(frames, z, box, dict(settings, stride=int(stride), kind="labelled frames"), str(out_path))
    save_dataset(dataset, out_path)
    traj = None
    if n_trajectory:
        traj = _to_dataset(trajectory, z, box, dict(settings, stride=int(interval_steps), kind="reference trajectory"),
                           str(trajectory_path))
        save_dataset(traj, trajectory_path)
    return dataset, traj


def _to_dataset(frames: list[dict], z: np.ndarray, box: np.ndarray, metadata: dict, source: str) -> QMDataset:
    return QMDataset(
        atomic_numbers=z,
        positions=np.stack([f["positions"] for f in frames]),
        energies=np.array([f["energy"] for f in frames]),
        forces=np.stack([f["forces"] for f in frames]),
        velocities=np.stack([f["velocities"] for f in frames]),
        times=np.array([f["time"] for f in frames]),
        box=box,
        temperature=metadata["temperature_K"],
        metadata=dict(metadata, complete=True),
        source=source,
    )

"""Production MD with a trained openmm-stable model: a plain OpenMM Simulation.

The model file (written by ``openmm-stable pretrain`` or ``refine``) becomes the System's
force through openmm-ml's plugin registry: ``MLPotential('openmm-stable', modelPath=...)``.
Everything else is ordinary OpenMM: minimise, Langevin dynamics, reporters.

    python examples/production_md.py model.ckpt --structure aspirin --temperature 300 \
        --steps 100000 --out md_aspirin/

``--structure`` is a PDB file, a built-in molecule name (aspirin, ethanol, ...), a SMILES
string, or any structure file ASE reads (.xyz, .extxyz, ...). The script writes
``start.pdb`` (topology for viewers), ``trajectory.dcd`` and ``state.csv`` to ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import openmm
from openmm import app, unit
from openmmml import MLPotential


def load_structure(spec: str):
    """(Topology, positions) from a PDB file, or from a molecule name / SMILES / ASE file."""
    if spec.lower().endswith(".pdb"):
        pdb = app.PDBFile(spec)
        return pdb.topology, pdb.positions
    from openmm_stable.data.molecules import build_molecule  # RDKit for names/SMILES, ASE for files
    from openmm_stable.export import topology_from_atomic_numbers

    atomic_numbers, positions_angstrom = build_molecule(spec)
    topology = topology_from_atomic_numbers(atomic_numbers)
    return topology, [openmm.Vec3(*xyz) for xyz in positions_angstrom] * unit.angstrom


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model file written by openmm-stable (pretrain/refine)")
    p.add_argument("--structure", required=True, help="PDB file, built-in molecule, SMILES or .xyz file")
    p.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    p.add_argument("--steps", type=int, default=10000, help="MD steps (default 10000)")
    p.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    p.add_argument("--friction", type=float, default=1.0, help="Langevin friction, 1/ps (default 1)")
    p.add_argument("--platform", default=None,
                   help="OpenMM platform: CUDA, OpenCL, CPU or Reference (default: the fastest one available)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="model precision")
    p.add_argument("--report-interval", type=int, default=100, help="steps between reports (default 100)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the Langevin noise and the initial velocities (default 1; a positive integer: "
                        "OpenMM takes 0 to mean a new random seed each run)")
    p.add_argument("--out", default="md", help="output folder (default ./md)")
    args = p.parse_args(argv)
    if args.seed < 1:
        p.error(f"--seed must be a positive integer (got {args.seed}); OpenMM would take 0 as 'pick one at random'")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    topology, positions = load_structure(args.structure)
    potential = MLPotential("openmm-stable", modelPath=args.model, dtype=args.dtype)
    system = potential.createSystem(topology)

    integrator = openmm.LangevinMiddleIntegrator(
        args.temperature * unit.kelvin, args.friction / unit.picosecond, args.timestep * unit.femtoseconds
    )
    integrator.setRandomNumberSeed(args.seed)
    platform = openmm.Platform.getPlatformByName(args.platform) if args.platform else None
    simulation = app.Simulation(topology, system, integrator, platform)
    simulation.context.setPositions(positions)

    name = simulation.context.getPlatform().getName()
    print(f"platform {name}, {topology.getNumAtoms()} atoms, model {args.model}")
    energy = simulation.context.getState(getEnergy=True).getPotentialEnergy()
    print(f"initial potential energy {energy}")
    simulation.minimizeEnergy()
    energy = simulation.context.getState(getEnergy=True).getPotentialEnergy()
    print(f"minimised potential energy {energy}")
    with open(out / "start.pdb", "w") as handle:
        app.PDBFile.writeFile(topology, simulation.context.getState(getPositions=True).getPositions(), handle)

    simulation.context.setVelocitiesToTemperature(args.temperature * unit.kelvin, args.seed)
    columns = dict(step=True, time=True, potentialEnergy=True, kineticEnergy=True, totalEnergy=True,
                   temperature=True, speed=True)
    simulation.reporters.append(app.StateDataReporter(sys.stdout, args.report_interval, **columns))
    simulation.reporters.append(app.StateDataReporter(str(out / "state.csv"), args.report_interval, **columns))
    simulation.reporters.append(app.DCDReporter(str(out / "trajectory.dcd"), args.report_interval))
    simulation.step(args.steps)
    print(f"wrote {out / 'start.pdb'}, {out / 'trajectory.dcd'}, {out / 'state.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

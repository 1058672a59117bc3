"""`openmm-stable export MODEL`: write a TorchScript file that openmm-torch's TorchForce loads.

    openmm-stable export model.ckpt --out model_openmm.pt
    openmm-stable export model.ckpt --molecule aspirin --replicas 8 --out aspirin_x8.pt
    openmm-stable export model.ckpt --atoms-from aspirin_xtb.npz --dtype float64 --out model64.pt
    openmm-stable export refined/model.pt --format mace --out refined.model   # a mace-architecture model

The default format is TorchScript for openmm-torch; `--format mace` writes a model of the
`mace` architecture (pre-trained here or imported with `openmm-stable import`) back as a MACE
`.model` file for mace's MACECalculator and openmm-ml's MLPotential('mace').

The file takes positions (nm) [and box vectors (nm)] and returns the energy (kJ/mol),
for R non-interacting copies of the molecule given one after the other. It needs the
atomic numbers: from the model file (every model file written by pretrain or refine stores
them), a dataset file or a molecule name/SMILES/structure file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from openmm_stable.errors import InputError
from openmm_stable.models import read_model_record

DTYPES = ("float32", "float64")
FORMATS = ("torchscript", "mace")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a model as a TorchScript file for openmm-torch (TorchForce)",
        description="Write MODEL (a file from pretrain/refine) as a TorchScript module for "
        "openmmtorch.TorchForce: positions (nm) -> energy (kJ/mol) of R non-interacting replicas.",
    )
    p.add_argument("model", help="model file written by openmm-stable (pretrain, refine or save_model)")
    p.add_argument("--format", choices=FORMATS, default="torchscript",
                   help="torchscript (default): a TorchForce file; mace: a MACE .model file (mace models only)")
    p.add_argument("--out", default=None,
                   help="output file (default: MODEL's name with suffix _openmm.pt, or .model with --format mace)")
    p.add_argument("--replicas", type=int, default=1, help="copies of the molecule in one force (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="precision the network runs in (default float32; float64 for energy-conservation checks; "
                        "--format mace: float64, as mace writes its files)")
    atoms = p.add_mutually_exclusive_group()
    atoms.add_argument("--atoms-from", metavar="DATAFILE", default=None,
                       help="take the atomic numbers from this dataset file (any supported format)")
    atoms.add_argument("--molecule", metavar="NAME", default=None,
                       help="take the atomic numbers from a built-in molecule, SMILES or structure file")
    p.add_argument("--force", action="store_true",
                   help="export even when --atoms-from/--molecule is another molecule than the model was trained on "
                        "(the force is then outside its training data)")
    p.set_defaults(func=run)


def resolve_atoms(args) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]:
    """(atomic numbers, positions in Angstrom or None, bonds or None, where they came from)."""
    from openmm_stable.geometry import find_bonds

    if args.atoms_from:
        from openmm_stable.data import load_dataset

        ds = load_dataset(args.atoms_from)
        bonds = find_bonds(ds.atomic_numbers, ds.positions[0], box=ds.box)
        return ds.atomic_numbers, ds.positions[0], bonds, f"dataset {args.atoms_from}"
    if args.molecule:
        from openmm_stable.data.molecules import build_molecule

        z, positions = build_molecule(args.molecule)
        return z, positions, find_bonds(z, positions), f"molecule {args.molecule}"
    z = read_model_record(args.model).atomic_numbers
    if z is None:
        raise InputError(f"{args.model} stores no atomic numbers; give --atoms-from DATAFILE or --molecule NAME")
    return z, None, None, "the model file"


def check_same_molecule(args, record, z, bonds, source: str) -> None:
    """Refuse (before any export) a force for another molecule than the model was trained
    on, unless --force; with --force, say so."""
    from openmm_stable.data.dataset import molecule_difference
    from openmm_stable.export import record_bonds

    if source == "the model file" or record.atomic_numbers is None:
        return
    difference = molecule_difference(record.atomic_numbers, z, record_bonds(record), bonds)
    if difference is None:
        return
    what = f"{source} is another molecule than {args.model} was trained on ({difference}; trained vs {source})"
    if not args.force:
        raise InputError(f"{what}: the force would be used outside its training data; give --force to export it anyway")
    print(f"warning: {what}; exporting for {source} because of --force", file=sys.stderr)


def run(args) -> int:
    import torch

    from openmm_stable.data.dataset import hill_formula
    from openmm_stable.export import export_model, extension_imports_of, load_exported
    from openmm_stable.models import model_from_record

    if args.replicas < 1:
        raise InputError(f"--replicas must be at least 1 (got {args.replicas})")
    record = read_model_record(args.model)  # FileNotFoundError / InputError: clean messages
    if args.format == "mace":
        return run_mace(args, record)
    args.dtype = args.dtype or "float32"
    model = model_from_record(record)
    z, positions, bonds, source = resolve_atoms(args)
    check_same_molecule(args, record, z, bonds, source)
    out = Path(args.out) if args.out else Path(args.model).with_name(Path(args.model).stem + "_openmm.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    export_model(model, out, z.tolist(), n_replicas=args.replicas, dtype=dtype)

    spec = model.spec
    arch = spec.get("architecture", "?")
    n = len(z)
    replicas = f"{args.replicas} replica{'s' if args.replicas > 1 else ''}"
    print(f"wrote {out}: {arch} ({spec.get('preset', '?')}), {hill_formula(z)}, {n} atoms x {replicas} "
          f"= {n * args.replicas} particles, {args.dtype}; atomic numbers from {source}")
    if positions is not None:
        module = load_exported(out)
        pos_nm = torch.as_tensor(np.tile(positions, (args.replicas, 1)) / 10.0, dtype=torch.float64)
        with torch.no_grad():
            energy = float(module(pos_nm)) / args.replicas
        print(f"check: energy of the first structure of {source}: {energy:.6f} kJ/mol per replica")
    print("Positions in nm -> energy in kJ/mol; replica k holds particles "
          f"{n}*k .. {n}*k+{n - 1}, with the atoms in the order above. Load it in OpenMM with:")
    print("    import torch                      # before openmmtorch (it preloads CUDA libraries)")
    for module in extension_imports_of(arch):  # the family's own list (registry)
        print(f"    import {module:<28}  # registers the custom ops this file calls")
    print("    from openmmtorch import TorchForce")
    print(f"    force = TorchForce({str(out)!r})")
    print("    force.setUsesPeriodicBoundaryConditions(True)   # only for a periodic box")
    print("    system.addForce(force)")
    print(f"or, for a System from a Topology: MLPotential('openmm-stable', modelPath={str(args.model)!r})"
          ".createSystem(topology)")
    return 0


def run_mace(args, record) -> int:
    """`--format mace`: the model back out as a MACE `.model` file."""
    import torch

    if record.architecture != "mace":
        raise InputError(f"--format mace: {args.model} is a {record.architecture!r} model; only models of the mace "
                         "architecture can be written as MACE .model files")
    if args.replicas != 1 or args.atoms_from or args.molecule:
        raise InputError("--format mace writes the model itself (MACE handles any molecule of its elements): "
                         "--replicas, --atoms-from and --molecule do not apply")
    from openmm_stable.models.mace import export_mace_model

    out = Path(args.out) if args.out else Path(args.model).with_suffix(".model")
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype or "float64")
    export_mace_model(args.model, out, dtype=dtype)
    print(f"wrote {out}: a MACE .model ({args.dtype or 'float64'}) of {args.model}. It is a pickle (as every MACE "
          "model file): open it only where you trust it. Load it with:")
    print(f"    from mace.calculators import MACECalculator; MACECalculator(model_paths={str(out)!r}, device='cpu')")
    print(f"    MLPotential('mace', modelPath={str(out)!r}).createSystem(topology)   # openmm-ml")
    return 0

"""`openmm-stable import FILE`: a model trained elsewhere, written as our model file.

    openmm-stable import epoch=99.ckpt --out model.pt --data frames.npz      # torchmd-train
    openmm-stable import mine.model --out model.pt --allow-pickle --data frames.npz   # MACE

The output is a file like the ones `pretrain` writes (weights + the hyper-parameters that
rebuild the network, opened without pickle), so `simulate`, `refine`, `export` and
`openmm_stable.ase.Calculator` take it. MACE ``.model`` files, and checkpoints that hold
Python objects, are pickles, which run code when opened: they need --allow-pickle.
``--data`` records the molecule (atomic numbers, bonds), the dataset fingerprint and the
sampling temperature, as `pretrain` does, and checks the imported forces on a few frames.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from openmm_stable.errors import InputError

# Suffix -> the importer that reads it (--format overrides).
KINDS = {".ckpt": "torchmd-net", ".model": "mace"}
CHECK_FRAMES = 8  # frames of --data on which the imported forces are compared


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import",
        help="write a model trained elsewhere (torchmd-train .ckpt, MACE .model) as an openmm-stable model file",
        description="Read FILE (a torchmd-train checkpoint .ckpt or a MACE .model) and write it as an openmm-stable "
        "model file that simulate, refine, export and the ASE calculator take, and that opens without pickle.",
    )
    p.add_argument("file", help="the trained model: .ckpt (torchmd-train) or .model (MACE)")
    p.add_argument("--out", default=None, help="output model file (default: FILE with suffix .pt)")
    p.add_argument("--format", choices=sorted(set(KINDS.values())), default=None,
                   help="what FILE is (default: from its suffix: .ckpt torchmd-net, .model mace)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="open FILE with Python's pickle when it needs it (MACE .model files always do): this runs "
                        "code from the file, so only for files you trust")
    p.add_argument("--data", metavar="DATAFILE", default=None,
                   help="the dataset the model is for: records its molecule, fingerprint and temperature, and checks "
                        "the imported forces on its first frames")
    p.add_argument("--energy-unit", default="eV",
                   help="torchmd-net: energy unit of the training data (eV, kcal/mol, kJ/mol, meV, Hartree; "
                        "default eV); lengths are Angstrom")
    p.add_argument("--total-energy", action="store_true",
                   help="torchmd-net: a model trained with --remove-ref-energy predicts total energies "
                        "(its reference energies added back)")
    p.set_defaults(func=run)


def file_kind(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        known = ", ".join(f"{suffix} ({name})" for suffix, name in KINDS.items())
        raise InputError(f"{path}: cannot tell what kind of model this is from its suffix; known: {known}; "
                         "or give --format")
    return kind


def import_file(path: Path, kind: str, allow_pickle: bool, energy_unit: str = "eV", total_energy: bool = False):
    """The `NNIP` of a foreign model file (importers are imported lazily: mace's import
    changes torch.load's defaults for the whole process)."""
    if kind == "torchmd-net":
        from openmm_stable.models.foreign import import_torchmdnet_checkpoint

        return import_torchmdnet_checkpoint(path, allow_pickle=allow_pickle, energy_unit=energy_unit,
                                            total_energy=total_energy)
    if kind == "mace":
        if energy_unit != "eV" or total_energy:
            raise InputError("--energy-unit and --total-energy are for torchmd-net checkpoints; MACE files record "
                             "their units (eV, Angstrom) and E0s")
        try:
            from openmm_stable.models.mace import import_mace_model
        except ImportError as err:
            raise InputError(f"importing a MACE model needs mace-torch ({err}); install the mace extra: "
                             "pip install 'openmm-stable[mace]'") from None
        return import_mace_model(path, allow_pickle=allow_pickle)
    raise InputError(f"unknown model kind {kind!r}")


def check_forces(model, dataset) -> str:
    """One line on the imported model's forces on the first frames of `dataset`."""
    import torch

    from openmm_stable.models.base import batch_index, energy_and_forces

    frames = dataset.positions[:CHECK_FRAMES]
    k, n = frames.shape[:2]
    z = torch.as_tensor(np.tile(dataset.atomic_numbers, k))
    pos = torch.as_tensor(frames.reshape(-1, 3), dtype=torch.float64)
    dtype = next(iter(model.parameters())).dtype
    box = None if dataset.box is None else torch.as_tensor(dataset.box, dtype=dtype)
    energies, forces = energy_and_forces(model, z, pos.to(dtype), batch_index(k, n), box)
    forces = forces.detach().to(torch.float64).numpy().reshape(k, n, 3)
    if not np.isfinite(forces).all():
        raise InputError(f"the imported model gives non-finite forces on {dataset.source}: wrong units or molecule?")
    mean = float(energies.detach().mean())
    line = f"check on {k} frame{'s' if k > 1 else ''} of {dataset.source}: mean energy {mean:.6f} eV"
    if dataset.forces is not None:
        mae = float(np.abs(forces - dataset.forces[:k]).mean())
        line += f", force MAE {1000 * mae:.1f} meV/A against the file's forces"
    return line


def run(args) -> int:
    from openmm_stable.data.dataset import hill_formula
    from openmm_stable.models import save_model

    path = Path(args.file)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    kind = file_kind(path, args.format)
    out = Path(args.out) if args.out else path.with_suffix(".pt")
    if out.resolve() == path.resolve():
        raise InputError(f"--out {out} would overwrite the file being imported")
    record: dict = {"imported_from": {"file": path.name, "kind": kind}}
    dataset = None
    if args.data:  # read (and validated) before the import
        from openmm_stable.data import load_dataset
        from openmm_stable.geometry import find_bonds
        from openmm_stable.temperature import recorded_temperature

        dataset = load_dataset(args.data)
        record.update(atomic_numbers=dataset.atomic_numbers, dataset_fingerprint=dataset.fingerprint(),
                      dataset_source=str(dataset.source),
                      bonds=find_bonds(dataset.atomic_numbers, dataset.positions[0], box=dataset.box),
                      training_temperature_K=recorded_temperature(dataset))
    model = import_file(path, kind, args.allow_pickle, args.energy_unit, args.total_energy)
    check = check_forces(model, dataset) if dataset is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out, kind="model", **record)

    spec = model.spec
    molecule = (f"molecule {hill_formula(dataset.atomic_numbers)} ({dataset.n_atoms} atoms) from {args.data}"
                if dataset is not None else "no molecule recorded (give --data, or --molecule/--atoms-from to export)")
    print(f"wrote {out}: {spec.get('architecture')} model imported from {path.name}, "
          f"cutoff {spec.get('hparams', {}).get('cutoff', '?')} A; {molecule}")
    if check:
        print(check)
    print(f"use it like a pretrained model: openmm-stable simulate/refine/export {out}, "
          f"or openmm_stable.ase.Calculator({str(out)!r})")
    return 0

"""`openmm-stable data ...`: inspect, generate and split datasets.

    openmm-stable data info aspirin.npz
    openmm-stable data generate --molecule aspirin --frames 1000 --stride 10 --out aspirin_xtb.npz
    openmm-stable data generate --system water --molecules 64 --frames 1000 --stride 20 --out water.npz
    openmm-stable data split aspirin_xtb.npz --train 1k --val 100 --test 200 --out-prefix aspirin

Every file-reading command reports bad input as a one-line error (exit code 2) naming
the file and the field, via the `DatasetError` raised by the loaders.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from openmm_stable.data import FORMATS, QMDataset, load_dataset, save_dataset, split_dataset
from openmm_stable.data.dataset import hill_formula


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect, generate and split QM datasets")
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])
    commands = parser.add_subparsers(dest="data_command", metavar="ACTION")

    info = commands.add_parser("info", help="summarise a dataset file (frames, atoms, units, energies, forces)")
    info.add_argument("file")
    _add_load_options(info)
    info.set_defaults(func=cmd_info)

    gen = commands.add_parser(
        "generate",
        help="make a reference dataset by Langevin MD: GFN2-xTB molecules or a periodic water box (no download needed)",
        description="--molecule: Langevin MD with tblite (GFN2-xTB) through ASE; every STRIDE-th step is recorded. "
        "Frames are appended to OUT.partial.extxyz as they are made; --resume continues an interrupted run. "
        "--system water: a periodic box of flexible SPC/Fw water run in OpenMM (PME): labelled frames in OUT "
        "and a long reference trajectory (RDFs, diffusivity) in OUT_traj.npz.",
    )
    # What to simulate: exactly one source.
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--molecule", help="built-in name (aspirin, ethanol, Ac-Ala3-NHMe, ...), SMILES, or structure file")
    what.add_argument("--system", choices=["water"], help="periodic system: 'water' (SPC/Fw in OpenMM)")
    gen.add_argument("--frames", type=int, required=True, help="number of frames to record")
    gen.add_argument("--stride", type=int, default=10, help="MD steps between recorded frames (default 10)")
    gen.add_argument("--temperature", type=float, default=None, help="K (default 500; water 300)")
    gen.add_argument("--timestep", type=float, default=0.5, help="fs (default 0.5)")
    gen.add_argument("--equilibration-steps", type=int, default=None,
                     help="steps before recording (default 1000; water 10 ps)")
    gen.add_argument("--friction", type=float, default=None,
                     help="Langevin friction in 1/ps, as for simulate and refine (default 10; water 1)")
    gen.add_argument("--method", default="GFN2-xTB", help="tblite method (GFN2-xTB, GFN1-xTB, IPEA1-xTB)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", required=True, help="output file (project format, .npz)")
    gen.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.partial.extxyz")
    gen.add_argument("--workers", type=int, default=1,
                     help="--molecule: run N independent xTB chains (different seeds) on N Ray workers and write "
                          "them as one file, chain after chain (default 1; needs the 'distributed' extra)")
    gen.add_argument("--ray-address", default=None, metavar="ADDRESS",
                     help="with --workers: join the Ray cluster at ADDRESS instead of starting one here")
    water = gen.add_argument_group("periodic water (--system water)")
    water.add_argument("--molecules", type=int, default=64, help="water molecules in the box (default 64)")
    water.add_argument("--density", type=float, default=None, help="g/cm^3 (default 0.997)")
    water.add_argument("--trajectory-ps", type=float, default=50.0,
                       help="length of the reference trajectory written to --trajectory-out (default 50 ps; 0: none)")
    water.add_argument("--trajectory-interval", type=float, default=0.05, help="ps between trajectory frames (default 0.05)")
    water.add_argument("--trajectory-out", default=None, help="reference trajectory file (default: OUT with _traj before .npz)")
    water.add_argument("--platform", default=None, help="OpenMM platform for the reference (default CPU)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    split = commands.add_parser("split", help="write train/val/test files (random or contiguous in time)")
    split.add_argument("file")
    _add_load_options(split)
    split.add_argument("--train", required=True, help="size: 1k, 200, 0.8 (fraction) or 80%%")
    split.add_argument("--val", required=True, help="size, as --train")
    split.add_argument("--test", default=None, help="size, as --train (default: all remaining frames)")
    split.add_argument("--mode", choices=["random", "contiguous"], default="random")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--out-prefix", required=True, help="writes PREFIX_train.npz, PREFIX_val.npz, PREFIX_test.npz")
    split.set_defaults(func=cmd_split)


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default=None, help=f"file format ({', '.join(FORMATS)}, or an ASE format); default: detect")
    parser.add_argument("--energy-unit", default=None, help="override the energy unit the format implies (eV, kcal/mol, ...)")
    parser.add_argument("--length-unit", default=None, help="override the length unit the format implies (Angstrom, nm, Bohr)")


def _load(args) -> QMDataset:
    return load_dataset(args.file, format=args.format, energy_unit=args.energy_unit, length_unit=args.length_unit)


# --- info ------------------------------------------------------------------------------------
def describe(ds: QMDataset) -> list[str]:
    """Human-readable summary lines, in internal units."""
    lines = [
        f"source      {ds.source}",
        f"format      {ds.metadata.get('source_format', 'unknown')}",
        f"frames      {len(ds)}",
        f"atoms       {ds.n_atoms}  formula {hill_formula(ds.atomic_numbers)}",
    ]
    original = ds.metadata.get("original_units")
    units = "eV, Angstrom, eV/Angstrom, ps, Angstrom/ps (internal)"
    if isinstance(original, dict):  # metadata is free-form JSON: describe what is there, never fail on it
        units += f"; file units: energy {original.get('energy')}, length {original.get('length')}"
    lines.append(f"units       {units}")
    if ds.energies is not None:
        e = ds.energies
        lines.append(
            f"energy      min {e.min():.6f}  max {e.max():.6f}  range {e.max() - e.min():.6f}  "
            f"mean {e.mean():.6f}  std {e.std():.6f} eV"
        )
    else:
        lines.append("energy      none")
    if ds.forces is not None:
        norms = np.linalg.norm(ds.forces, axis=-1)
        rms = np.sqrt(np.mean(ds.forces**2))
        lines.append(f"forces      mean |F| {norms.mean():.4f}  max |F| {norms.max():.4f}  RMS component {rms:.4f} eV/A")
    else:
        lines.append("forces      none")
    if ds.box is not None:
        lengths = np.linalg.norm(ds.box, axis=1)
        lines.append(f"box         periodic, vector lengths {' x '.join(f'{x:.4f}' for x in lengths)} A, volume {abs(np.linalg.det(ds.box)):.3f} A^3")
    else:
        lines.append("box         none (not periodic)")
    if ds.times is not None:
        dt = np.diff(ds.times)
        spacing = f", spacing {np.median(dt):.6g} ps" if dt.size else ""
        lines.append(f"times       {ds.times[0]:.6g} .. {ds.times[-1]:.6g} ps{spacing}")
    else:
        lines.append("times       none")
    lines.append(f"velocities  {'yes' if ds.velocities is not None else 'none'}")
    lines.append(f"temperature {'%g K' % ds.temperature if ds.temperature is not None else 'unknown'}")
    for key in ("method", "complete", "split"):
        if key in ds.metadata:
            lines.append(f"{key:<11} {ds.metadata[key]}")
    if "molecule" in ds.metadata:
        molecule = ds.metadata["molecule"]
        lines.append(f"molecule    {molecule.get('spec') if isinstance(molecule, dict) else molecule}")
    chains = ds.metadata.get("chains")
    if isinstance(chains, list) and all(isinstance(c, dict) for c in chains):
        lines.append(f"chains      {len(chains)} independent, one after another (frames per chain "
                     f"{', '.join(str(c.get('frames', '?')) for c in chains)}; "
                     f"seeds {', '.join(str(c.get('seed', '?')) for c in chains)})")
    if "system" in ds.metadata:
        lines.append(f"system      {ds.metadata['system']}, {ds.metadata.get('n_molecules', '?')} molecules"
                     f" ({ds.metadata.get('kind', 'frames')})")
    lines.append(f"fingerprint {ds.fingerprint()}")
    return lines


def cmd_info(args) -> int:
    print("\n".join(describe(_load(args))))
    return 0


# --- generate -----------------------------------------------------------------------------
def trajectory_path_for(out) -> str:
    """water.npz -> water_traj.npz: where `data generate --system water` puts the reference trajectory."""
    from pathlib import Path

    out = Path(out)
    return str(out.with_name(f"{out.stem}_traj{out.suffix or '.npz'}"))


def cmd_generate_water(args) -> int:
    from openmm_stable.data import water

    if args.resume:
        print("openmm-stable data generate: error: --resume is for --molecule runs; a water run is fast, rerun it",
              file=sys.stderr)
        return 2
    dt_ps = args.timestep * 1e-3
    trajectory = (args.trajectory_out or trajectory_path_for(args.out)) if args.trajectory_ps > 0 else None
    ds, traj = water.generate_water_dataset(
        args.out,
        n_molecules=args.molecules,
        n_frames=args.frames,
        stride=args.stride,
        temperature=water.DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
        timestep_fs=args.timestep,
        density=water.DEFAULT_DENSITY if args.density is None else args.density,
        equilibration_ps=(water.DEFAULT_EQUILIBRATION_PS if args.equilibration_steps is None
                          else args.equilibration_steps * dt_ps),
        friction_per_ps=water.DEFAULT_FRICTION_PER_PS if args.friction is None else args.friction,
        trajectory_path=trajectory,
        trajectory_ps=args.trajectory_ps,
        trajectory_interval_ps=args.trajectory_interval,
        seed=args.seed,
        platform=args.platform,
        progress=not args.no_progress,
    )
    timing = ds.metadata["timing"]
    print(f"wrote {len(ds)} frames of {args.molecules} SPC/Fw waters (box {ds.box[0, 0]:.3f} A) to {args.out} "
          f"({timing['frames_per_second']:.1f} frames/s, {timing['steps_per_second']:.0f} MD steps/s)")
    if traj is not None:
        print(f"wrote the {args.trajectory_ps:g} ps reference trajectory ({len(traj)} frames) to {trajectory}")
    return 0


def cmd_generate(args) -> int:
    from openmm_stable.data import generate

    if args.system == "water":
        if args.workers != 1 or args.ray_address:
            print("openmm-stable data generate: error: --workers/--ray-address are for --molecule runs",
                  file=sys.stderr)
            return 2
        return cmd_generate_water(args)
    if args.workers > 1 or args.ray_address:
        from openmm_stable.distributed.generate import generate_xtb_chains

        def run(**kwargs):
            return generate_xtb_chains(workers=args.workers, ray_address=args.ray_address, **kwargs)
    else:
        run = generate.generate_xtb_dataset
    try:
        ds = run(
            molecule=args.molecule,
            out_path=args.out,
            n_frames=args.frames,
            temperature=500.0 if args.temperature is None else args.temperature,
            timestep_fs=args.timestep,
            stride=args.stride,
            equilibration_steps=(
                generate.DEFAULT_EQUILIBRATION_STEPS if args.equilibration_steps is None else args.equilibration_steps
            ),
            seed=args.seed,
            method=args.method,
            friction_per_ps=generate.DEFAULT_FRICTION_PER_PS if args.friction is None else args.friction,
            progress=not args.no_progress,
            resume=args.resume,
        )
    except KeyboardInterrupt:
        where = (f"{args.out} and {generate.partial_paths(args.out)[0]}" if args.workers <= 1
                 else f"the chain files next to {args.out} (*.chainC-of-{args.workers}.*)")
        print(f"\ninterrupted: frames so far are in {where}; rerun the same command with --resume to continue",
              file=sys.stderr)
        return 130
    rate = ds.metadata.get("timing", {}).get("frames_per_second")
    chains = f" from {len(ds.metadata['chains'])} chains" if "chains" in ds.metadata else ""
    print(f"wrote {len(ds)} frames{chains} to {args.out}" + (f" ({rate:.1f} frames/s)" if rate else ""))
    return 0


# --- split --------------------------------------------------------------------------------
def cmd_split(args) -> int:
    ds = _load(args)
    parts = split_dataset(ds, args.train, args.val, args.test, mode=args.mode, seed=args.seed)
    for name, part in zip(parts._fields, parts):
        if part is None:
            print(f"{name:<5} 0 frames (no file written)")
            continue
        path = save_dataset(part, f"{args.out_prefix}_{name}.npz")
        print(f"{name:<5} {len(part)} frames -> {path}")
    return 0

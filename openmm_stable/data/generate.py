"""Offline QM reference data: Langevin MD with GFN2-xTB (tblite) through ASE.

MD17/MD22 cannot be downloaded on machines without internet, so this makes a dataset of
the same kind (a thermal MD trajectory with energies and forces) from a built-in molecule,
a SMILES string or a structure file, at about the cost of the xTB calls.

Files. While running, each recorded frame is appended (and flushed) to
``<out>.partial.extxyz``, with the run settings in ``<out>.partial.json``; so a crash or
Ctrl-C loses at most the frame in progress, and ``load_dataset`` reads the partial file
as it is. Each frame carries a digest of its atom lines, so a frame cut short by a kill or
a full disk is recognised, and a resume cuts it off (`drop_torn_frame`) and makes it again.
The Langevin friction is in 1/ps, as everywhere in the package. When the run finishes, the frames are written to ``out_path`` in the project's
own format and the partial files are removed. After an interruption (KeyboardInterrupt or
an error) the frames so far are also written to ``out_path``, marked
``metadata["complete"] = False``, and ``resume=True`` continues the run from the last
frame (positions and velocities) until ``n_frames`` exist. A resumed run is a valid
Langevin trajectory but not bit-identical to an uninterrupted run with the same seed
(the partial file stores 8 decimals, and the noise stream restarts).

Usage::

    from openmm_stable.data.generate import generate_xtb_dataset
    ds = generate_xtb_dataset("aspirin", "aspirin_xtb.npz", n_frames=1000, temperature=500.0)
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import sys
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from openmm_stable.errors import InputError
from openmm_stable.io import atomic_write_text
from openmm_stable.data.dataset import QMDataset
from openmm_stable.data.formats import load_dataset, save_dataset
from openmm_stable.data.molecules import build_molecule, resolve_molecule

DEFAULT_FRICTION_PER_PS = 10.0  # 100 fs relaxation: thermalises quickly, perturbs dynamics little
DEFAULT_EQUILIBRATION_STEPS = 1000  # 0.5 ps at 0.5 fs, i.e. five friction times

# Settings that must agree between a partial file and a resumed run.
_RESUME_KEYS = ("molecule", "method", "temperature_K", "timestep_fs", "stride", "seed", "friction_per_ps", "atomic_numbers")
FS_PER_PS = 1000.0  # runs before the friction was given in 1/ps recorded friction_per_fs


def partial_paths(out_path: str | os.PathLike) -> tuple[Path, Path]:
    """(frames file, settings file) that a run writes next to ``out_path`` while it goes."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".partial.extxyz"), out_path.with_name(out_path.name + ".partial.json")


def _package_version(name: str) -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def make_xtb_calculator(method: str = "GFN2-xTB", **kwargs):
    """A quiet tblite ASE calculator; one place so generation and checks use the same settings."""
    from tblite.ase import TBLite

    return TBLite(method=method, verbosity=0, **kwargs)


def generate_xtb_dataset(
    molecule: str,
    out_path: str | os.PathLike,
    n_frames: int,
    temperature: float = 500.0,
    timestep_fs: float = 0.5,
    stride: int = 10,
    equilibration_steps: int = DEFAULT_EQUILIBRATION_STEPS,
    seed: int = 0,
    method: str = "GFN2-xTB",
    friction_per_ps: float = DEFAULT_FRICTION_PER_PS,
    progress: bool = True,
    resume: bool = False,
    on_frame: Optional[Callable[[int, dict], None]] = None,
) -> QMDataset:
    """Run Langevin MD with xTB and record every `stride`-th step; return and save the dataset.

    Frame k (0-based) is taken ``(k+1) * stride`` steps after equilibration, at time
    ``(k+1) * stride * timestep_fs / 1000`` ps. Energies are eV, forces eV/A, velocities
    A/ps. ``on_frame(k, frame)`` is called after frame k is recorded, with a dict of its
    positions, energy, forces, velocities and time (for monitoring; raising from it stops
    the run like Ctrl-C does). See the module docstring for the
    partial files and ``resume``.

    Long on purpose: the ASE imports, the MD loop and the ``finally`` that saves whatever
    frames were done (on Ctrl-C too) belong to one try/finally; the settings, the resume
    check and the saving are helpers.
    """
    import ase
    import ase.units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation

    try:  # ASE >= 3.29; the older name is deprecated there
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
    from tqdm.auto import tqdm

    if n_frames < 1 or stride < 1 or equilibration_steps < 0:
        raise InputError("n_frames and stride must be >= 1 and equilibration_steps >= 0")
    if temperature <= 0 or timestep_fs <= 0 or friction_per_ps <= 0:
        raise InputError("temperature, timestep and friction must be positive")
    out_path = Path(out_path)
    frames_path, settings_path = partial_paths(out_path)
    molecule_info = resolve_molecule(molecule)
    z, positions0 = build_molecule(molecule)
    settings = _run_settings(molecule_info, method, temperature, timestep_fs, stride, equilibration_steps, seed,
                             friction_per_ps, z)
    done = _frames_to_resume(frames_path, settings_path, out_path, settings, resume)

    atoms = ase.Atoms(numbers=z, positions=positions0)
    # Remove centre-of-mass drift with a constraint (ASE's recommended replacement for
    # Langevin's fixcm, which biases the ensemble of small molecules).
    atoms.set_constraint(FixCom())
    atoms.calc = make_xtb_calculator(method)
    n_done = len(done)
    if n_done:
        atoms.set_positions(done[-1]["positions"])
        atoms.set_velocities(done[-1]["velocities"] / (1000.0 * ase.units.fs))
        rng = np.random.default_rng([seed, n_done])  # a fresh, reproducible stream for the continuation
    else:
        rng = np.random.default_rng(seed)
        thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
        Stationary(atoms)
        ZeroRotation(atoms)
        settings_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(settings_path, json.dumps(settings, indent=1))
        frames_path.write_text("")
    dyn = Langevin(
        atoms,
        timestep=timestep_fs * ase.units.fs,
        temperature_K=temperature,
        friction=friction_per_ps / (FS_PER_PS * ase.units.fs),  # ASE: 1 / (ASE time unit)
        fixcm=False,
        rng=rng,
    )
    velocity_to_A_per_ps = 1000.0 * ase.units.fs
    t_start = time.perf_counter()
    complete = False
    bar = tqdm(total=n_frames, initial=n_done, unit="frame", desc=f"xTB MD {molecule_info.get('name', molecule)}",
               disable=not progress, dynamic_ncols=True)
    try:
        if not n_done and equilibration_steps:
            bar.set_postfix_str("equilibrating")
            dyn.run(equilibration_steps)
            bar.set_postfix_str("")
            bar.reset(total=n_frames)  # so the frames/s shown is the production rate
        t_start = time.perf_counter()  # production rate only
        with open(frames_path, "a") as handle:
            for k in range(n_done, n_frames):
                dyn.run(stride)
                frame = {
                    "positions": atoms.get_positions(),
                    "energy": float(atoms.get_potential_energy()),
                    # raw xTB forces (minus the energy gradient), not the COM-projected ones
                    "forces": atoms.get_forces(apply_constraint=False),
                    "velocities": atoms.get_velocities() * velocity_to_A_per_ps,
                    "time": (k + 1) * stride * timestep_fs / 1000.0,
                }
                done.append(frame)
                _append_frame(handle, atoms, frame, temperature)
                bar.update(1)
                if on_frame is not None:
                    on_frame(k, frame)
        complete = True
    finally:
        bar.close()
        elapsed = time.perf_counter() - t_start
        if done:
            ds = _save_run(done, n_done, z, settings, out_path, complete, elapsed, stride)
        if complete:
            frames_path.unlink(missing_ok=True)
            settings_path.unlink(missing_ok=True)
    return ds


def _run_settings(molecule_info: dict, method: str, temperature: float, timestep_fs: float, stride: int,
                  equilibration_steps: int, seed: int, friction_per_ps: float, z: np.ndarray) -> dict:
    """The settings of a generation run, as the partial files and the dataset record them."""
    import ase

    return {
        "generator": "openmm_stable.data.generate.generate_xtb_dataset",
        "molecule": molecule_info,
        "method": method,
        "temperature_K": float(temperature),
        "timestep_fs": float(timestep_fs),
        "stride": int(stride),
        "equilibration_steps": int(equilibration_steps),
        "seed": int(seed),
        "friction_per_ps": float(friction_per_ps),
        "thermostat": "ase.md.langevin.Langevin",
        "atomic_numbers": z.tolist(),
        "versions": {"tblite": _package_version("tblite"), "ase": ase.__version__},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _frames_to_resume(frames_path: Path, settings_path: Path, out_path: Path, settings: dict,
                      resume: bool) -> list[dict]:
    """Frames already on disk (resume) or none (a fresh start); refuses to overwrite an
    interrupted run or to resume a finished one."""
    done: list[dict] = []
    if frames_path.exists() and frames_path.stat().st_size > 0 and not resume:
        raise InputError(
            f"{frames_path} exists (an interrupted run); continue it with resume=True (--resume) or delete it"
        )
    if resume and frames_path.exists() and frames_path.stat().st_size > 0:
        done = _read_partial(frames_path, settings_path, settings)
    elif resume and out_path.exists():
        raise InputError(f"nothing to resume: {frames_path} does not exist and {out_path} does (a finished run?)")
    return done


def _save_run(done: list[dict], n_done: int, z: np.ndarray, settings: dict, out_path: Path, complete: bool,
              elapsed: float, stride: int) -> QMDataset:
    """Save the frames so far (all of them, or a partial run) with this run's timing."""
    ds = _to_dataset(done, z, settings, str(out_path), complete=complete)
    ds.metadata["timing"] = {
        "wall_seconds_this_run": elapsed,
        "frames_this_run": len(done) - n_done,
        "frames_per_second": (len(done) - n_done) / elapsed if elapsed > 0 else None,
        "ms_per_step": 1000.0 * elapsed / max(1, (len(done) - n_done) * stride),
    }
    save_dataset(ds, out_path)
    return ds


def _to_dataset(done: list[dict], z: np.ndarray, settings: dict, source: str, complete: bool) -> QMDataset:
    metadata = dict(settings)
    metadata.update(
        {
            "source_format": "generated",
            "original_units": {"energy": "eV", "length": "Angstrom"},
            "complete": complete,
        }
    )
    return QMDataset(
        atomic_numbers=z,
        positions=np.stack([f["positions"] for f in done]),
        energies=np.array([f["energy"] for f in done]),
        forces=np.stack([f["forces"] for f in done]),
        velocities=np.stack([f["velocities"] for f in done]),
        times=np.array([f["time"] for f in done]),
        temperature=settings["temperature_K"],
        metadata=metadata,
        source=source,
    )


FRAME_CHECK_KEY = "frame_sha256"  # in each frame's comment line: a digest of its atom lines


def _append_frame(handle, atoms, frame: dict, temperature: float) -> None:
    """Append one frame to the extxyz file in one write, and flush, so a crash keeps it.

    The comment line carries a digest of the frame's atom lines (`FRAME_CHECK_KEY`): a
    frame cut short by a kill or a full disk, even in the middle of a number, fails it,
    and a resume drops it (`drop_torn_frame`). ASE reads the key as one more info entry."""
    import io

    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    snapshot = atoms.copy()  # copies momenta, not the calculator
    snapshot.set_constraint()
    snapshot.calc = SinglePointCalculator(snapshot, energy=frame["energy"], forces=frame["forces"])
    snapshot.info["time_ps"] = frame["time"]
    snapshot.info["temperature_K"] = temperature
    buffer = io.StringIO()
    ase.io.write(buffer, snapshot, format="extxyz")
    count, comment, body = buffer.getvalue().split("\n", 2)
    handle.write(f"{count}\n{comment} {FRAME_CHECK_KEY}={_digest(body.encode())}\n{body}")
    handle.flush()


def _digest(body: bytes) -> str:
    return "sha" + hashlib.sha256(body).hexdigest()[:16]  # "sha": never read back as a number


def _complete_frames(data: bytes) -> tuple[int, int]:
    """(complete frames, bytes they take) at the start of a partial extxyz file: a frame is
    complete when all its lines end in a newline and, where it has one, its digest holds."""
    offset, frames = 0, 0
    while offset < len(data):
        first = data.find(b"\n", offset)
        try:
            n_atoms = int(data[offset:first]) if first >= 0 else -1
        except ValueError:
            n_atoms = -1
        if n_atoms < 1:
            break
        end, ok = first, True
        for _ in range(n_atoms + 1):
            end = data.find(b"\n", end + 1)
            if end < 0:
                ok = False
                break
        if not ok:
            break
        comment_end = data.find(b"\n", first + 1)
        comment, body = data[first + 1:comment_end], data[comment_end + 1:end + 1]
        key = f" {FRAME_CHECK_KEY}=".encode()
        if key in comment and comment.split(key)[1].split()[0].decode() != _digest(body):
            break
        offset, frames = end + 1, frames + 1
    return frames, offset


def drop_torn_frame(frames_path: Path, log=None) -> int:
    """Cut a partial extxyz file back to its last complete frame (a kill or a full disk in
    the middle of a frame's write leaves part of it), saying so; return the frames kept.
    More than about one frame's worth of unreadable text is not a torn write: an InputError."""
    data = frames_path.read_bytes()
    frames, good = _complete_frames(data)
    torn = len(data) - good
    if torn == 0:
        return frames
    frame_size = good / frames if frames else None
    if frame_size is None or torn > 1.5 * frame_size:
        raise InputError(f"cannot resume {frames_path}: {torn} bytes after its {frames} complete frame(s) are not "
                         "a frame cut short (a damaged or foreign file?); delete it to start over")
    with open(frames_path, "r+b") as handle:
        handle.truncate(good)
    print(f"note: {frames_path}: dropped a torn last frame ({torn} bytes of an interrupted write); "
          f"resuming after frame {frames}", file=log or sys.stderr)
    return frames


def _read_partial(frames_path: Path, settings_path: Path, settings: dict) -> list[dict]:
    """Frames of an interrupted run, after checking it was made with the same settings."""
    if not settings_path.exists():
        raise InputError(f"cannot resume: {settings_path} (the run settings) is missing")
    try:
        previous = json.loads(settings_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"cannot resume: {settings_path} (the run settings) is not valid JSON ({err})") from None
    if "friction_per_fs" in previous and "friction_per_ps" not in previous:  # a run started by an older version
        previous["friction_per_ps"] = float(previous.pop("friction_per_fs")) * FS_PER_PS
    for key in _RESUME_KEYS:
        was, now = previous.get(key), settings[key]
        if not (was == now or (isinstance(was, float) and isinstance(now, float) and math.isclose(was, now))):
            raise InputError(
                f"cannot resume {frames_path}: setting '{key}' was {previous.get(key)!r}, now {settings[key]!r}"
            )
    settings["started"] = previous.get("started", settings["started"])
    settings["resumed"] = True
    if drop_torn_frame(frames_path) == 0:
        return []
    ds = load_dataset(frames_path, format="extxyz")
    return [
        {"positions": ds.positions[i], "energy": float(ds.energies[i]), "forces": ds.forces[i],
         "velocities": ds.velocities[i], "time": float(ds.times[i])}
        for i in range(len(ds))
    ]

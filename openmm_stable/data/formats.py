"""Reading and writing QM datasets: MD17, revised MD17, MD22, anything ASE reads, and our own format.

Every loader converts to the internal units (Angstrom, eV, eV/Angstrom, ps, Angstrom/ps)
on the way in and records the units it found in ``metadata["original_units"]``, so a
dataset never carries a unit question past this module. Bad input raises `DatasetError`
with the file and the field in the message.

Usage::

    from openmm_stable.data import load_dataset, save_dataset
    ds = load_dataset("md17_aspirin.npz")          # format detected from the keys
    save_dataset(ds.subset(range(1000)), "aspirin_1k.npz")
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from openmm_stable import units
from openmm_stable.data.dataset import DatasetError, QMDataset

# Our own format: a plain .npz (no pickles) with this marker, so it is readable anywhere
# numpy is, and recognisable without trusting the file name.
FORMAT_MARKER = "openmm-stable-dataset"
FORMAT_VERSION = 1

# Keys of the public npz datasets. MD17 and MD22 come from the sGDML project and share
# one layout (E, F, R, z in kcal/mol and Angstrom); revised MD17 uses longer names.
SGDML_KEYS = {"energies": "E", "forces": "F", "positions": "R", "atomic_numbers": "z"}
RMD17_KEYS = {"energies": "energies", "forces": "forces", "positions": "coords", "atomic_numbers": "nuclear_charges"}
# "sgdml" is what detection reports: the keys cannot tell MD17 from MD22.
NPZ_LAYOUTS = {"md17": SGDML_KEYS, "md22": SGDML_KEYS, "sgdml": SGDML_KEYS, "rmd17": RMD17_KEYS}

# sGDML writes its unit strings in its own spelling; map them to ours.
_UNIT_ALIASES = {
    "ang": "Angstrom", "angstrom": "Angstrom", "a": "Angstrom", "å": "Angstrom",
    "nm": "nm", "bohr": "Bohr", "au": "Bohr",
    "kcal/mol": "kcal/mol", "kj/mol": "kJ/mol", "ev": "eV", "mev": "meV",
    "hartree": "Hartree", "ha": "Hartree", "eh": "Hartree",
}

NPZ_FORMATS = ("openmm-stable", "md17", "rmd17", "md22", "sgdml")
FORMATS = NPZ_FORMATS + ("ase",)


def _normalise_unit(unit: str) -> str:
    return _UNIT_ALIASES.get(str(unit).strip().lower(), str(unit).strip())


def _factors(source: str, energy_unit: str, length_unit: str) -> tuple[float, float]:
    """(energy -> eV, length -> Angstrom) factors; unknown units become a DatasetError."""
    try:
        e = units.energy_factor(_normalise_unit(energy_unit))
    except ValueError as err:
        raise DatasetError(f"{source}: field 'energy_unit': {err}") from None
    try:
        r = units.length_factor(_normalise_unit(length_unit))
    except ValueError as err:
        raise DatasetError(f"{source}: field 'length_unit': {err}") from None
    return e, r


# --- public entry points ---------------------------------------------------------------
def load_dataset(
    path: str | os.PathLike,
    format: Optional[str] = None,
    energy_unit: Optional[str] = None,
    length_unit: Optional[str] = None,
) -> QMDataset:
    """Read a dataset file into a `QMDataset` in internal units.

    ``format`` is one of ``openmm-stable``, ``md17``, ``rmd17``, ``md22``, ``ase`` or an
    ASE format name (e.g. ``extxyz``); None detects it (npz keys, else ASE). ``energy_unit``
    and ``length_unit`` override the units a format implies (for files that break the
    convention); forces are taken to be in energy_unit/length_unit.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file")
    if path.is_dir():
        raise DatasetError(f"{source}: is a directory, expected a dataset file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{source}: empty file")
    fmt = None if format in (None, "", "auto") else str(format).lower()
    if fmt in ("own", "openmm_stable"):
        fmt = "openmm-stable"
    if fmt in NPZ_FORMATS or (fmt is None and zipfile.is_zipfile(path)):
        return _load_npz(path, fmt, energy_unit, length_unit)
    return _load_ase(path, None if fmt in (None, "ase") else fmt, energy_unit, length_unit)


def save_dataset(ds: QMDataset, path: str | os.PathLike) -> Path:
    """Write `ds` in the project's own format (npz, internal units, JSON metadata).

    The file is written to a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    arrays: dict[str, Any] = {
        "format": np.array(FORMAT_MARKER),
        "format_version": np.array(FORMAT_VERSION),
        "energy_unit": np.array("eV"),
        "length_unit": np.array("Angstrom"),
        "time_unit": np.array("ps"),
        "atomic_numbers": ds.atomic_numbers,
        "positions": ds.positions,
        "temperature": np.array(np.nan if ds.temperature is None else float(ds.temperature)),
        "metadata": np.array(json.dumps(ds.metadata, default=_json_default, sort_keys=True)),
    }
    for name in ("energies", "forces", "box", "times", "velocities"):
        value = getattr(ds, name)
        if value is not None:
            arrays[name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value of type {type(value).__name__} is not JSON-serialisable")


# --- npz formats -------------------------------------------------------------------------
def _load_npz(path: Path, fmt: Optional[str], energy_unit, length_unit) -> QMDataset:
    source = str(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except ValueError as err:  # object arrays need pickles, which we refuse to load
        raise DatasetError(f"{source}: unreadable npz file ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DatasetError(f"{source}: unreadable npz file ({err})") from None
    found = ", ".join(sorted(data)) or "no arrays"
    if not data:
        raise DatasetError(f"{source}: empty npz file (no arrays)")
    if fmt is None:
        fmt = _detect_npz_format(source, data)
    if fmt == "openmm-stable":
        return _from_own(source, data, energy_unit, length_unit)
    keys = NPZ_LAYOUTS[fmt]
    missing = [key for key in keys.values() if key not in data]
    if missing:
        raise DatasetError(
            f"{source}: {fmt} file is missing key(s) {', '.join(repr(k) for k in missing)} "
            f"(found: {found}; expected {', '.join(keys.values())})"
        )
    # sGDML files may state their units; an explicit argument still wins.
    e_unit = energy_unit or (str(data["e_unit"]) if "e_unit" in data else "kcal/mol")
    r_unit = length_unit or (str(data["r_unit"]) if "r_unit" in data else "Angstrom")
    e_factor, r_factor = _factors(source, e_unit, r_unit)
    arrays = {field: data[key] for field, key in keys.items()}
    for field, key in keys.items():
        if not np.issubdtype(arrays[field].dtype, np.number):
            raise DatasetError(f"{source}: field '{field}' (key '{key}'): not numeric (dtype {arrays[field].dtype})")
    energies = arrays["energies"]
    if energies.ndim == 2 and energies.shape[1] == 1:  # MD17 stores E as (frames, 1)
        energies = energies[:, 0]
    metadata = {
        "source_format": fmt,
        "source_file": source,
        "original_units": {"energy": _normalise_unit(e_unit), "length": _normalise_unit(r_unit)},
    }
    for key in ("name", "theory"):
        if key in data and data[key].ndim == 0:
            metadata[key] = str(data[key])
    if fmt == "rmd17" and "old_indices" in data:
        metadata["has_old_indices"] = True
    return _make(
        source,
        keys,
        atomic_numbers=_integer_charges(source, arrays["atomic_numbers"], keys["atomic_numbers"]),
        positions=arrays["positions"] * r_factor,
        energies=energies * e_factor,
        forces=arrays["forces"] * (e_factor / r_factor),
        metadata=metadata,
    )


def _detect_npz_format(source: str, data: dict) -> str:
    if "format" in data:
        if str(data["format"]) != FORMAT_MARKER:
            raise DatasetError(f"{source}: field 'format': unknown format marker {str(data['format'])!r}")
        return "openmm-stable"
    # Pick the layout with the most keys present; missing ones are reported by the caller.
    scores = {fmt: sum(key in data for key in NPZ_LAYOUTS[fmt].values()) for fmt in ("sgdml", "rmd17")}
    best = max(scores, key=scores.get)
    if scores[best] == 0:
        raise DatasetError(
            f"{source}: unsupported npz layout (found keys: {', '.join(sorted(data))}); expected "
            f"MD17/MD22 keys E, F, R, z, revised-MD17 keys coords, energies, forces, nuclear_charges, "
            f"or a file written by save_dataset"
        )
    return best


def _integer_charges(source: str, z: np.ndarray, key: str) -> np.ndarray:
    z = np.asarray(z)
    if z.ndim == 2:  # some files repeat z per frame; accept it only if identical
        if not np.all(z == z[:1]):
            raise DatasetError(f"{source}: field 'atomic_numbers' (key '{key}'): atoms differ between frames")
        z = z[0]
    if not np.all(np.isfinite(z)) or not np.all(z == np.round(z)):
        raise DatasetError(f"{source}: field 'atomic_numbers' (key '{key}'): non-integer atomic numbers")
    return z.astype(np.int64)


def _make(source: str, keys: dict[str, str], **fields) -> QMDataset:
    """Build the dataset; name the file's key next to our field name in any error."""
    try:
        return QMDataset(source=source, **fields)
    except DatasetError as err:
        message = str(err)
        for field, key in keys.items():
            if f"field '{field}'" in message and key != field:
                message = message.replace(f"field '{field}'", f"field '{field}' (key '{key}')", 1)
                break
        raise DatasetError(message) from None


# Arrays of our own format that must hold numbers (a text or boolean array is a broken file).
_OWN_NUMERIC = ("format_version", "atomic_numbers", "positions", "energies", "forces", "box", "times", "velocities",
                "temperature")


def _check_own_fields(source: str, data: dict) -> None:
    """Every numeric array numeric, the temperature one number: a DatasetError naming the
    file and the field, instead of a traceback from deep inside the conversion."""
    for key in _OWN_NUMERIC:
        if key in data and (not np.issubdtype(data[key].dtype, np.number) or data[key].dtype == np.bool_):
            raise DatasetError(f"{source}: field '{key}': not numeric (dtype {data[key].dtype}, "
                               f"value {_preview(data[key])})")
    for key in ("format_version", "temperature"):
        if key in data and data[key].size != 1:
            raise DatasetError(f"{source}: field '{key}': expected one number, got shape {data[key].shape}")


def _preview(array: np.ndarray, limit: int = 40) -> str:
    text = repr(array.reshape(-1)[0].item()) if array.size else "empty"
    return text if len(text) <= limit else text[:limit] + "..."


def _from_own(source: str, data: dict, energy_unit, length_unit) -> QMDataset:
    _check_own_fields(source, data)
    version = int(data["format_version"].reshape(-1)[0]) if "format_version" in data else -1
    if version < 1 or version > FORMAT_VERSION:
        raise DatasetError(
            f"{source}: field 'format_version': version {version} not supported (this reader knows 1..{FORMAT_VERSION})"
        )
    missing = [key for key in ("atomic_numbers", "positions", "energy_unit", "length_unit") if key not in data]
    if missing:
        raise DatasetError(f"{source}: missing key(s) {', '.join(missing)} (found: {', '.join(sorted(data))})")
    e_unit = energy_unit or str(data["energy_unit"])
    r_unit = length_unit or str(data["length_unit"])
    e_factor, r_factor = _factors(source, e_unit, r_unit)
    time_unit = str(data.get("time_unit", "ps"))
    if time_unit != "ps":
        raise DatasetError(f"{source}: field 'time_unit': unknown time unit {time_unit!r}; known: ps")
    try:
        metadata = json.loads(str(data["metadata"])) if "metadata" in data else {}
    except json.JSONDecodeError as err:
        raise DatasetError(f"{source}: field 'metadata': not valid JSON ({err})") from None
    if not isinstance(metadata, dict):
        raise DatasetError(f"{source}: field 'metadata': a JSON {type(metadata).__name__}, expected a JSON object "
                           "(a mapping of names to values)")
    metadata.setdefault("original_units", {"energy": e_unit, "length": r_unit})
    temperature = float(data["temperature"].reshape(-1)[0]) if "temperature" in data else float("nan")
    get = lambda key, factor: data[key] * factor if key in data else None  # noqa: E731
    return _make(
        source,
        {},
        atomic_numbers=_integer_charges(source, data["atomic_numbers"], "atomic_numbers"),
        positions=data["positions"] * r_factor,
        energies=get("energies", e_factor),
        forces=get("forces", e_factor / r_factor),
        box=get("box", r_factor),
        times=get("times", 1.0),
        velocities=get("velocities", r_factor),
        temperature=None if np.isnan(temperature) else temperature,
        metadata=metadata,
    )


# --- everything ASE reads ------------------------------------------------------------------
def _load_ase(path: Path, ase_format: Optional[str], energy_unit, length_unit) -> QMDataset:
    import ase.io
    import ase.units

    source = str(path)
    e_unit, r_unit = energy_unit or "eV", length_unit or "Angstrom"
    e_factor, r_factor = _factors(source, e_unit, r_unit)
    try:
        frames = ase.io.read(str(path), index=":", format=ase_format)
    except Exception as err:  # ASE raises many types for files it cannot parse
        kind = type(err).__name__
        detail = str(err) or kind
        raise DatasetError(f"{source}: unreadable or unsupported file ({kind}: {detail})") from None
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise DatasetError(f"{source}: no frames in file")
    z = frames[0].get_atomic_numbers()
    for i, atoms in enumerate(frames):
        if not np.array_equal(atoms.get_atomic_numbers(), z):
            raise DatasetError(
                f"{source}: field 'atomic_numbers': frame {i} has different atoms than frame 0 "
                f"(a dataset holds one composition)"
            )
    energies = [_frame_energy(atoms) for atoms in frames]
    forces = [_frame_forces(atoms) for atoms in frames]
    energies_arr = _all_or_none(source, "energies", energies)
    forces_arr = _all_or_none(source, "forces", forces)
    box = _box(source, frames)
    velocities = None
    if all(atoms.has("momenta") for atoms in frames):
        # ASE velocities are Angstrom per ASE time unit; 1 ps = 1000 * ase.units.fs.
        velocities = np.stack([atoms.get_velocities() for atoms in frames]) * (1000.0 * ase.units.fs) * r_factor
    times = None
    if all("time_ps" in atoms.info for atoms in frames):
        times = np.array([float(atoms.info["time_ps"]) for atoms in frames])
    temperature = frames[0].info.get("temperature_K")
    if temperature is not None and not isinstance(temperature, (int, float, np.number)):
        raise DatasetError(f"{source}: field 'temperature' (temperature_K of frame 0): not a number ({temperature!r})")
    metadata: dict[str, Any] = {
        "source_format": f"ase:{ase_format or 'auto'}",
        "source_file": source,
        "original_units": {"energy": _normalise_unit(e_unit), "length": _normalise_unit(r_unit)},
    }
    return _make(
        source,
        {},
        atomic_numbers=z,
        positions=np.stack([atoms.get_positions() for atoms in frames]) * r_factor,
        energies=None if energies_arr is None else energies_arr * e_factor,
        forces=None if forces_arr is None else forces_arr * (e_factor / r_factor),
        box=None if box is None else box * r_factor,
        times=times,
        velocities=velocities,
        temperature=None if temperature is None else float(temperature),
        metadata=metadata,
    )


def _frame_energy(atoms) -> Optional[float]:
    results = getattr(atoms.calc, "results", None) or {}
    for key in ("energy", "free_energy"):
        if key in results:
            return float(results[key])
    for key in ("energy", "Energy", "potential_energy", "free_energy"):
        if key in atoms.info:
            return float(atoms.info[key])
    return None


def _frame_forces(atoms) -> Optional[np.ndarray]:
    results = getattr(atoms.calc, "results", None) or {}
    if "forces" in results:
        return np.asarray(results["forces"], dtype=float)
    for key in ("forces", "force", "Forces"):
        if key in atoms.arrays:
            return np.asarray(atoms.arrays[key], dtype=float)
    return None


def _all_or_none(source: str, field: str, values: list) -> Optional[np.ndarray]:
    present = [v is not None for v in values]
    if not any(present):
        return None
    if not all(present):
        first_missing = present.index(False)
        raise DatasetError(f"{source}: field '{field}': missing in frame {first_missing} but present in others")
    return np.stack([np.asarray(v, dtype=float) for v in values])


def _box(source: str, frames) -> Optional[np.ndarray]:
    pbc = frames[0].get_pbc()
    if not pbc.any():
        return None
    if not pbc.all():
        raise DatasetError(f"{source}: field 'box': partially periodic cells (pbc={pbc.tolist()}) are not supported")
    cell = frames[0].get_cell().array
    for i, atoms in enumerate(frames[1:], start=1):
        if not np.allclose(atoms.get_cell().array, cell):
            raise DatasetError(f"{source}: field 'box': frame {i} has a different cell (a dataset holds one box)")
    if abs(np.linalg.det(cell)) < 1e-12:
        raise DatasetError(f"{source}: field 'box': periodic but the cell has zero volume")
    return cell

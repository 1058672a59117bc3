"""Observable targets from a user's file: an experimental g(r) table or a scalar such as
a diffusion coefficient, instead of the average over a reference trajectory.

Table format (one file per table; text, comma- or whitespace-separated):

    # lines starting with '#' are comments; blank lines are skipped
    r_A, g, sigma
    2.0, 0.00, 0.02
    2.1, 0.05, 0.02
    ...

* The first non-comment line names the columns. The distance column carries its unit
  in its name: ``r_A`` (Angstrom) or ``r_nm`` (nm, converted to A); a bare ``r`` means
  Angstrom, the project's unit. Exactly one of them.
* The value column of a single curve is ``g`` (an element-pair RDF) or ``h`` (a
  molecule's h(r), 1/A); an optional ``sigma`` column is its standard error. A training
  observable with several pairs (water's default: O-O, O-H, H-H side by side) needs one
  column per pair, ``g_O-O``, ``g_O-H``, ``g_H-H``, and optionally ``sigma_O-O``, ...
  (element order within a label does not matter).
* Checked on reading: numbers finite, r strictly increasing and > 0, g >= 0, sigma > 0.
  A curve whose highest peak lies below 0.5 A is refused: no pair of atoms sits that
  close, so its r column is almost surely in nm under an Angstrom name.
* Mapping onto an observable's bins (`map_curve`): linear interpolation at the bin
  centres. Every centre must lie inside the table's r range; if it does not, the error
  says which r range is missing (extend the table, e.g. with g = 0 rows where the pair
  cannot approach, or set the observable's ``r_min`` / ``r_max`` to the table's range).
  There is no silent masking of uncovered bins.
* With sigma, per-bin weights 1/sigma^2 at the centres, normalised to mean 1, are
  returned and recorded. The refinement loss (`ObservableLoss`) has no per-bin weights,
  so refine validates and records sigma but does not weight the loss with it.

Scalar targets (`scalar_target`): a mapping ``{name: diffusivity, value: 2.3e-5, sigma:
0.1e-5, unit: cm^2/s}`` (a YAML file holding it, or the command-line form
``VALUE[+-SIGMA]UNIT``, e.g. ``2.3e-5+-0.1e-5cm^2/s``), converted to A^2/ps. The unit is
required: A^2/ps and cm^2/s differ by 1e4, and a guessed unit would silently be wrong.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from openmm_stable.dynamics import A2_PER_PS_IN_CM2_PER_S
from openmm_stable.errors import InputError
from openmm_stable.units import NM_IN_ANGSTROM

# Distance column name -> factor to Angstrom.
R_COLUMNS = {"r": 1.0, "r_A": 1.0, "r_nm": NM_IN_ANGSTROM}
# Observables whose values are curves over r bins, and the value column of one curve.
CURVE_OBSERVABLES = {"rdf": "g", "hr": "h"}
# Below this r (A) no curve of interatomic distances peaks: the table is in nm.
MIN_PEAK_R_A = 0.5
# Diffusivity units -> factor to A^2/ps (1 cm^2/s = 1e16 A^2 / 1e12 ps = 1e4 A^2/ps).
DIFFUSIVITY_UNITS = {"A^2/ps": 1.0, "cm^2/s": 1.0 / A2_PER_PS_IN_CM2_PER_S,
                     "m^2/s": 1e4 / A2_PER_PS_IN_CM2_PER_S}
SCALAR_TARGETS = ("diffusivity",)
# Value and sigma column names: g or h, optionally _<pair> such as g_O-O or sigma_H-O.
_COLUMN = re.compile(r"^(r|r_A|r_nm|(g|h|sigma)(_[A-Z][a-z]?-[A-Z][a-z]?)?)$")


@dataclasses.dataclass
class Table:
    """A target table as read: r (A, increasing), value columns and sigma columns by name."""

    source: str
    r: np.ndarray
    r_column: str  # r, r_A or r_nm
    values: dict  # column name -> (n,) array
    sigmas: dict  # value column name -> (n,) array, for those with a sigma column
    sha256: str


@dataclasses.dataclass
class CurveTarget:
    """A table mapped onto an observable's bins: `values` (d,) in the observable's column
    order, `weights` (d,) 1/sigma^2 normalised to mean 1 (None without sigma)."""

    values: torch.Tensor
    weights: Optional[torch.Tensor]
    table: Table
    columns: list

    def record(self) -> dict:
        """What a run's metrics.json says about where its target came from."""
        return {"source": self.table.source, "sha256": self.table.sha256, "r_column": self.table.r_column,
                "columns": self.columns, "sigma_given": self.weights is not None,
                "values": self.values.tolist()}


def _fail(source, message: str):
    raise InputError(f"target table {source}: {message}")


def read_table(path) -> Table:
    """Read and check a target table (module doc); InputError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"target table {path} does not exist")
    text = path.read_text()
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        _fail(path, "no header line (e.g. 'r_A,g,sigma') and no data")
    split = (lambda s: [x.strip() for x in s.split(",")]) if "," in lines[0][1] else str.split
    header = split(lines[0][1])
    if len(set(header)) != len(header):
        _fail(path, f"repeated column names in the header {header}")
    r_names = [c for c in header if c in R_COLUMNS]
    if len(r_names) != 1:
        _fail(path, f"needs exactly one distance column, one of {', '.join(R_COLUMNS)} (r: Angstrom), "
                    f"found {r_names or 'none'} in the header {header}")
    rows = []
    for n, line in lines[1:]:
        fields = split(line)
        if len(fields) != len(header):
            _fail(path, f"line {n} has {len(fields)} fields, the header names {len(header)}")
        try:
            rows.append([float(x) for x in fields])
        except ValueError:
            _fail(path, f"line {n}: not a number in {fields}")
    if len(rows) < 2:
        _fail(path, f"needs at least two rows of data, has {len(rows)}")
    data = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(data).all():
        n = lines[1 + int(np.flatnonzero(~np.isfinite(data).all(1))[0])][0]
        _fail(path, f"line {n}: values must be finite (no nan or inf)")
    columns = dict(zip(header, data.T))
    r = columns.pop(r_names[0]) * R_COLUMNS[r_names[0]]
    if not (r > 0).all():
        _fail(path, f"r must be > 0 (first r: {r[0]:g} A)")
    if not (np.diff(r) > 0).all():
        k = int(np.flatnonzero(np.diff(r) <= 0)[0])
        _fail(path, f"r must be strictly increasing ({r[k]:g} then {r[k + 1]:g} A in data rows {k + 1}, {k + 2})")
    unknown = [c for c in columns if not _COLUMN.match(c)]
    if unknown:
        _fail(path, f"unknown column(s) {unknown}; allowed: {', '.join(R_COLUMNS)}, g or h, g_<pair> (e.g. g_O-O), "
                    "and sigma or sigma_<pair> for their standard errors")
    values = {c: v for c, v in columns.items() if not c.startswith("sigma")}
    sigmas = {}
    for name, s in columns.items():
        if not name.startswith("sigma"):
            continue
        suffix = name[len("sigma"):]
        owners = [c for c in (f"g{suffix}", f"h{suffix}") if c in values]
        if len(owners) != 1:
            _fail(path, f"column {name!r} has no value column to belong to (sigma: g or h; sigma_<pair>: g_<pair>)")
        if not (s > 0).all():
            _fail(path, f"{name} must be > 0 (found {s.min():g})")
        sigmas[owners[0]] = s
    if not values:
        _fail(path, f"no value column (g, h, or g_O-O, ...) in the header {header}")
    for name, v in values.items():
        if (v < 0).any():
            _fail(path, f"{name} must be >= 0 (found {v.min():g} at r = {r[int(np.argmin(v))]:g} A)")
        peak = r[int(np.argmax(v))]
        if peak < MIN_PEAK_R_A:
            if r_names[0] == "r_nm":
                _fail(path, f"the highest peak of {name} lies at r = {peak:g} A, below {MIN_PEAK_R_A} A where no "
                            "two atoms sit, even with r read as nm: check the r column's unit")
            _fail(path, f"the highest peak of {name} lies at r = {peak:g} A, below {MIN_PEAK_R_A} A where no two "
                        f"atoms sit: the r column ({r_names[0]}, read as Angstrom) is almost surely in nm; "
                        "name it r_nm")
    return Table(str(path), r, r_names[0], values, sigmas, hashlib.sha256(text.encode()).hexdigest())


def pair_key(label: str) -> str:
    """An element-pair label with its elements sorted: 'H-O' and 'O-H' are one pair."""
    return "-".join(sorted(label.split("-")))


def _column_key(name: str) -> str:
    base, _, label = name.partition("_")
    return base if not label else f"{base}_{pair_key(label)}"


def interpolate(table: Table, y: np.ndarray, centres: np.ndarray, what: str) -> np.ndarray:
    """Linear interpolation of a column `y` of the table at `centres` (A); InputError
    naming the missing r range when the table does not cover every centre."""
    lo, hi = float(table.r[0]), float(table.r[-1])
    c_lo, c_hi = float(centres[0]), float(centres[-1])
    tol = 1e-9 * max(1.0, hi)
    missing = []
    if c_lo < lo - tol:
        missing.append(f"{c_lo:.4g}-{lo:.4g} A")
    if c_hi > hi + tol:
        missing.append(f"{hi:.4g}-{c_hi:.4g} A")
    if missing:
        _fail(table.source, f"covers r = {lo:.4g}-{hi:.4g} A, but {what}'s bin centres span {c_lo:.4g}-{c_hi:.4g} A: "
                            f"missing {' and '.join(missing)}; extend the table (e.g. g = 0 where the pair cannot "
                            "approach) or set the observable's r_min / r_max to the table's range")
    return np.interp(centres, table.r, y)


def _find_column(table: Table, wanted: list[str], what: str) -> str:
    keys = {_column_key(w) for w in wanted}
    for name in table.values:
        if _column_key(name) in keys:
            return name
    _fail(table.source, f"{what} needs a column {' or '.join(repr(w) for w in wanted)}; the table has "
                        f"{', '.join(table.values)}")


def map_curve(table: Table, centres: np.ndarray, labels: Optional[list[str]], observable_name: str) -> CurveTarget:
    """The table on an observable's bin centres (A): one block of len(centres) per label
    (element pair, e.g. 'O-O'), or a single curve with ``labels=None``."""
    if observable_name not in CURVE_OBSERVABLES:
        raise InputError(f"a target table gives a curve over r bins, for the {' or '.join(CURVE_OBSERVABLES)} "
                         f"observable; {observable_name!r} is not one")
    base = CURVE_OBSERVABLES[observable_name]
    centres = np.asarray(centres, dtype=np.float64)
    blocks, sigma_blocks, columns = [], [], []
    for label in labels or [None]:
        if label is None:
            wanted, what = [base], f"the {observable_name} observable"
        else:
            wanted = [f"{base}_{label}"] + ([base] if len(labels) == 1 else [])
            what = f"the {observable_name} observable's pair {label}"
        column = _find_column(table, wanted, what)
        columns.append(column)
        blocks.append(interpolate(table, table.values[column], centres, what))
        if column in table.sigmas:
            sigma_blocks.append(interpolate(table, table.sigmas[column], centres, what))
    weights = None
    if len(sigma_blocks) == len(blocks):
        w = 1.0 / np.concatenate(sigma_blocks) ** 2
        weights = torch.as_tensor(w / w.mean())
    return CurveTarget(torch.as_tensor(np.concatenate(blocks)), weights, table, columns)


def observable_target(observable, path) -> CurveTarget:
    """The refinement target of a curve observable (`RdfObservable`, `HrObservable`) from
    the table at `path`, in the observable's column order (the pairs side by side)."""
    from openmm_stable.observables import pair_label

    name = getattr(observable, "name", None)
    if name not in CURVE_OBSERVABLES:
        raise InputError(f"refine: a target table (observable_target, --target) gives a curve over r bins, for the "
                         f"{' or '.join(CURVE_OBSERVABLES)} observable; the observable here is {name!r}")
    labels = None
    if name == "rdf":
        labels = [pair_label(p) for p in (observable.pairs or (observable.pair,))]
    return map_curve(read_table(path), observable.bin_centres.numpy(), labels, name)


# --- scalar targets ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ScalarTarget:
    """A scalar target in project units (diffusivity: A^2/ps), with what was given."""

    name: str
    value: float
    sigma: Optional[float]
    given: str  # the value as the user wrote it, unit included

    def record(self, unit_factor: float = 1.0, unit: str = "A^2/ps") -> dict:
        return {"name": self.name, f"value_{_unit_key(unit)}": self.value * unit_factor,
                f"sigma_{_unit_key(unit)}": None if self.sigma is None else self.sigma * unit_factor,
                "given": self.given}


def _unit_key(unit: str) -> str:
    return unit.replace("^2", "2").replace("/", "_per_")


def diffusivity_factor(unit: str) -> float:
    """Factor converting `unit` to A^2/ps."""
    u = str(unit).replace(" ", "").replace("Å", "A").replace("**", "^")
    if u not in DIFFUSIVITY_UNITS:
        raise InputError(f"unknown diffusivity unit {unit!r}; known: {', '.join(DIFFUSIVITY_UNITS)}")
    return DIFFUSIVITY_UNITS[u]


_SPEC = re.compile(r"^\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*(?:(?:\+-|±|\+/-)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?))?"
                   r"\s*(\S.*?)?\s*$")


def scalar_target(spec: Union[str, dict, Path], name: str = "diffusivity") -> ScalarTarget:
    """A scalar target from a mapping ``{name, value, sigma, unit}``, a YAML file holding
    one, or the string ``VALUE[+-SIGMA]UNIT``; converted to A^2/ps and checked (finite,
    value > 0, sigma > 0, unit known)."""
    if isinstance(spec, (str, Path)) and Path(spec).suffix in (".yaml", ".yml", ".json"):
        from openmm_stable.config import read_yaml_mapping

        if not Path(spec).is_file():
            raise InputError(f"{name} target file {spec} does not exist")
        spec = read_yaml_mapping(spec)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"name", "value", "sigma", "unit"})
        if unknown:
            raise InputError(f"{name} target: unknown key(s) {unknown}; allowed: name, value, sigma, unit")
        if spec.get("name", name) != name:
            raise InputError(f"{name} target: name {spec.get('name')!r}; known scalar targets: "
                             f"{', '.join(SCALAR_TARGETS)}")
        if "value" not in spec or "unit" not in spec:
            raise InputError(f"{name} target needs 'value' and 'unit' ({', '.join(DIFFUSIVITY_UNITS)}), got {spec}")
        value, sigma, unit = spec["value"], spec.get("sigma"), spec["unit"]
        given = f"{value}{'' if sigma is None else f'+-{sigma}'} {unit}"
    else:
        match = _SPEC.match(str(spec))
        if match is None:
            raise InputError(f"{name} target {spec!r}: expected VALUE[+-SIGMA]UNIT, e.g. 2.3e-5+-0.1e-5cm^2/s")
        value, sigma, unit = match.groups()
        given = str(spec)
        if not unit:
            raise InputError(f"{name} target {spec!r} has no unit; append one of {', '.join(DIFFUSIVITY_UNITS)} "
                             "(A^2/ps and cm^2/s differ by 1e4, so none is assumed)")
    factor = diffusivity_factor(unit)
    try:
        value = float(value)
        sigma = None if sigma is None else float(sigma)
    except (TypeError, ValueError):
        raise InputError(f"{name} target {given!r}: value and sigma must be numbers") from None
    if not (math.isfinite(value) and value > 0):
        raise InputError(f"{name} target {given!r}: the value must be finite and > 0")
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise InputError(f"{name} target {given!r}: sigma must be finite and > 0")
    return ScalarTarget(name, value * factor, None if sigma is None else sigma * factor, given)

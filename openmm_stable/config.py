"""Typed configs from plain data (YAML files, checkpoints): one loader for every stage.

Each stage has a dataclass config validated in its ``__post_init__``; this module only
turns mappings into those dataclasses, rejecting unknown keys instead of ignoring them.
`load_config` is the one rule for pretrain, simulate and refine: explicit flags over the
YAML file over the defaults, and a flag that was not given (None) never wins.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Optional, TypeVar

from openmm_stable.errors import InputError

T = TypeVar("T")


def _coerce(value: Any, annotation: Any) -> Any:
    """YAML reads 1e-3 as a string; turn such strings into the float a field wants."""
    if isinstance(value, str) and annotation in (float, Optional[float]):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def config_from_dict(cls: type[T], values: Optional[dict], name: Optional[str] = None) -> T:
    """Build dataclass `cls` from a mapping; nested dataclass fields accept mappings too."""
    name = name or cls.__name__
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InputError(f"{name}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            values[key] = config_from_dict(hint, value, f"{name}.{key}")
        else:
            values[key] = _coerce(value, hint)
    return cls(**values)


def read_yaml_mapping(path) -> dict:
    """The mapping in a YAML file, with clear errors for a missing file or another shape."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    return values


def merge_settings(base: Optional[dict], overrides: Optional[dict]) -> dict:
    """`base` updated with `overrides`, the one rule of every stage: a None override means
    "not given" and never wins; nested mappings (e.g. ``engine``) merge key by key."""
    out = dict(base or {})
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if isinstance(value, dict):
            nested = merge_settings(out.get(key) if isinstance(out.get(key), dict) else {}, value)
            if nested or key in out:
                out[key] = nested
        else:
            out[key] = value
    return out


def load_config(cls: type[T], path=None, overrides: Optional[dict] = None) -> T:
    """A stage's config: defaults, then the YAML file at `path` (if any), then the
    non-None `overrides` (command-line flags); see `merge_settings`.

    A config class with a ``from_dict`` classmethod (`PretrainConfig`, `SimulationConfig`)
    builds itself from the merged mapping; any other goes through `config_from_dict`."""
    values = merge_settings(read_yaml_mapping(path) if path is not None else {}, overrides)
    from_dict = getattr(cls, "from_dict", None)
    if from_dict is not None:
        return from_dict(values)
    return config_from_dict(cls, values, None if path is None else str(path))


def config_from_yaml(cls: type[T], path, overrides: Optional[dict] = None) -> T:
    """Read a YAML mapping of `cls` fields; non-None `overrides` win over the file
    (`load_config` with a file)."""
    return load_config(cls, path, overrides)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)

"""Typed configs from plain data (YAML files, checkpoints): one loader for every stage.

Each stage has a dataclass config validated in its ``__post_init__``; this module only
turns mappings into those dataclasses, rejecting unknown keys instead of ignoring them.
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


def config_from_yaml(cls: type[T], path, overrides: Optional[dict] = None) -> T:
    """Read a YAML mapping of `cls` fields; non-None `overrides` win over the file."""
    values = read_yaml_mapping(path)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(cls, values, str(path))


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)

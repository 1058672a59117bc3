"""Architecture families, found the way openmm-ml finds potentials: by entry point.

A family is one object (`ArchitectureFamily`) that knows how to build its network from
hyper-parameters, its own presets (``tiny`` .. ``large``), which modules an exported
TorchScript file of it needs imported before it loads, and optionally how to read a
checkpoint trained elsewhere. A package adds a family without editing ours::

    # its pyproject.toml
    [project.entry-points."openmm_stable.architectures"]
    toy = "toypkg.family:FAMILY"

Entry points are only *listed* when openmm_stable is imported; a family's module is
imported when the family is first used (`get_family`). A module that fails to import (an
optional dependency missing) does not break anything else: using that family raises an
`InputError` that says what to install.

>>> from openmm_stable.models.registry import family_names, get_family
>>> "schnet" in family_names()
True
>>> net = get_family("schnet").build(**get_family("schnet").presets["tiny"])
"""
from __future__ import annotations

import dataclasses
import importlib
from importlib import metadata
from typing import Any, Callable, Mapping, Optional

from torch import nn

from openmm_stable.errors import InputError

ENTRY_POINT_GROUP = "openmm_stable.architectures"

# The families this package ships, by module path: used when the package's own entry points
# are not visible (run from a source tree that was never `pip install`ed, or stale metadata).
BUILTIN_FAMILIES = {
    "schnet": "openmm_stable.models.schnet:FAMILY",
    "graph-network": "openmm_stable.models.torchmdnet:GRAPH_NETWORK",
    "equivariant-transformer": "openmm_stable.models.torchmdnet:EQUIVARIANT_TRANSFORMER",
    "tensornet": "openmm_stable.models.torchmdnet:TENSORNET",
}


@dataclasses.dataclass(frozen=True)
class ArchitectureFamily:
    """One architecture family.

    ``build(**hparams)`` returns a network meeting the protocol of `models.base` (energies
    of a batch from ``z, pos, batch, box``); the hparams are a preset's dict, possibly with
    some values overridden, and they are what a model file records (``spec["hparams"]``), so
    they must be plain data (numbers, strings, lists, dicts) that rebuild the same network.

    ``extension_imports``: modules to import before a TorchScript file this family exported
    can be loaded (custom ops it calls, e.g. torchmd-net's neighbour list); empty for plain
    PyTorch ops.

    ``load_foreign(path, allow_pickle)``: read a checkpoint trained by another program into
    an `NNIP` whose ``spec`` is ``{"architecture": name, "preset": <a preset or None>,
    "hparams": ...}`` with hparams that `build` rebuilds it from (so `save_model` /
    `load_model` round-trip it); None when the family cannot. It must refuse a file that
    needs pickle (`InputError`) unless ``allow_pickle`` is True.

    ``extra_hparams``: names `build` accepts beyond the keys of the presets (an override
    with any other name is refused as a typo).

    ``hparams_from_data(dataset, hparams)``: hyper-parameters `pretrain` takes from the
    training frames (e.g. MACE's element table and mean neighbour count), merged under the
    user's own overrides; None when the presets need nothing from the data.
    """

    name: str
    presets: Mapping[str, Mapping[str, Any]]
    build: Callable[..., nn.Module]
    extension_imports: tuple[str, ...] = ()
    load_foreign: Optional[Callable[..., nn.Module]] = None
    extra_hparams: tuple[str, ...] = ()
    description: str = ""
    hparams_from_data: Optional[Callable[..., dict]] = None

    def hparam_names(self) -> set[str]:
        names = set(self.extra_hparams)
        for values in self.presets.values():
            names.update(values)
        return names

    def hparams(self, preset: Optional[str], overrides: Optional[Mapping[str, Any]] = None) -> dict:
        """The preset's hyper-parameters with `overrides` applied (``preset=None``: the
        overrides alone, e.g. a foreign model's recorded hparams); clear errors for an
        unknown preset or an unknown hyper-parameter name."""
        overrides = dict(overrides or {})
        if preset is None:
            base: dict = {}
        elif not self.presets:
            raise InputError(f"architecture {self.name!r} has no presets: it only reads models trained elsewhere "
                             "(load_foreign; `openmm-stable import`)")
        elif preset not in self.presets:
            raise InputError(f"unknown preset {preset!r} for architecture {self.name!r}; "
                             f"known: {', '.join(self.presets)}")
        else:
            base = dict(self.presets[preset])
        unknown = sorted(set(overrides) - self.hparam_names())
        if unknown:
            raise InputError(f"architecture {self.name!r} has no hyper-parameter {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(self.hparam_names()))}")
        return {**base, **overrides}

    def import_extensions(self) -> None:
        """Import `extension_imports` (registers the custom ops an exported file calls)."""
        for module in self.extension_imports:
            importlib.import_module(module)


class FamilyUnavailable(InputError):
    """A family that is listed (an entry point) but whose module cannot be imported."""


_REGISTERED: dict[str, ArchitectureFamily] = {}  # register_family: wins over entry points
_LOADED: dict[str, ArchitectureFamily] = {}  # entry points already imported


def register_family(family: ArchitectureFamily, replace: bool = False) -> ArchitectureFamily:
    """Add `family` in this process (tests, notebooks); a package uses an entry point instead."""
    if not isinstance(family, ArchitectureFamily):
        raise TypeError(f"register_family needs an ArchitectureFamily, got {type(family).__name__}")
    if not replace and family.name in _REGISTERED:
        raise ValueError(f"architecture {family.name!r} is registered already (replace=True to replace it)")
    _REGISTERED[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Undo `register_family` (and forget a loaded entry point, so it is read again)."""
    _REGISTERED.pop(name, None)
    _LOADED.pop(name, None)


def _entry_points() -> dict[str, Any]:
    """name -> entry point (or a BUILTIN_FAMILIES path string), read fresh each call so that
    a distribution added to sys.path is seen. Two distributions naming the same family: ours
    wins (another package cannot silently replace a built-in), else the first found."""
    found: dict[str, Any] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found or _distribution_name(ep) == "openmm-stable":
            found[ep.name] = ep
    for name, target in BUILTIN_FAMILIES.items():
        found.setdefault(name, target)
    return found


def _distribution_name(target) -> Optional[str]:
    dist = getattr(target, "dist", None)
    try:
        return dist.metadata["Name"] if dist is not None else None
    except Exception:  # unreadable metadata
        return None


def family_names() -> list[str]:
    """Every family this process can name, without importing any (built-ins first)."""
    names = list(BUILTIN_FAMILIES)
    for name in list(_entry_points()) + list(_REGISTERED):
        if name not in names:
            names.append(name)
    return names


def _load_target(target) -> Any:
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)
    return target.load()


def _install_hint(name: str, target) -> str:
    """What to install: the extra of the same name when the providing distribution has one."""
    dist, dist_name = getattr(target, "dist", None), _distribution_name(target)
    try:
        extras = list(dist.metadata.get_all("Provides-Extra") or []) if dist is not None else []
    except Exception:  # metadata unreadable: a generic hint
        extras = []
    if dist_name and name in extras:
        return f"install the `{name}` extra: pip install '{dist_name}[{name}]'"
    if dist_name:
        return f"install the optional dependencies of {dist_name} that it needs"
    return "install its optional dependencies"


def get_family(name: str) -> ArchitectureFamily:
    """The family called `name`; `InputError` naming the known ones when there is none, and
    saying what to install when its module cannot be imported."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _LOADED:
        return _LOADED[name]
    targets = _entry_points()
    if name not in targets:
        raise InputError(f"unknown architecture {name!r}; known: {', '.join(family_names())}")
    target = targets[name]
    try:
        family = _load_target(target)
    except ImportError as err:
        raise FamilyUnavailable(f"architecture {name!r} is not available: {err}; {_install_hint(name, target)}") from err
    if not isinstance(family, ArchitectureFamily):
        raise InputError(f"entry point {name!r} of group {ENTRY_POINT_GROUP!r} names a "
                         f"{type(family).__name__}, not an ArchitectureFamily")
    if family.name != name:
        raise InputError(f"entry point {name!r} names the family {family.name!r}: the names must agree")
    _LOADED[name] = family
    return family


def available_families() -> list[ArchitectureFamily]:
    """The families whose modules import (the unavailable ones are skipped)."""
    families = []
    for name in family_names():
        try:
            families.append(get_family(name))
        except FamilyUnavailable:
            continue
    return families


__all__ = ["ArchitectureFamily", "ENTRY_POINT_GROUP", "FamilyUnavailable", "available_families", "family_names",
           "get_family", "register_family", "unregister_family"]

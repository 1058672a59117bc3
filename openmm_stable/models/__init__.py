"""Architectures behind one factory, plus saving and loading.

>>> from openmm_stable.models import create_model
>>> model = create_model("schnet", preset="small")        # energies (eV) of a batch
>>> names = family_names()                                 # every family this process knows

Families are found through the entry-point group ``openmm_stable.architectures``
(`openmm_stable.models.registry`), so another package adds one without editing this one.
Ours: ``schnet`` (invariant, our plain-PyTorch SchNet: portable, fast on CPU),
``graph-network`` (torchmd-net's SchNet-type), ``equivariant-transformer`` and
``tensornet`` (torchmd-net). All pass ``torch.jit.script``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import numpy as np

import torch
from torch import nn

from openmm_stable.errors import InputError
from openmm_stable.models.base import NNIP, batch_index, energy_and_forces, model_device, model_dtype
from openmm_stable.models.registry import (ArchitectureFamily, FamilyUnavailable, family_names, get_family,
                                           register_family)


class _FamilyView(Mapping):
    """``ARCHITECTURES``: name -> `ArchitectureFamily`, read live from the registry (listing
    names imports nothing; looking one up imports its module)."""

    def __getitem__(self, name: str) -> ArchitectureFamily:
        if name not in family_names():
            raise KeyError(name)
        return get_family(name)

    def __iter__(self):
        return iter(family_names())

    def __len__(self) -> int:
        return len(family_names())

    def __contains__(self, name) -> bool:
        return name in family_names()


ARCHITECTURES: Mapping[str, ArchitectureFamily] = _FamilyView()


def create_model(architecture: str = "schnet", preset: Optional[str] = "small", **overrides) -> NNIP:
    """A fresh model of `architecture` at size `preset` (one of that family's presets);
    `overrides` change its hyper-parameters. ``preset=None``: the overrides are all of them."""
    family = get_family(architecture)
    hparams = family.hparams(preset, overrides)
    net = family.build(**hparams)
    return NNIP(net, spec={"architecture": architecture, "preset": preset, "hparams": hparams})


def model_from_spec(spec: dict) -> NNIP:
    """An untrained model with the architecture a model file records (``spec``): its
    hparams are all the network needs, whether or not its preset is still known."""
    family = get_family(spec["architecture"])
    preset = spec.get("preset")
    return create_model(spec["architecture"], preset if preset in family.presets else None, **spec["hparams"])


def import_foreign_model(architecture: str, path, allow_pickle: bool = False) -> NNIP:
    """A checkpoint trained by another program (e.g. a MACE ``.model``), read by its
    family's ``load_foreign``; pickle-based files need ``allow_pickle=True``."""
    family = get_family(architecture)
    if family.load_foreign is None:
        able = [name for name in family_names() if _can_load_foreign(name)]
        raise InputError(f"architecture {architecture!r} cannot read checkpoints trained elsewhere; "
                         f"families that can: {', '.join(able) or 'none installed'}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    return family.load_foreign(path, allow_pickle=bool(allow_pickle))


def _can_load_foreign(name: str) -> bool:
    try:
        return get_family(name).load_foreign is not None
    except FamilyUnavailable:
        return False


MODEL_FORMAT = "openmm-stable-model"
MODEL_UNITS = {"length": "Angstrom", "energy": "eV"}


@dataclasses.dataclass
class ModelRecord:
    """What a model file says besides its weights: one record, read by `read_model_record`,
    so that `export`, `simulate`, `refine` and the openmm-ml plugin agree on it."""

    path: str
    spec: dict  # architecture, preset, hparams: enough to rebuild the network
    atomic_numbers: Optional[np.ndarray]  # the molecule it was trained on (None: older files)
    kind: str  # "model", "checkpoint_best", "checkpoint_last", "refined"
    training_temperature_K: Optional[float]
    dataset_fingerprint: Optional[str]
    units: dict
    versions: dict
    payload: dict = dataclasses.field(repr=False, default_factory=dict)  # everything else the file holds

    @property
    def architecture(self) -> str:
        return self.spec.get("architecture", "?")

    @property
    def cutoff(self) -> Optional[float]:
        return self.spec.get("hparams", {}).get("cutoff")


def _package_versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in ("openmm-stable", "torch", "openmm", "openmmtorch", "torchmd-net"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_model(model: NNIP, path, atomic_numbers=None, training_temperature_K: Optional[float] = None,
               dataset_fingerprint: Optional[str] = None, kind: str = "model", **extra) -> None:
    """Write weights, the spec that rebuilds the model and the `ModelRecord` fields (plus
    any `extra` data), atomically."""
    from openmm_stable.io import save_torch_file

    payload = {**extra, "format": MODEL_FORMAT, "version": 2, "spec": model.spec, "state_dict": model.state_dict(),
               "kind": kind, "units": MODEL_UNITS, "versions": _package_versions(),
               "atomic_numbers": None if atomic_numbers is None else np.asarray(atomic_numbers, dtype=np.int64).reshape(-1),
               "training_temperature_K": None if training_temperature_K is None else float(training_temperature_K),
               "dataset_fingerprint": dataset_fingerprint}
    save_torch_file(payload, path)


def read_model_record(path, map_location="cpu") -> ModelRecord:
    """The record of a file written by `save_model`, with clear errors for anything else;
    a file that would need pickle to open is refused unopened (`openmm_stable.io`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    from openmm_stable.io import load_torch_file

    payload = load_torch_file(path, map_location)  # weights only: never runs code from the file
    if not isinstance(payload, dict) or "spec" not in payload or "state_dict" not in payload:
        raise InputError(f"{path}: not an openmm-stable model file (no 'spec'/'state_dict')")
    numbers = payload.get("atomic_numbers")
    return ModelRecord(
        path=str(path), spec=payload["spec"],
        atomic_numbers=None if numbers is None else np.asarray(numbers, dtype=np.int64).reshape(-1),
        kind=str(payload.get("kind", "model")), training_temperature_K=payload.get("training_temperature_K"),
        dataset_fingerprint=payload.get("dataset_fingerprint"), units=payload.get("units", MODEL_UNITS),
        versions=payload.get("versions", {}), payload=payload)


def model_from_record(record: ModelRecord) -> NNIP:
    model = model_from_spec(record.spec)
    model.load_state_dict(record.payload["state_dict"])
    return model


def load_model(path, map_location="cpu") -> NNIP:
    """Rebuild a model written by `save_model` (or a pre-training checkpoint)."""
    return model_from_record(read_model_record(path, map_location))


__all__ = [
    "ARCHITECTURES", "ArchitectureFamily", "NNIP", "ModelRecord", "create_model", "save_model", "load_model",
    "read_model_record", "model_from_record", "model_from_spec", "import_foreign_model",
    "family_names", "get_family", "register_family",
    "energy_and_forces", "batch_index", "model_device", "model_dtype",
]

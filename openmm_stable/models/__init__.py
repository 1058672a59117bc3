"""Architectures behind one factory, plus saving and loading.

>>> from openmm_stable.models import create_model
>>> model = create_model("schnet", preset="small")        # energies (eV) of a batch
>>> names = list(ARCHITECTURES)                            # every family we ship

Families: ``schnet`` (invariant, our plain-PyTorch SchNet: portable, fast on CPU),
``graph-network`` (torchmd-net's SchNet-type), ``equivariant-transformer`` and
``tensornet`` (torchmd-net). All pass ``torch.jit.script``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional

import numpy as np

import torch
from torch import nn

from openmm_stable.errors import InputError
from openmm_stable.models.base import NNIP, batch_index, energy_and_forces, model_device, model_dtype


@dataclasses.dataclass(frozen=True)
class Preset:
    features: int
    layers: int
    n_rbf: int
    cutoff: float = 5.0


PRESETS = {
    "tiny": Preset(features=16, layers=1, n_rbf=16),
    "small": Preset(features=64, layers=3, n_rbf=32),
    "medium": Preset(features=128, layers=4, n_rbf=50),
    "large": Preset(features=256, layers=6, n_rbf=64, cutoff=6.0),
}


def _schnet(features, layers, n_rbf, cutoff):
    from openmm_stable.models.schnet import SchNet

    return SchNet(features=features, layers=layers, n_rbf=n_rbf, cutoff=cutoff)


def _torchmdnet(architecture: str) -> Callable[..., nn.Module]:
    def build(features, layers, n_rbf, cutoff):
        from openmm_stable.models.torchmdnet import build_torchmdnet

        heads = 8 if features % 8 == 0 else 1
        return build_torchmdnet(architecture, features, layers, n_rbf, cutoff, num_heads=heads)

    return build


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "schnet": _schnet,
    "graph-network": _torchmdnet("graph-network"),
    "equivariant-transformer": _torchmdnet("equivariant-transformer"),
    "tensornet": _torchmdnet("tensornet"),
}


def create_model(architecture: str = "schnet", preset: str = "small", **overrides) -> NNIP:
    """A fresh model of `architecture` at size `preset`; `overrides` change preset fields."""
    if architecture not in ARCHITECTURES:
        raise InputError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    hparams = dataclasses.asdict(dataclasses.replace(PRESETS[preset], **overrides))
    net = ARCHITECTURES[architecture](**hparams)
    return NNIP(net, spec={"architecture": architecture, "preset": preset, "hparams": hparams})


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
    spec = record.spec
    model = create_model(spec["architecture"], spec.get("preset", "small"), **spec["hparams"])
    model.load_state_dict(record.payload["state_dict"])
    return model


def load_model(path, map_location="cpu") -> NNIP:
    """Rebuild a model written by `save_model` (or a pre-training checkpoint)."""
    return model_from_record(read_model_record(path, map_location))


__all__ = [
    "ARCHITECTURES", "PRESETS", "NNIP", "ModelRecord", "create_model", "save_model", "load_model",
    "read_model_record", "model_from_record",
    "energy_and_forces", "batch_index", "model_device", "model_dtype",
]

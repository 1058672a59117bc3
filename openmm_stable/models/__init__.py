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
from typing import Callable

import torch
from torch import nn

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
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    hparams = dataclasses.asdict(dataclasses.replace(PRESETS[preset], **overrides))
    net = ARCHITECTURES[architecture](**hparams)
    return NNIP(net, spec={"architecture": architecture, "preset": preset, "hparams": hparams})


def save_model(model: NNIP, path, **extra) -> None:
    """Write weights and the spec needed to rebuild the model (plus any `extra` data)."""
    payload = {"format": "openmm-stable-model", "version": 1, "spec": model.spec,
               "state_dict": model.state_dict(), **extra}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_model(path, map_location="cpu") -> NNIP:
    """Rebuild a model written by `save_model` (or a pre-training checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:
        raise ValueError(f"{path}: not a readable openmm-stable model file ({err})") from None
    if not isinstance(payload, dict) or "spec" not in payload or "state_dict" not in payload:
        raise ValueError(f"{path}: not an openmm-stable model file (no 'spec'/'state_dict')")
    spec = payload["spec"]
    model = create_model(spec["architecture"], spec.get("preset", "small"), **spec["hparams"])
    model.load_state_dict(payload["state_dict"])
    return model


__all__ = [
    "ARCHITECTURES", "PRESETS", "NNIP", "create_model", "save_model", "load_model",
    "energy_and_forces", "batch_index", "model_device", "model_dtype",
]

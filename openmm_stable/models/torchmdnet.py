"""TorchMD-Net architectures (graph network, equivariant transformer, TensorNet).

Exported TorchScript files of these models call warp-based neighbour-list ops that are
registered by ``import torchmdnet.models.model``: the families' ``extension_imports``, which
`openmm_stable.export.load_exported` and `make_torch_force` import before loading a file.
Importing this module quiets warp's banner before torchmd-net imports warp.
"""
from __future__ import annotations

import os
from typing import Optional

from torch import Tensor, nn


def _quiet_warp() -> None:
    """Silence warp's start-up banner, printed on every process start otherwise."""
    try:
        import warp

        warp.config.log_level = 30  # warnings and above
    except Exception:  # warp missing or changed: the banner is only cosmetic
        pass


_quiet_warp()

# Our name -> torchmd-net's `model` argument.
TORCHMDNET_NAMES = {
    "graph-network": "graph-network",
    "equivariant-transformer": "equivariant-transformer",
    "tensornet": "tensornet",
}


class TorchMDNetEnergy(nn.Module):
    """Adapts a TorchMD_Net (derivative=False) to the model protocol (energies only)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        energy, _ = self.model(z, pos, batch, box)
        return energy.reshape(-1)


def build_torchmdnet(architecture: str, features: int, layers: int, n_rbf: int, cutoff: float,
                     max_neighbors: int = 64, num_heads: int = 8) -> nn.Module:
    os.environ.setdefault("WARP_QUIET", "1")
    from torchmdnet.models.model import create_model

    args = {
        "model": TORCHMDNET_NAMES[architecture],
        "embedding_dimension": features,
        "num_layers": layers,
        "num_rbf": n_rbf,
        "rbf_type": "expnorm",
        "trainable_rbf": False,
        "activation": "silu",
        "cutoff_lower": 0.0,
        "cutoff_upper": cutoff,
        "max_z": 119,
        "max_num_neighbors": max_neighbors,
        "aggr": "add",
        "neighbor_embedding": True,
        "attn_activation": "silu",
        "num_heads": num_heads,
        "distance_influence": "both",
        "equivariance_invariance_group": "O(3)",
        "derivative": False,
        "atom_filter": -1,
        "prior_model": None,
        "output_model": "Scalar",
        "reduce_op": "add",
        "precision": 32,
        "static_shapes": False,
    }
    return TorchMDNetEnergy(create_model(args))


# The same four sizes as the other families; the hyper-parameters a model file records.
PRESETS = {
    "tiny": {"features": 16, "layers": 1, "n_rbf": 16, "cutoff": 5.0},
    "small": {"features": 64, "layers": 3, "n_rbf": 32, "cutoff": 5.0},
    "medium": {"features": 128, "layers": 4, "n_rbf": 50, "cutoff": 5.0},
    "large": {"features": 256, "layers": 6, "n_rbf": 64, "cutoff": 6.0},
}


def _family(architecture: str, description: str):
    from openmm_stable.models.registry import ArchitectureFamily

    def build(features: int, layers: int, n_rbf: int, cutoff: float) -> nn.Module:
        heads = 8 if features % 8 == 0 else 1  # attention heads must divide the width
        return build_torchmdnet(architecture, features, layers, n_rbf, cutoff, num_heads=heads)

    return ArchitectureFamily(name=architecture, presets=PRESETS, build=build,
                              extension_imports=("torchmdnet.models.model",), description=description)


# The registry's entries (group openmm_stable.architectures).
GRAPH_NETWORK = _family("graph-network", "torchmd-net's SchNet-type graph network")
EQUIVARIANT_TRANSFORMER = _family("equivariant-transformer", "torchmd-net's equivariant transformer")
TENSORNET = _family("tensornet", "torchmd-net's TensorNet")

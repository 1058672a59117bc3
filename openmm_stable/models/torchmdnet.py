"""TorchMD-Net architectures (graph network, equivariant transformer, TensorNet).

Exported TorchScript files of these models call warp-based neighbour-list ops that are
registered by ``import torchmdnet.models.model``; `openmm_stable.export.load_exported`
and the openmm-ml plugin do that import before loading.
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

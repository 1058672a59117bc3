"""Exponential moving average of a model's weights (pre-training's ``ema_decay``)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """Exponential moving average of a model's floating-point state (weights and buffers).

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so the
    average is not dominated by the random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.n_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n_updates += 1
        decay = min(self.decay, (1.0 + self.n_updates) / (10.0 + self.n_updates))
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].mul_(decay).add_(value.detach(), alpha=1.0 - decay)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Temporarily load the averaged weights into `model`."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "n_updates": self.n_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.n_updates = int(state["n_updates"])
        for name, value in state["shadow"].items():
            if name in self.shadow:
                self.shadow[name].copy_(value)

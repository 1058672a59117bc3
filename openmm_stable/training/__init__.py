"""Training: QM pre-training (and, later, StABlE refinement).

Usage::

    from openmm_stable.training import PretrainConfig, pretrain
    model, metrics = pretrain(dataset, PretrainConfig(preset="small"), "runs/aspirin")
"""
from openmm_stable.training.batching import Batch, FrameTensors, energy_force_loss, evaluate, loss_from_metrics
from openmm_stable.training.ema import EMA
from openmm_stable.training.pretrain import (
    PretrainConfig,
    TrainingDivergedError,
    fit_atom_energies,
    fit_energy_scale,
    pretrain,
)

__all__ = [
    "Batch",
    "EMA",
    "FrameTensors",
    "PretrainConfig",
    "TrainingDivergedError",
    "energy_force_loss",
    "evaluate",
    "fit_atom_energies",
    "fit_energy_scale",
    "loss_from_metrics",
    "pretrain",
]

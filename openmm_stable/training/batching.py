"""QM frames as torch minibatches, the energy/force loss, and error metrics.

Shared by pre-training and by StABlE training (where the QM loss is the regulariser), so
both measure errors the same way.

Usage::

    frames = FrameTensors(train_ds, device="cpu")
    for batch in frames.batches(32, shuffle=True, rng=np.random.default_rng(0)):
        loss, metrics = energy_force_loss(model, batch, energy_weight=1.0, force_weight=100.0)
    print(evaluate(model, test_ds))   # {'energy_mae_meV': ..., 'force_mae_meV_per_A': ..., ...}

Loss convention: errors are divided by ``model.energy_scale`` (eV, or eV/A for forces;
see `openmm_stable.training.pretrain`) so the loss is dimensionless and the weights mean
the same on any molecule. Energy term: mean over structures of the squared error of the
total energy; force term: mean over atoms and Cartesian components of the squared error.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from openmm_stable.errors import InputError
from openmm_stable.data.dataset import QMDataset
from openmm_stable.models.base import energy_and_forces


@dataclasses.dataclass
class Batch:
    """One minibatch in the model protocol's layout (flat atoms + structure index) plus labels."""

    z: Tensor  # (B*N,) long
    pos: Tensor  # (B*N, 3) model dtype, Angstrom
    batch: Tensor  # (B*N,) long, structure index, sorted
    energies: Optional[Tensor]  # (B,) float64, eV
    forces: Optional[Tensor]  # (B*N, 3) model dtype, eV/Angstrom
    box: Optional[Tensor] = None  # (3, 3) Angstrom or None

    @property
    def n_structures(self) -> int:
        return int(self.batch[-1].item()) + 1 if self.batch.numel() > 0 else 0


class FrameTensors:
    """A `QMDataset` converted to tensors on one device once, then cut into minibatches.

    Converting once avoids a numpy->torch copy per step; all frames share one composition,
    so a batch is an index into the (F, N, 3) arrays plus a tiled ``z`` and ``batch``.
    """

    def __init__(self, dataset: QMDataset, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.n_atoms = dataset.n_atoms
        self.z = torch.as_tensor(dataset.atomic_numbers, dtype=torch.long, device=self.device)
        self.positions = torch.as_tensor(dataset.positions, dtype=dtype, device=self.device)
        self.energies = None if dataset.energies is None else torch.as_tensor(dataset.energies, dtype=torch.float64, device=self.device)
        self.forces = None if dataset.forces is None else torch.as_tensor(dataset.forces, dtype=dtype, device=self.device)
        self.box = None if dataset.box is None else torch.as_tensor(dataset.box, dtype=dtype, device=self.device)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def batch(self, indices: Union[Sequence[int], np.ndarray, Tensor]) -> Batch:
        """The frames at `indices` as one `Batch`."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=self.device)
        b = int(idx.numel())
        return Batch(
            z=self.z.repeat(b),
            pos=self.positions[idx].reshape(-1, 3),
            batch=torch.arange(b, device=self.device).repeat_interleave(self.n_atoms),
            energies=None if self.energies is None else self.energies[idx],
            forces=None if self.forces is None else self.forces[idx].reshape(-1, 3),
            box=self.box,
        )

    def batches(self, batch_size: int, shuffle: bool = False, rng: Optional[np.random.Generator] = None) -> Iterator[Batch]:
        """All frames in minibatches of `batch_size` (the last may be smaller); `rng` orders them if `shuffle`."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        order = np.arange(len(self))
        if shuffle:
            order = (rng if rng is not None else np.random.default_rng()).permutation(len(self))
        for start in range(0, len(self), batch_size):
            yield self.batch(order[start : start + batch_size])


def _scale(model: nn.Module) -> Tensor:
    scale = getattr(model, "energy_scale", None)
    return torch.ones((), dtype=torch.float64) if scale is None else scale.detach().to(torch.float64)


def energy_force_loss(model: nn.Module, batch: Batch, energy_weight: float = 1.0, force_weight: float = 100.0) -> tuple[Tensor, dict]:
    """Weighted energy + force MSE (in units of ``model.energy_scale``) and its metrics.

    The returned loss keeps the graph (forces are computed with ``create_graph=True``) so it
    can be back-propagated into the parameters. Metrics are plain floats: ``loss``,
    ``energy_mae_meV`` (per structure), ``force_mae_meV_per_A`` (per component).
    """
    if batch.energies is None or (force_weight > 0 and batch.forces is None):
        raise InputError("energy_force_loss needs energy labels (and force labels when force_weight > 0)")
    scale = _scale(model).to(batch.energies.device)
    if force_weight > 0:
        energies, forces = energy_and_forces(model, batch.z, batch.pos, batch.batch, batch.box, create_graph=True)
    else:
        energies, forces = model(batch.z, batch.pos, batch.batch, batch.box), None
    energy_error = energies.to(torch.float64) - batch.energies
    loss = energy_weight * torch.mean((energy_error / scale) ** 2)
    metrics = {"energy_mae_meV": 1e3 * energy_error.detach().abs().mean().item()}
    if forces is not None:
        force_error = (forces - batch.forces).to(torch.float64)
        loss = loss + force_weight * torch.mean((force_error / scale) ** 2)
        metrics["force_mae_meV_per_A"] = 1e3 * force_error.detach().abs().mean().item()
    metrics["loss"] = loss.detach().item()
    return loss, metrics


def evaluate(model: nn.Module, dataset: Union[QMDataset, FrameTensors], batch_size: int = 64) -> dict:
    """Errors of `model` on every frame of `dataset` (eval mode, no parameter gradients).

    Returns ``energy_mae_meV``, ``energy_rmse_meV`` (per structure), ``force_mae_meV_per_A``,
    ``force_rmse_meV_per_A`` (per Cartesian component; None without force labels) and ``n_frames``.
    """
    if isinstance(dataset, QMDataset):
        param = next(iter(model.parameters()))
        dataset = FrameTensors(dataset, device=param.device, dtype=param.dtype)
    if dataset.energies is None:
        raise InputError("evaluate needs a dataset with energy labels")
    was_training = model.training
    model.eval()
    e_abs = e_sq = f_abs = f_sq = 0.0
    n_structures = n_components = 0
    try:
        for batch in dataset.batches(batch_size):
            if batch.forces is not None:
                with torch.enable_grad():
                    energies, forces = energy_and_forces(model, batch.z, batch.pos, batch.batch, batch.box)
                f_err = (forces.detach() - batch.forces).to(torch.float64)
                f_abs += f_err.abs().sum().item()
                f_sq += (f_err**2).sum().item()
                n_components += f_err.numel()
            else:
                with torch.no_grad():
                    energies = model(batch.z, batch.pos, batch.batch, batch.box)
            e_err = energies.detach().to(torch.float64) - batch.energies
            e_abs += e_err.abs().sum().item()
            e_sq += (e_err**2).sum().item()
            n_structures += e_err.numel()
    finally:
        model.train(was_training)
    return {
        "energy_mae_meV": 1e3 * e_abs / n_structures,
        "energy_rmse_meV": 1e3 * (e_sq / n_structures) ** 0.5,
        "force_mae_meV_per_A": 1e3 * f_abs / n_components if n_components else None,
        "force_rmse_meV_per_A": 1e3 * (f_sq / n_components) ** 0.5 if n_components else None,
        "n_frames": n_structures,
    }


@torch.no_grad()
def refit_energy_shift(model: nn.Module, frames: FrameTensors, batch_size: int = 256) -> float:
    """Move the model's constant energy offset to the least-squares value on `frames`.

    A constant shift of U changes no force and no Boltzmann average, so force-heavy
    losses and the Boltzmann estimator leave it nearly undetermined and optimizer noise
    moves it freely (validation energy errors were seen jumping from ~90 to ~700 meV between
    epochs). Re-fitting it is exact and cheap; the shift is spread equally over the atoms of
    the single composition (``model.atom_energies``). Returns the shift in eV per structure."""
    if frames.energies is None or not hasattr(model, "atom_energies"):
        return 0.0
    residual, count = 0.0, 0
    for batch in frames.batches(batch_size):
        energies = model(batch.z, batch.pos, batch.batch, batch.box)
        residual += float((batch.energies - energies).sum())
        count += batch.n_structures
    shift = residual / count
    present = torch.unique(frames.z)
    model.atom_energies[present] += shift / frames.n_atoms
    return shift


def loss_from_metrics(metrics: dict, energy_scale: float, energy_weight: float, force_weight: float) -> float:
    """The `energy_force_loss` value over a whole dataset, from `evaluate`'s RMSEs (no second pass)."""
    loss = energy_weight * (metrics["energy_rmse_meV"] * 1e-3 / energy_scale) ** 2
    if force_weight > 0 and metrics.get("force_rmse_meV_per_A") is not None:
        loss += force_weight * (metrics["force_rmse_meV_per_A"] * 1e-3 / energy_scale) ** 2
    return float(loss)


__all__ = ["Batch", "FrameTensors", "energy_force_loss", "evaluate", "loss_from_metrics", "refit_energy_shift"]

"""The Boltzmann estimator: gradients of losses of ensemble averages, in one backward pass.

For an observable O(x) in R^d averaged over samples x_k ~ exp(-beta U_theta(x)) and a loss
L(<O>), with a = dL/d<O>:

    dL/dtheta = beta / K * sum_k (<a.O> - a.O(x_k)) * dU_theta(x_k)/dtheta

The coefficients c_k = beta * (<a.O> - a.O(x_k)) / K are plain numbers, so the gradient
is the gradient of the surrogate S(theta) = sum_k c_k U_theta(x_k): one backward pass over
the frames, no per-sample Jacobian and no backpropagation through the trajectory.

We keep beta = 1/kT (in 1/eV, as U is in eV), so the gradient is the true derivative of
the loss; the paper's reference code drops beta and folds it into the learning rate.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from openmm_stable.units import kT_eV

EnergyFn = Callable[[Tensor], Tensor]  # frames (k, N, 3) -> energies (k,) in eV


# --- losses of <O> --------------------------------------------------------------------------
LOSSES = ("mse", "mae", "hinge_above", "hinge_below")


@dataclasses.dataclass
class ObservableLoss:
    """L(<O>) against a target: mse, mae, or a squared hinge that only penalises <O>
    above (``hinge_above``, an upper bound) or below (``hinge_below``, a lower bound)."""

    target: Tensor
    kind: str = "mse"

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"unknown observable loss {self.kind!r}; known: {', '.join(LOSSES)}")
        self.target = torch.as_tensor(self.target, dtype=torch.float64)

    def __call__(self, mean: Tensor) -> Tensor:
        diff = mean.to(torch.float64) - self.target.to(mean.device)
        if self.kind == "mse":
            return (diff**2).mean()
        if self.kind == "mae":
            return diff.abs().mean()
        if self.kind == "hinge_above":
            return (torch.relu(diff) ** 2).mean()
        return (torch.relu(-diff) ** 2).mean()


# --- the estimator ---------------------------------------------------------------------------
@dataclasses.dataclass
class EstimatorResult:
    loss: float  # L(<O>)
    mean: Tensor  # <O> (d,)
    coefficients: Tensor  # c_k (K,)


def boltzmann_coefficients(values: Tensor, loss_fn: Callable[[Tensor], Tensor], temperature_K: float) -> EstimatorResult:
    """c_k = beta (<a.O> - a.O(x_k)) / K from per-frame observables `values` (K, d)."""
    values = values.detach().to(torch.float64)
    K = values.shape[0]
    if K < 2:
        raise ValueError("the Boltzmann estimator needs at least two frames")
    mean = values.mean(0).requires_grad_(True)
    loss = loss_fn(mean)
    (a,) = torch.autograd.grad(loss, mean)
    projected = values @ a  # a.O(x_k)
    beta = 1.0 / kT_eV(temperature_K)
    coefficients = beta * (projected.mean() - projected) / K
    return EstimatorResult(float(loss.detach()), mean.detach(), coefficients)


def surrogate_backward(energy_fn: EnergyFn, frames: Tensor, coefficients: Tensor, minibatch: Optional[int] = None) -> None:
    """Accumulate d/dtheta sum_k c_k U_theta(x_k) into the parameters' .grad, in minibatches
    of frames so memory stays bounded (gradients add up across minibatches)."""
    K = frames.shape[0]
    step = K if not minibatch else int(minibatch)
    for start in range(0, K, step):
        chunk = slice(start, start + step)
        energies = energy_fn(frames[chunk])
        (coefficients[chunk].to(energies) * energies).sum().backward()


def boltzmann_gradient(energy_fn: EnergyFn, frames: Tensor, values: Tensor, loss_fn: Callable[[Tensor], Tensor],
                       temperature_K: float, minibatch: Optional[int] = None) -> EstimatorResult:
    """Gradient of L(<O>) w.r.t. the parameters behind `energy_fn`, accumulated into .grad."""
    result = boltzmann_coefficients(values, loss_fn, temperature_K)
    surrogate_backward(energy_fn, frames, result.coefficients, minibatch)
    return result


def model_energy_fn(model: nn.Module, atomic_numbers: Tensor, box: Optional[Tensor] = None) -> EnergyFn:
    """Energies (k,) of k frames (k, N, 3) of one molecule under a model of the protocol."""
    z = torch.as_tensor(atomic_numbers, dtype=torch.long)
    dtype = next(iter(model.parameters())).dtype
    device = next(iter(model.parameters())).device

    def energy(frames: Tensor) -> Tensor:
        k, n = frames.shape[0], frames.shape[1]
        batch = torch.arange(k, device=device).repeat_interleave(n)
        return model(z.to(device).repeat(k), frames.reshape(-1, 3).to(device=device, dtype=dtype), batch, box)

    return energy


def jacobian_gradient(model: nn.Module, energy_fn: EnergyFn, frames: Tensor, values: Tensor,
                      loss_fn: Callable[[Tensor], Tensor], temperature_K: float) -> list[Tensor]:
    """The per-sample-Jacobian form (as in the paper's reference code): materialise
    dU(x_k)/dtheta for every frame (K x n_params), then contract. For checks and the
    benchmark only; `boltzmann_gradient` gives the same numbers with one backward pass."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for k in range(frames.shape[0]):
        energy = energy_fn(frames[k:k + 1]).sum()
        grads = torch.autograd.grad(energy, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    jacobian = torch.stack(rows).to(torch.float64)  # (K, P)
    values = values.detach().to(torch.float64)
    mean = values.mean(0).requires_grad_(True)
    (a,) = torch.autograd.grad(loss_fn(mean), mean)
    projected = values @ a
    beta = 1.0 / kT_eV(temperature_K)
    # beta * ( <a.O><dU> - <a.O dU> )
    flat = beta * (projected.mean() * jacobian.mean(0) - (projected[:, None] * jacobian).mean(0))
    out, offset = [], 0
    for p in params:
        out.append(flat[offset:offset + p.numel()].reshape(p.shape).to(p.dtype))
        offset += p.numel()
    return out

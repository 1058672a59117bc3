"""The parts a learning step is made of, one idea each, composed by the learning modes
(`openmm_stable.training.stable.StableTrainer` and its subclasses):

* `ObservableObjective`: what the simulated frames are scored on, and the Boltzmann-
  estimator gradient of that score (one backward pass of the surrogate), with the
  split-half cosine that says whether the frames determine it;
* `EnergyForceRegulariser`: the QM energy/force loss on the static training frames and its
  gradient (a minibatch or the whole set);
* `StepRule`: the optimizer, its warm-up, gradient clipping and the plateau schedule;
* `ForceBudget`: a trust region on the QM fit: energy/force-only steps after a learning
  step until the training-set force MAE is back within budget, by the learning optimizer
  or by an L-BFGS of its own.

Loss scales and counters live in the trainer's `LoopState` (they are checkpointed); the
parts take them as arguments, so each can be read and tested alone.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from openmm_stable.training.batching import FrameTensors, energy_force_loss, evaluate, refit_energy_shift
from openmm_stable.training.estimator import (EstimatorResult, ObservableLoss, boltzmann_coefficients,
                                              local_boltzmann_coefficients, model_atom_energy_fn, model_energy_fn,
                                              surrogate_backward)


def flat_gradient(model: nn.Module) -> torch.Tensor:
    """All parameters' .grad as one float64 vector (zeros where a parameter has none)."""
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).detach().double().reshape(-1)
                      for p in model.parameters()])


def gradient_norm(grads) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))


class ObservableObjective:
    """The observable term of the learning loss: L(<O>) ("ensemble") or <L(O(x))>
    ("per_frame") over simulated frames, and its Boltzmann-estimator gradient
    (beta = 1/kT at `temperature_K`). With `local_neighbourhoods`, every atom's
    environment in a periodic box is a sample (per-atom energies)."""

    def __init__(self, observable, loss_fn: ObservableLoss, atomic_numbers, box_angstrom, box_tensor,
                 temperature_K: float, per_frame: bool = False, local_neighbourhoods: bool = False,
                 neighbourhood_radius: Optional[float] = None, minibatch: int = 256):
        self.observable, self.loss_fn = observable, loss_fn
        self.z, self.box_angstrom, self.box = atomic_numbers, box_angstrom, box_tensor
        self.temperature_K, self.per_frame = temperature_K, per_frame
        self.local_neighbourhoods, self.neighbourhood_radius = local_neighbourhoods, neighbourhood_radius
        self.minibatch = minibatch

    def loss_of(self, frames: np.ndarray) -> float:
        """The objective's value on `frames` (no gradient)."""
        values = self.observable(torch.as_tensor(frames, dtype=torch.float64), self.z, self.box_angstrom)
        return float(self.loss_fn(values).mean() if self.per_frame else self.loss_fn(values.mean(0)))

    def backward(self, model: nn.Module, x: torch.Tensor) -> tuple[EstimatorResult, Optional[int]]:
        """Accumulate the estimator gradient of the plain (unweighted) objective over frames
        `x` into .grad; returns the estimator result and, for local neighbourhoods, the
        number of local samples."""
        if self.local_neighbourhoods:
            blocks = self.observable.local_samples(x, self.z, self.box_angstrom, self.neighbourhood_radius)
            result = local_boltzmann_coefficients(blocks, self.loss_fn, self.temperature_K)
            surrogate_backward(model_atom_energy_fn(model, self.z, self.box), x, result.atom_weights,
                               minibatch=self.minibatch)
            return result, result.n_samples
        values = self.observable(x, self.z, self.box_angstrom)
        result = boltzmann_coefficients(values, self.loss_fn, self.temperature_K, self.per_frame)
        surrogate_backward(model_energy_fn(model, self.z, self.box), x, result.coefficients, minibatch=self.minibatch)
        return result, None

    def split_half_cosine(self, model: nn.Module, x: torch.Tensor, replica_of_sample: np.ndarray) -> Optional[float]:
        """Cosine between the gradients of two disjoint halves of the replicas: about 1 when
        the samples determine the step, about 0 when it is noise (None: too few samples).
        Leaves .grad zeroed."""
        replicas = np.unique(replica_of_sample)
        if replicas.size < 2:
            return None
        halves = np.isin(replica_of_sample, replicas[::2]), np.isin(replica_of_sample, replicas[1::2])
        if min(int(h.sum()) for h in halves) < 2:
            return None
        grads = []
        for half in halves:
            model.zero_grad(set_to_none=False)
            self.backward(model, x[torch.as_tensor(half)])
            grads.append(flat_gradient(model))
        model.zero_grad(set_to_none=False)
        return float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0))


class EnergyForceRegulariser:
    """The QM term: the energy/force loss of pre-training on the training frames, its
    gradient over a minibatch of `batch_size` frames (None: the whole set)."""

    def __init__(self, frames: FrameTensors, energy_weight: float, force_weight: float,
                 batch_size: Optional[int], rng: np.random.Generator):
        self.frames, self.energy_weight, self.force_weight = frames, energy_weight, force_weight
        self.batch_size, self.rng = batch_size, rng

    def _chunks(self, whole_training_set: bool) -> list[np.ndarray]:
        n = len(self.frames)
        if self.batch_size is None or whole_training_set:
            return [np.arange(k, min(k + 64, n)) for k in range(0, n, 64)]
        return [self.rng.choice(n, size=min(self.batch_size, n), replace=False)]

    def backward(self, model: nn.Module, scale: float, whole_training_set: bool = False) -> float:
        """Accumulate scale x dL_ef/dtheta into .grad (frames averaged); returns scale x L_ef."""
        chunks = self._chunks(whole_training_set)
        total, value = sum(len(c) for c in chunks), 0.0
        for idx in chunks:
            loss, _ = energy_force_loss(model, self.frames.batch(idx), self.energy_weight, self.force_weight)
            weighted = scale * len(idx) / total * loss
            weighted.backward()
            value += float(weighted.detach())
        return value

    def loss(self, model: nn.Module, max_frames: int = 256) -> float:
        """The loss on (up to) `max_frames` random training frames, no gradient."""
        idx = self.rng.choice(len(self.frames), size=min(max_frames, len(self.frames)), replace=False)
        total = 0.0
        for start in range(0, len(idx), 64):
            part = idx[start:start + 64]
            loss, _ = energy_force_loss(model, self.frames.batch(part), self.energy_weight, self.force_weight)
            total += float(loss.detach()) * len(part)
        return max(total / len(idx), 1e-12)


class StepRule:
    """Optimizer (Adam or SGD), linear warm-up over its first `warmup_steps` steps, the
    gradient clipped to `grad_clip`, and ReduceLROnPlateau on a metric the trainer picks.

    Adam's first updates move every parameter by about lr whatever its gradient; on a
    pre-trained model that alone raised the validation force MAE by 65 % (129 -> 212
    meV/A, aspirin SchNet-small, lr 3e-4): hence the warm-up. The scheduler sees the base rate."""

    def __init__(self, model: nn.Module, optimizer: str, lr: float, grad_clip: Optional[float], warmup_steps: int,
                 lr_factor: float, lr_patience: int):
        opt_cls = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
        self.params = list(model.parameters())
        self.optimizer = opt_cls(self.params, lr=lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=lr_factor,
                                                                    patience=lr_patience)
        self.grad_clip, self.warmup_steps = grad_clip, warmup_steps

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def clip(self) -> float:
        """Clip the summed gradient; returns its norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf")))

    def step(self, steps_taken: int) -> None:
        """One step at lr * (k+1)/(warmup+1) for the k-th step of this optimizer (k < warmup)."""
        fraction = min(1.0, (steps_taken + 1) / (self.warmup_steps + 1))
        base = [group["lr"] for group in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, base):
            group["lr"] = lr * fraction
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, base):
            group["lr"] = lr

    def schedule(self, metric: float) -> bool:
        """Feed the plateau schedule; True when it lowered the rate."""
        before = self.lr
        self.scheduler.step(metric)
        return self.lr < before


class ForceBudget:
    """Keep the training-set force MAE within `budget` x its value at the first step: after
    a learning step, energy/force-only steps until it is back (at most `max_steps`). The
    observable moves the model only as far as the QM fit allows. Measured on a fixed subset
    of training frames (the same frames at every step); no QM data is held back for it.

    `optimizer` "shared" steps with the learning optimizer (its moments carry the observable
    gradient into the restore, and sign-like Adam steps cannot settle into a narrow band:
    B6 of the notes); "lbfgs" makes an L-BFGS of its own for each restore."""

    def __init__(self, frames: FrameTensors, budget: float, max_steps: int, optimizer: str = "shared"):
        self.frames, self.budget, self.max_steps, self.optimizer = frames, budget, max_steps, optimizer

    def mae(self, model: nn.Module) -> float:
        return float(evaluate(model, self.frames)["force_mae_meV_per_A"])

    def restore(self, model: nn.Module, start_mae: float, regulariser: EnergyForceRegulariser, scale: float,
                step_rule: StepRule, training_frames: FrameTensors) -> tuple[float, int]:
        """(force MAE after, restore steps taken)."""
        mae, steps = self.mae(model), 0
        lbfgs = None
        while mae > self.budget * start_mae and steps < self.max_steps:
            if self.optimizer == "lbfgs":
                lbfgs = lbfgs or torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=1, history_size=10,
                                                   line_search_fn="strong_wolfe")

                def closure():
                    lbfgs.zero_grad(set_to_none=False)
                    return regulariser.backward(model, scale, whole_training_set=True)

                lbfgs.step(closure)
            else:
                step_rule.optimizer.zero_grad(set_to_none=False)
                regulariser.backward(model, scale, whole_training_set=True)
                step_rule.clip()
                step_rule.optimizer.step()
            refit_energy_shift(model, training_frames)
            mae, steps = self.mae(model), steps + 1
        return mae, steps


def predicted_change(gradient: list, after: list, before: list) -> float:
    """First-order change of a loss from a step: dL/dtheta . (theta_after - theta_before)."""
    return float(sum((g.double() * (a.detach() - b).double()).sum() for g, a, b in zip(gradient, after, before)))


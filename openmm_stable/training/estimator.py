"""The Boltzmann estimator: gradients of losses of ensemble averages, in one backward pass.

For an observable O(x) in R^d averaged over samples x_k ~ exp(-beta U_theta(x)) and a loss
L(<O>), with a = dL/d<O>:

    dL/dtheta = beta / K * sum_k (<a.O> - a.O(x_k)) * dU_theta(x_k)/dtheta

The coefficients c_k = beta * (<a.O> - a.O(x_k)) / K are plain numbers, so the gradient
is the gradient of the surrogate S(theta) = sum_k c_k U_theta(x_k): one backward pass over
the frames, no per-sample Jacobian and no backpropagation through the trajectory.

We keep beta = 1/kT (in 1/eV, as U is in eV), so the gradient is the true derivative of
the loss; the paper's reference code drops beta and folds it into the learning rate.

Two objectives (``per_frame``). The ensemble objective above, L(<O>), matches the average
and cares about a single frame only through its small share of <O>. The per-frame
objective, <L(O(x))> (the paper's code without its ``use_mse_gradient``), scores every
frame against the target on its own: its gradient is the same formula with a.O(x_k)
replaced by the frame's loss l_k = L(O(x_k)),

    d<l>/dtheta = beta / K * sum_k (<l> - l_k) * dU_theta(x_k)/dtheta,

so a frame far from the reference (a stretched bond, a collision) raises its own energy
in proportion to how wrong it is. Since <l> = L(<O>) + <|O - <O>|^2> for the MSE, it also
narrows the fluctuations of O: a pull towards stiffer models, which the energy/force
regulariser holds in check.

Local-neighbourhood samples (the paper's option for liquids, where a few whole-box frames
are few samples): every (frame k, centre atom c) is one sample, with the observable of c's
environment O_kc and the energy U_kc = sum of the per-atom energies of the atoms in the
neighbourhood. The same formula over the M = K x C samples, and the surrogate
sum_kc c_kc U_kc = sum_k sum_i W_ki e_i(x_k) is again one backward pass, now of per-atom
energies weighted by W_ki = sum over the neighbourhoods of frame k that hold atom i of c_kc
(`local_boltzmann_coefficients`). This is the exact gradient of the loss of the reweighted
average over local samples, sum w_kc O_kc / sum w_kc with w_kc = exp(-beta dU_kc); treating
a neighbourhood as a canonical subsystem with energy U_kc is the paper's approximation.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from openmm_stable.errors import InputError
from openmm_stable.observables import LocalSamples
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
            raise InputError(f"unknown observable loss {self.kind!r}; known: {', '.join(LOSSES)}")
        self.target = torch.as_tensor(self.target, dtype=torch.float64)

    def __call__(self, mean: Tensor) -> Tensor:
        """The loss of an observable vector (d,), or of each row of (K, d) (per-frame losses)."""
        diff = mean.to(torch.float64) - self.target.to(mean.device)
        if self.kind == "mse":
            return (diff**2).mean(-1)
        if self.kind == "mae":
            return diff.abs().mean(-1)
        if self.kind == "hinge_above":
            return (torch.relu(diff) ** 2).mean(-1)
        return (torch.relu(-diff) ** 2).mean(-1)


# --- the estimator ---------------------------------------------------------------------------
@dataclasses.dataclass
class EstimatorResult:
    loss: float  # the objective: L(<O>), or <L(O(x))> per frame
    mean: Tensor  # <O> (d,)
    coefficients: Tensor  # c_k (K,)


def boltzmann_coefficients(values: Tensor, loss_fn: Callable[[Tensor], Tensor], temperature_K: float,
                           per_frame: bool = False) -> EstimatorResult:
    """c_k = beta (<s> - s_k) / K from per-frame observables `values` (K, d), with the
    frame score s_k = a.O(x_k) for L(<O>), or s_k = L(O(x_k)) for ``per_frame`` (module doc)."""
    values = values.detach().to(torch.float64)
    K = values.shape[0]
    if K < 2:
        raise InputError("the Boltzmann estimator needs at least two frames")
    mean = values.mean(0)
    if per_frame:
        scores = loss_fn(values)  # l_k
        loss = scores.mean()
    else:
        mean.requires_grad_(True)
        loss = loss_fn(mean)
        (a,) = torch.autograd.grad(loss, mean)
        scores = values @ a  # a.O(x_k)
    beta = 1.0 / kT_eV(temperature_K)
    coefficients = beta * (scores.mean() - scores) / K
    return EstimatorResult(float(loss.detach()), mean.detach(), coefficients)


def surrogate_backward(energy_fn: EnergyFn, frames: Tensor, coefficients: Tensor, minibatch: Optional[int] = None) -> None:
    """Accumulate d/dtheta sum c * U_theta into the parameters' .grad, in minibatches of
    frames so memory stays bounded (gradients add up across minibatches). Either one
    coefficient per frame with energies (k,), or (the local-neighbourhood surrogate) weights
    (K, N) with per-atom energies (k, N)."""
    K = frames.shape[0]
    step = K if not minibatch else int(minibatch)
    for start in range(0, K, step):
        chunk = slice(start, start + step)
        energies = energy_fn(frames[chunk])
        (coefficients[chunk].to(energies) * energies).sum().backward()


def log_mean_coefficients(scores: Tensor, temperature_K: float, weights: Optional[Tensor] = None) -> EstimatorResult:
    """Surrogate coefficients of d log<l>/dtheta from per-frame penalties l_k (K,), for
    frames that are a (weighted) sample of exp(-beta U_theta).

    Uniform frames: c_k = beta (<l> - l_k) / (K <l>), the per-frame gradient divided by
    <l>. With an excursion penalty (l > 0 only past the data) that is the gradient of
    log P_theta(excursion), whose size does not shrink as failures get rarer (notes F6).

    Weighted frames (a bank that keeps every frame with l > 0 but only a uniform sample of
    n_b of the N_0 frames with l = 0, each of those standing for w = N_0 / n_b frames):
    over the whole population of frames,
        d log<l>/dtheta = beta (<dU/dtheta> - <l dU/dtheta> / <l>),
    where <l dU> / <l> = sum_k w_k l_k dU_k / sum_k w_k l_k and <dU> = sum_k w_k dU_k / W,
    W = sum_k w_k, so

        c_k = beta w_k (1 / W - l_k / sum_j w_j l_j).

    w_k = 1 everywhere is the uniform formula; treating a bank as uniform instead would
    weight the background's mean gradient by n_b / N_0 too little. sum_k c_k = 0, so a
    constant energy shift gets no gradient. `loss` and `mean` are <l> = sum w l / W."""
    scores = scores.detach().to(torch.float64).reshape(-1)
    K = scores.shape[0]
    if K < 2:
        raise InputError("the Boltzmann estimator needs at least two frames")
    w = torch.ones_like(scores) if weights is None else torch.as_tensor(weights).to(scores).reshape(-1)
    if w.shape[0] != K or not bool((w > 0).all()):
        raise InputError(f"log_mean_coefficients: need {K} positive weights, got {w.shape[0]} "
                         f"({int((w <= 0).sum())} not positive)")
    total_weight, total_score = w.sum(), (w * scores).sum()
    if not total_score > 0:
        raise InputError("log_mean_coefficients: every frame has penalty 0, so log<l> has no gradient (no excursions)")
    beta = 1.0 / kT_eV(temperature_K)
    coefficients = beta * w * (1.0 / total_weight - scores / total_score)
    mean = total_score / total_weight
    return EstimatorResult(float(mean), mean.reshape(1), coefficients)


def boltzmann_gradient(energy_fn: EnergyFn, frames: Tensor, values: Tensor, loss_fn: Callable[[Tensor], Tensor],
                       temperature_K: float, minibatch: Optional[int] = None, per_frame: bool = False) -> EstimatorResult:
    """Gradient of L(<O>) (or of <L(O(x))>, ``per_frame``) w.r.t. the parameters behind
    `energy_fn`, accumulated into .grad."""
    result = boltzmann_coefficients(values, loss_fn, temperature_K, per_frame)
    surrogate_backward(energy_fn, frames, result.coefficients, minibatch)
    return result


@dataclasses.dataclass
class LocalEstimatorResult:
    loss: float  # L(<O>)
    mean: Tensor  # <O> (d,), the blocks' means side by side
    atom_weights: Tensor  # W_ki (K, N): the surrogate is sum_ki W_ki e_i(x_k)
    n_samples: int  # local samples over all blocks


def local_boltzmann_coefficients(blocks: list[LocalSamples], loss_fn: Callable[[Tensor], Tensor],
                                 temperature_K: float) -> LocalEstimatorResult:
    """Per-atom surrogate weights W (K, N) from blocks of local samples (see module doc).

    <O> is the blocks' means over their K x C samples side by side (e.g. the O-O, O-H and
    H-H RDFs); a = dL/d<O> is split into the blocks, and block p, with its own samples,
    gives c_kc = beta (<a_p.O_p> - a_p.O_p,kc) / (K C_p), spread onto the atoms of each
    neighbourhood."""
    if not blocks:
        raise InputError("no blocks of local samples")
    values = [b.values.detach().to(torch.float64) for b in blocks]
    if values[0].shape[0] < 2:
        raise InputError("the Boltzmann estimator needs at least two frames")
    mean = torch.cat([v.mean((0, 1)) for v in values]).requires_grad_(True)
    loss = loss_fn(mean)
    (a,) = torch.autograd.grad(loss, mean)
    beta = 1.0 / kT_eV(temperature_K)
    K, N = blocks[0].members.shape[0], blocks[0].members.shape[2]
    weights = torch.zeros(K, N, dtype=torch.float64, device=values[0].device)
    start, n_samples = 0, 0
    for v, block in zip(values, blocks):
        a_p = a[start:start + v.shape[-1]]
        start += v.shape[-1]
        projected = v @ a_p  # (K, C)
        coefficients = beta * (projected.mean() - projected) / projected.numel()
        weights += torch.einsum("kc,kcn->kn", coefficients, block.members.to(weights))
        n_samples += projected.numel()
    return LocalEstimatorResult(float(loss.detach()), mean.detach(), weights, n_samples)


def _protocol_inputs(model: nn.Module, atomic_numbers: Tensor):
    """frames (k, N, 3) -> (atomic numbers, positions, batch) of the model protocol for k
    frames of one system, on the model's device and in its dtype."""
    z = torch.as_tensor(atomic_numbers, dtype=torch.long)
    parameter = next(iter(model.parameters()))

    def inputs(frames: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k, n = frames.shape[0], frames.shape[1]
        batch = torch.arange(k, device=parameter.device).repeat_interleave(n)
        positions = frames.reshape(-1, 3).to(device=parameter.device, dtype=parameter.dtype)
        return z.to(parameter.device).repeat(k), positions, batch

    return inputs


def model_energy_fn(model: nn.Module, atomic_numbers: Tensor, box: Optional[Tensor] = None) -> EnergyFn:
    """Energies (k,) of k frames (k, N, 3) of one molecule under a model of the protocol."""
    inputs = _protocol_inputs(model, atomic_numbers)
    return lambda frames: model(*inputs(frames), box)


def model_atom_energy_fn(model: nn.Module, atomic_numbers: Tensor, box: Optional[Tensor] = None) -> EnergyFn:
    """Per-atom energies (k, N) of k frames (k, N, 3) under an `NNIP` whose network has
    them (`supports_atom_energies`); ValueError otherwise."""
    from openmm_stable.models.base import supports_atom_energies

    if not supports_atom_energies(model):
        arch = (getattr(model, "spec", None) or {}).get("architecture", type(model).__name__)
        raise InputError(f"local-neighbourhood samples need per-atom energies, which architecture {arch!r} does not "
                         "expose; use the 'schnet' architecture or local_neighbourhoods: false")
    inputs = _protocol_inputs(model, atomic_numbers)
    return lambda frames: model.atom_energies_of(*inputs(frames), box).reshape(frames.shape[0], frames.shape[1])


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
    return split_like(flat, params)


def split_like(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """A flat (P,) vector of parameter derivatives as one tensor per parameter."""
    out, offset = [], 0
    for p in params:
        out.append(flat[offset:offset + p.numel()].reshape(p.shape).to(p.dtype))
        offset += p.numel()
    return out

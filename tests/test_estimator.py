"""The Boltzmann estimator against exact, Jacobian-form and finite-difference values."""
import math

import numpy as np
import pytest
import torch

from openmm_stable.models import create_model
from openmm_stable.training.estimator import (ObservableLoss, boltzmann_coefficients, boltzmann_gradient,
                                              jacobian_gradient, model_energy_fn)
from openmm_stable.units import kT_eV


class Harmonic(torch.nn.Module):
    """U = k x^2 / 2 per coordinate (eV, Angstrom)."""

    def __init__(self, k: float):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=torch.float64))

    def forward(self, frames):
        return 0.5 * self.k * (frames**2).sum(dim=(1, 2))


def test_harmonic_exact_derivative_within_statistical_error():
    """<x^2> = kT/k, so d<x^2>/dk = -kT/k^2; sample exactly and compare."""
    T, k = 300.0, 2.0
    kT = kT_eV(T)
    rng = np.random.default_rng(0)
    K = 200_000
    x = torch.as_tensor(rng.normal(0.0, math.sqrt(kT / k), size=(K, 1, 1)))
    model = Harmonic(k)
    values = (x**2).reshape(K, 1)
    result = boltzmann_gradient(model, x, values, lambda m: m.sum(), T)
    exact = -kT / k**2
    # Var of the per-sample term beta*(<O>-O)*x^2/2 -> standard error from the samples themselves.
    beta = 1 / kT
    terms = beta * (values.mean() - values[:, 0]) * 0.5 * x.reshape(-1) ** 2
    stderr = float(terms.std() / math.sqrt(K))
    assert abs(float(model.k.grad) - exact) < 4 * stderr
    assert abs(float(result.mean[0]) - kT / k) < 0.01 * kT / k


def test_matches_per_sample_jacobian_on_a_neural_potential(ethanol):
    torch.manual_seed(0)
    z, pos = ethanol
    model = create_model("schnet", "tiny").double()
    frames = torch.as_tensor(pos)[None] + 0.05 * torch.randn(24, len(z), 3, dtype=torch.float64)
    values = torch.cdist(frames, frames).reshape(24, -1)[:, :10]
    loss = ObservableLoss(values.mean(0) + 0.1, "mse")
    energy = model_energy_fn(model, z)
    model.zero_grad()
    boltzmann_gradient(energy, frames, values, loss, 500.0, minibatch=5)
    single = [p.grad.clone() for p in model.parameters()]
    reference = jacobian_gradient(model, energy, frames, values, loss, 500.0)
    num = sum(float((a - b).abs().max()) for a, b in zip(single, reference))
    scale = max(float(b.abs().max()) for b in reference)
    assert num / scale < 1e-5


def test_matches_finite_difference_of_reweighted_average(ethanol):
    """Reweighting the same samples to theta + eps*v gives <O>(eps); its derivative at 0
    must equal the estimator's directional derivative exactly (same samples)."""
    torch.manual_seed(1)
    z, pos = ethanol
    model = create_model("schnet", "tiny").double()
    frames = torch.as_tensor(pos)[None] + 0.05 * torch.randn(32, len(z), 3, dtype=torch.float64)
    values = torch.cdist(frames, frames).reshape(32, -1)[:, 1:4]
    target = values.mean(0) - 0.05
    loss = ObservableLoss(target, "mse")
    energy = model_energy_fn(model, z)
    T = 500.0
    beta = 1 / kT_eV(T)
    model.zero_grad()
    boltzmann_gradient(energy, frames, values, loss, T)
    direction = [torch.randn_like(p) for p in model.parameters()]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(model.parameters(), direction))
    with torch.no_grad():
        u0 = energy(frames)

    def reweighted_loss(eps):
        with torch.no_grad():
            for p, d in zip(model.parameters(), direction):
                p.add_(eps * d)
            u = energy(frames)
            for p, d in zip(model.parameters(), direction):
                p.sub_(eps * d)
            w = torch.softmax(-beta * (u - u0), 0)
            return float(loss((w[:, None] * values).sum(0)))

    eps = 1e-6
    numeric = (reweighted_loss(eps) - reweighted_loss(-eps)) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=1e-4, abs=1e-10)


def test_losses_and_errors():
    target = torch.tensor([1.0, 2.0])
    assert float(ObservableLoss(target, "hinge_above")(torch.tensor([0.5, 1.0]))) == 0.0
    assert float(ObservableLoss(target, "hinge_below")(torch.tensor([0.5, 3.0]))) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="unknown observable loss"):
        ObservableLoss(target, "l3")
    with pytest.raises(ValueError, match="at least two frames"):
        boltzmann_coefficients(torch.ones(1, 2), ObservableLoss(target), 300.0)

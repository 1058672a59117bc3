"""The Boltzmann estimator against exact, Jacobian-form and finite-difference values."""
import math

import numpy as np
import pytest
import torch

from openmm_stable.models import create_model
from openmm_stable.training.estimator import (ObservableLoss, boltzmann_coefficients, boltzmann_gradient,
                                              jacobian_gradient, model_energy_fn)
from openmm_stable.units import kT_eV

from _structures import Harmonic


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


@pytest.mark.parametrize("per_frame", [False, True], ids=["ensemble", "per_frame"])
def test_matches_finite_difference_of_reweighted_average(ethanol, per_frame):
    """Reweighting the same samples to theta + eps*v gives <O>(eps) (and <L(O)>(eps)); the
    derivative at 0 of L(<O>) (or of <L(O)>, per frame) must equal the estimator's
    directional derivative exactly (same samples)."""
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
    boltzmann_gradient(energy, frames, values, loss, T, per_frame=per_frame)
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
            if per_frame:
                return float((w * loss(values)).sum())
            return float(loss((w[:, None] * values).sum(0)))

    eps = 1e-6
    numeric = (reweighted_loss(eps) - reweighted_loss(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-8  # a direction the loss depends on
    assert numeric == pytest.approx(analytic, rel=1e-4, abs=1e-10)


def test_per_frame_objective_scores_each_frame():
    """<L(O)> differs from L(<O>) by the spread of O (MSE: the mean variance), and frames
    scored worse than average get negative coefficients (their energy is pushed up)."""
    values = torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    loss = ObservableLoss(torch.tensor([1.0, 2.0]), "mse")
    ensemble = boltzmann_coefficients(values, loss, 300.0)
    per_frame = boltzmann_coefficients(values, loss, 300.0, per_frame=True)
    spread = float(((values - values.mean(0)) ** 2).mean())
    assert per_frame.loss == pytest.approx(ensemble.loss + spread)
    frame_losses = ((values - torch.tensor([1.0, 2.0])) ** 2).mean(1)  # 1, 1, 2.5
    worst = int(frame_losses.argmax())
    assert float(per_frame.coefficients[worst]) < 0 < float(per_frame.coefficients[0])
    assert float(per_frame.coefficients.sum()) == pytest.approx(0.0, abs=1e-12)


def test_losses_and_errors():
    target = torch.tensor([1.0, 2.0])
    assert float(ObservableLoss(target, "hinge_above")(torch.tensor([0.5, 1.0]))) == 0.0
    assert float(ObservableLoss(target, "hinge_below")(torch.tensor([0.5, 3.0]))) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="unknown observable loss"):
        ObservableLoss(target, "l3")
    with pytest.raises(ValueError, match="at least two frames"):
        boltzmann_coefficients(torch.ones(1, 2), ObservableLoss(target), 300.0)


# --- local-neighbourhood samples ---------------------------------------------------------------
def small_water_box(n_frames: int, seed: int = 0):
    """4 water-like molecules in a 6 A cube, jittered: (z (12,), frames (K, 12, 3), box)."""
    rng = np.random.default_rng(seed)
    L = 6.0
    centres = np.array([[1.0, 1.0, 1.0], [4.0, 1.5, 1.2], [1.5, 4.2, 3.8], [4.3, 4.0, 4.5]])
    local = np.array([[0.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.8, 0.6, 0.0]])
    base = (centres[:, None, :] + local[None]).reshape(-1, 3)
    frames = base[None] + 0.15 * rng.standard_normal((n_frames, 12, 3))
    return np.tile([8, 1, 1], 4), torch.as_tensor(frames), np.eye(3) * L


def local_case(radius: float, n_frames: int = 12):
    from openmm_stable.observables import RdfObservable

    torch.manual_seed(3)
    z, frames, box = small_water_box(n_frames)
    model = create_model("schnet", "tiny", cutoff=2.9).double()
    obs = RdfObservable(pairs=((8, 8), (8, 1), (1, 1)), r_max=2.9, n_bins=12, sigma=0.3)
    blocks = obs.local_samples(frames, z, box, radius)
    target = torch.cat([b.values.mean((0, 1)) for b in blocks]).detach() * 0.8 + 0.05
    return z, frames, box, model, obs, blocks, ObservableLoss(target, "mse")


def test_local_samples_are_exact_gradients_of_the_reweighted_local_average():
    """Each (frame, centre) is a sample with energy = sum of its neighbourhood's per-atom
    energies; reweighting those samples to theta + eps v must give, by finite differences,
    the directional derivative the one-backward-pass estimator puts into .grad."""
    from openmm_stable.training.estimator import local_boltzmann_coefficients, model_atom_energy_fn, surrogate_backward

    z, frames, box, model, obs, blocks, loss = local_case(radius=2.5)
    sizes = [int(b.members.sum(-1).min()) for b in blocks] + [int(b.members.sum(-1).max()) for b in blocks]
    assert 1 < min(sizes) and max(sizes) < 12  # real neighbourhoods: more than the centre, less than the box
    T = 300.0
    beta = 1 / kT_eV(T)
    atoms = model_atom_energy_fn(model, z, torch.as_tensor(box))
    model.zero_grad()
    result = local_boltzmann_coefficients(blocks, loss, T)
    assert result.n_samples == 12 * (4 + 4 + 8)
    surrogate_backward(atoms, frames, result.atom_weights, minibatch=5)
    direction = [torch.randn_like(p) for p in model.parameters()]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(model.parameters(), direction))
    assert analytic != 0.0

    def local_energies():  # (K, C) per block: sum of per-atom energies over each neighbourhood
        e = atoms(frames)
        return [torch.einsum("kn,kcn->kc", e, b.members.double()) for b in blocks]

    with torch.no_grad():
        u0 = local_energies()

    def reweighted_loss(eps):
        with torch.no_grad():
            for p, d in zip(model.parameters(), direction):
                p.add_(eps * d)
            u = local_energies()
            for p, d in zip(model.parameters(), direction):
                p.sub_(eps * d)
            means = []
            for b, ub, u0b in zip(blocks, u, u0):
                w = torch.softmax((-beta * (ub - u0b)).reshape(-1), 0)
                means.append((w[:, None] * b.values.reshape(-1, b.values.shape[-1])).sum(0))
            return float(loss(torch.cat(means)))

    eps = 1e-6
    numeric = (reweighted_loss(eps) - reweighted_loss(-eps)) / (2 * eps)
    assert numeric == pytest.approx(analytic, rel=1e-4, abs=1e-10)


def test_whole_box_neighbourhoods_give_the_whole_box_estimator():
    """A radius that holds every atom makes each local energy the frame's energy; since
    the local values average to the frame's RDF, the gradient is the whole-box one."""
    from openmm_stable.training.estimator import local_boltzmann_coefficients, model_atom_energy_fn, surrogate_backward

    z, frames, box, model, obs, blocks, loss = local_case(radius=100.0)
    assert all(b.members.all() for b in blocks)
    local = local_boltzmann_coefficients(blocks, loss, 300.0)
    model.zero_grad()
    surrogate_backward(model_atom_energy_fn(model, z, torch.as_tensor(box)), frames, local.atom_weights)
    grads_local = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    whole = boltzmann_gradient(model_energy_fn(model, z, torch.as_tensor(box)), frames, obs(frames, z, box), loss,
                               300.0)
    assert local.loss == pytest.approx(whole.loss, rel=1e-10)
    for a, b in zip(grads_local, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_per_atom_energies_sum_to_the_energy_and_others_refuse(ethanol):
    from openmm_stable.models.base import batch_index, supports_atom_energies
    from openmm_stable.training.estimator import model_atom_energy_fn

    z, pos = ethanol
    model = create_model("schnet", "tiny").double()
    model.atom_energies[1], model.atom_energies[6] = -13.6, -1030.0
    model.energy_scale.fill_(1.7)
    x = torch.as_tensor(pos)[None].repeat(3, 1, 1) + 0.05 * torch.randn(3, len(z), 3, dtype=torch.float64)
    zz, batch = torch.as_tensor(z).repeat(3), batch_index(3, len(z))
    per_atom = model.atom_energies_of(zz, x.reshape(-1, 3), batch)
    torch.testing.assert_close(per_atom.reshape(3, -1).sum(1), model(zz, x.reshape(-1, 3), batch))
    torch.jit.script(model.net)  # the split into atom_energies keeps the network scriptable
    other = create_model("graph-network", "tiny")
    assert supports_atom_energies(model) and not supports_atom_energies(other)
    with pytest.raises(ValueError, match="per-atom energies.*'graph-network'"):
        model_atom_energy_fn(other, z)
    with pytest.raises(NotImplementedError, match="graph-network"):
        other.atom_energies_of(zz, x.reshape(-1, 3).float(), batch)

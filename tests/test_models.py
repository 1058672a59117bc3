"""Model protocol: every architecture scripts, is invariant, batches, and gives consistent forces.

All architectures run at the "tiny" preset on the 9-atom ethanol fixture, so the
torchmd-net ones (graph network, equivariant transformer, TensorNet) stay fast.
Symmetry, batching and finite-difference checks use float64 models (``.double()``) so
their tolerances can be tight: they test the maths, not float32 round-off.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from openmm_stable.models import (read_model_record,
    batch_index,
    create_model,
    energy_and_forces,
    load_model,
    save_model,
)
from openmm_stable.models.registry import BUILTIN_FAMILIES, get_family

ALL_ARCHS = list(BUILTIN_FAMILIES)  # the families we ship (optional ones, e.g. mace, have their own tests)


def _model(arch: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(arch, "tiny").eval()
    return model.double() if dtype == torch.float64 else model


def _batch(z: np.ndarray, positions: np.ndarray, dtype=torch.float64):
    """Tensors (z, pos, batch) for a stack of structures of one molecule, positions (R, N, 3)."""
    n_structures, n_atoms = positions.shape[:2]
    zt = torch.as_tensor(np.tile(z, n_structures), dtype=torch.long)
    pos = torch.as_tensor(positions.reshape(-1, 3), dtype=dtype)
    return zt, pos, batch_index(n_structures, n_atoms)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))  # unique QR, Haar-distributed
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]  # a proper rotation
    return q


# --------------------------------------------------------------------------- factory


def test_unknown_architecture_and_preset_are_clear_errors():
    with pytest.raises(ValueError, match="unknown architecture 'painn'.*schnet"):
        create_model("painn", "tiny")
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        create_model("schnet", "huge")


def test_presets_grow():
    sizes = [sum(p.numel() for p in create_model("schnet", name).parameters()) for name in ("tiny", "small")]
    assert sizes[0] < sizes[1]
    for arch in ALL_ARCHS:
        assert list(get_family(arch).presets) == ["tiny", "small", "medium", "large"]


# --------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_torchscript_matches_eager(arch, ethanol, rng):
    z, pos = ethanol
    model = _model(arch, torch.float32)
    zt, post, batch = _batch(z, pos[None] + 0.05 * rng.standard_normal((2,) + pos.shape), torch.float32)
    scripted = torch.jit.script(model)
    eager_e = model(zt, post, batch)
    scripted_e = scripted(zt, post, batch)
    assert eager_e.shape == scripted_e.shape == (2,)
    assert eager_e.dtype == torch.float64  # NNIP returns float64 energies whatever the net dtype
    torch.testing.assert_close(scripted_e, eager_e, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- symmetries


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_rotation_translation_permutation_invariance(arch, ethanol, rng):
    z, pos = ethanol
    model = _model(arch)
    rotated = pos @ _random_rotation(rng).T + rng.uniform(-5.0, 5.0, size=3)
    # Relabel atoms of the same element (the two C, and the six H among themselves).
    perm = np.arange(len(z))
    perm[[0, 1]] = [1, 0]
    hydrogens = np.flatnonzero(z == 1)
    perm[hydrogens] = rng.permutation(hydrogens)
    assert (z[perm] == z).all()
    permuted = pos[perm]
    zt, post, batch = _batch(z, np.stack([pos, rotated, permuted]))
    energies = model(zt, post, batch)
    # float64 throughout: only round-off separates these (~1e-15 relative per operation).
    torch.testing.assert_close(energies[1:], energies[:1].expand(2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_batched_equals_separate(arch, ethanol, rng):
    z, pos = ethanol
    model = _model(arch)
    frames = pos[None] + 0.1 * rng.standard_normal((3,) + pos.shape)
    zt, post, batch = _batch(z, frames)
    batched_e, batched_f = energy_and_forces(model, zt, post, batch)
    for k in range(3):
        zk, pk, bk = _batch(z, frames[k : k + 1])
        e, f = energy_and_forces(model, zk, pk, bk)
        torch.testing.assert_close(batched_e[k : k + 1], e, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(batched_f[9 * k : 9 * (k + 1)], f, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch", ["schnet", "graph-network"])
def test_batch_of_different_molecules(arch, ethanol):
    """Structures of different sizes in one batch (a general dataset) still separate."""
    z, pos = ethanol
    model = _model(arch)
    sizes = [9, 3, 6]  # ethanol, its C-C-O frame, its heavy atoms + methyl H
    zt = torch.as_tensor(np.concatenate([z[:n] for n in sizes]))
    post = torch.as_tensor(np.concatenate([pos[:n] for n in sizes]))
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    batched = model(zt, post, batch)
    separate = torch.cat([model(torch.as_tensor(z[:n]), torch.as_tensor(pos[:n]), torch.zeros(n, dtype=torch.long))
                          for n in sizes])
    torch.testing.assert_close(batched, separate, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- forces


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_forces_are_minus_finite_difference_gradient(arch, ethanol, rng):
    """F = -dE/dx against central differences, all 27 components in one batched call.

    Step h = 1e-4 Angstrom in float64. The central-difference truncation error is
    h^2/6 * |d3E/dx3|: measured, it scales as h^2 (checked at h = 1e-3, 1e-4, 1e-5) and is
    2e-8 to 7e-8 of the largest force component for the four tiny models at h = 1e-4;
    round-off (~eps*|E|/h ~ 1e-12 eV/A) is negligible. The bound, 1e-6 of the largest
    force, leaves a margin > 10x, while a real error (a missing term, a wrong sign, a
    detached path, a unit factor) is of the order of the force itself.
    """
    z, pos = ethanol
    model = _model(arch)
    pos = pos + 0.05 * rng.standard_normal(pos.shape)  # off the symmetric geometry
    h = 1e-4
    n = len(z)
    displaced = np.repeat(pos[None], 2 * 3 * n, axis=0)
    for k in range(3 * n):
        atom, axis = divmod(k, 3)
        displaced[2 * k, atom, axis] += h
        displaced[2 * k + 1, atom, axis] -= h
    with torch.no_grad():
        energies = model(*_batch(z, displaced)).numpy()
    fd_forces = -(energies[0::2] - energies[1::2]).reshape(n, 3) / (2 * h)
    _, forces = energy_and_forces(model, *_batch(z, pos[None]))
    scale = np.abs(fd_forces).max()
    assert scale > 1e-3  # the check is not vacuous
    assert np.abs(forces.numpy() - fd_forces).max() <= 1e-6 * scale


# --------------------------------------------------------------------------- periodic


def test_schnet_minimum_image(ethanol):
    """With a box, wrapping atoms into it changes nothing; a large box equals no box."""
    z, pos = ethanol
    model = _model("schnet")
    box = np.diag([12.0, 11.0, 13.0])
    shifted = pos + np.array([-1.0, 3.0, 0.0])  # straddles the x = 0 face of the box
    wrapped = shifted - np.floor(shifted / np.diag(box)) * np.diag(box)
    assert np.abs(wrapped - shifted).max() > 5.0  # some atoms really jumped across the box
    zt = torch.as_tensor(z)
    batch = torch.zeros(len(z), dtype=torch.long)
    e_free, f_free = energy_and_forces(model, zt, torch.as_tensor(shifted), batch)
    e_box, f_box = energy_and_forces(model, zt, torch.as_tensor(wrapped), batch, torch.as_tensor(box))
    torch.testing.assert_close(e_box, e_free, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f_box, f_free, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("arch", ["schnet", "graph-network"])
def test_save_load_round_trip(arch, ethanol, tmp_path):
    z, pos = ethanol
    model = _model(arch, torch.float32, seed=3)
    model.atom_energies[z] = torch.as_tensor([-1000.0 - k for k in z], dtype=torch.float64)
    model.energy_scale.fill_(0.5)
    path = tmp_path / "model.ckpt"
    save_model(model, path, atomic_numbers=z.tolist())
    loaded = load_model(path)
    assert loaded.spec == model.spec
    record = read_model_record(path)
    assert record.atomic_numbers.tolist() == z.tolist()
    assert record.units == {"length": "Angstrom", "energy": "eV"} and torch.__version__.startswith(record.versions["torch"])
    args = _batch(z, pos[None], torch.float32)
    torch.testing.assert_close(loaded(*args), model(*args), rtol=0, atol=0)
    assert not (tmp_path / "model.ckpt.tmp").exists()


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable openmm-stable model"):
        load_model(garbage)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": 1}, other)
    with pytest.raises(ValueError, match="no 'spec'"):
        load_model(other)

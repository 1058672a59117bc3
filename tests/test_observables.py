"""Observables: checked against mdtraj, closed forms and brute force on tiny systems."""
import math

import numpy as np
import pytest
import torch

from openmm_stable import dynamics, geometry
from openmm_stable import observables as obs
from openmm_stable.data.dataset import QMDataset
from openmm_stable.units import kT_eV

from _structures import ETHANOL_POSITIONS as ETHANOL_POS, ETHANOL_Z


def test_pair_distances_minimum_image_orthorhombic():
    pos = torch.tensor([[[0.5, 5.0, 5.0], [9.5, 5.0, 5.0], [5.0, 5.0, 5.0]]], dtype=torch.float64)
    box = torch.diag(torch.tensor([10.0, 10.0, 10.0], dtype=torch.float64))
    d = geometry.pair_distances(pos, box)
    assert d.shape == (1, 3)
    assert torch.allclose(d, torch.tensor([[1.0, 4.5, 4.5]], dtype=torch.float64))
    assert torch.allclose(geometry.pair_distances(pos)[0, 0], torch.tensor(9.0, dtype=torch.float64))


def test_pair_distances_triclinic_matches_brute_force():
    rng = np.random.default_rng(0)
    box = np.array([[8.0, 0.0, 0.0], [2.5, 7.5, 0.0], [-1.5, 2.0, 9.0]])
    pos = rng.uniform(0, 1, (2, 6, 3)) @ box
    d = geometry.pair_distances(torch.tensor(pos), torch.tensor(box)).numpy()
    shifts = np.array([[i, j, k] for i in range(-2, 3) for j in range(-2, 3) for k in range(-2, 3)]) @ box
    i, j = np.triu_indices(6, k=1)
    dr = pos[:, j] - pos[:, i]
    brute = np.linalg.norm(dr[:, :, None] + shifts, axis=-1).min(-1)
    np.testing.assert_allclose(d, brute, rtol=1e-12)


def test_pair_distances_keeps_dtype_and_leading_dims():
    x = torch.randn(4, 3, 5, 3, dtype=torch.float32)
    d = geometry.pair_distances(x)
    assert d.shape == (4, 3, 10) and d.dtype == torch.float32


def test_hr_plain_histogram_on_toy_chain():
    # three atoms on a line, spacing 1.03: distances 1.03, 1.03, 2.06
    pos = torch.tensor([[[0.0, 0, 0], [1.03, 0, 0], [2.06, 0, 0]]], dtype=torch.float64)
    h, r = obs.hr(pos, r_max=10.0, n_bins=100, sigma=0.0)
    assert h.shape == (1, 100) and r.shape == (100,)
    assert math.isclose(float(h.sum() * 0.1), 1.0)
    assert math.isclose(float(h[0, 10]), (2 / 3) / 0.1)
    assert math.isclose(float(h[0, 20]), (1 / 3) / 0.1)
    assert int((h[0] > 0).sum()) == 2


def test_hr_smeared_is_normalised_with_correct_mean_and_per_frame():
    rng = np.random.default_rng(1)
    pos = torch.tensor(rng.normal(0, 1.5, (5, 8, 3)))
    h, r = obs.hr(pos, r_max=15.0, n_bins=300)  # sigma defaults to one bin width
    dr = 15.0 / 300
    assert torch.allclose(h.sum(1) * dr, torch.ones(5, dtype=torch.float64), atol=1e-6)
    mean_from_h = (h * r).sum(1) * dr
    assert torch.allclose(mean_from_h, geometry.pair_distances(pos).mean(1), atol=1e-3)
    # per-frame rows: frame k alone gives row k
    h2, _ = obs.hr(pos[2], r_max=15.0, n_bins=300)
    assert torch.allclose(h2[0], h[2])


def test_hr_is_differentiable():
    pos = torch.tensor(ETHANOL_POS, requires_grad=True)
    h, r = obs.hr(pos, r_max=6.0, n_bins=60)
    (h[0] * r).sum().backward()
    assert pos.grad is not None and torch.isfinite(pos.grad).all() and pos.grad.abs().sum() > 0


def test_smeared_histogram_chunks_match(monkeypatch):
    x = torch.rand(7, 11, dtype=torch.float64) * 5
    bins = obs.Bins(0.0, 5.0, 25)
    full = obs.smeared_histogram(x, bins, 0.3)
    monkeypatch.setattr(obs, "_HISTOGRAM_CHUNK_ELEMENTS", 50)
    assert torch.allclose(obs.smeared_histogram(x, bins, 0.3), full)


def _random_box_system(seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.array([8.0, 9.0, 10.0])
    z = np.array([8] * 10 + [1] * 20)
    rng.shuffle(z)
    pos = rng.uniform(0, 1, (5, z.size, 3)) * lengths
    return z, pos, lengths


@pytest.mark.parametrize("pair", [(8, 8), (8, 1), (1, 1)])
def test_rdf_matches_mdtraj(pair):
    md = pytest.importorskip("mdtraj")
    z, pos, lengths = _random_box_system()
    top = md.Topology()
    residue = top.add_residue("SYS", top.add_chain())
    for a in z:
        top.add_atom(md.element.Element.getByAtomicNumber(int(a)).symbol, md.element.Element.getByAtomicNumber(int(a)), residue)
    traj = md.Trajectory(
        pos / 10.0, top, unitcell_lengths=np.tile(lengths / 10.0, (5, 1)), unitcell_angles=np.full((5, 3), 90.0)
    )
    sym = {8: "O", 1: "H"}
    pairs = top.select_pairs(f"element {sym[pair[0]]}", f"element {sym[pair[1]]}")
    r_ref, g_ref = md.compute_rdf(traj, pairs, r_range=(0.0, 0.4), n_bins=40)
    g, r = obs.rdf(torch.tensor(pos), np.diag(lengths), z, pair=pair, r_max=4.0, n_bins=40)
    assert g.shape == (5, 40)
    np.testing.assert_allclose(r.numpy(), r_ref * 10.0, rtol=1e-10)
    np.testing.assert_allclose(g.mean(0).numpy(), g_ref, rtol=1e-6, atol=1e-9)


def test_rdf_smearing_keeps_counts():
    z, pos, lengths = _random_box_system(3)
    g0, r = obs.rdf(pos, np.diag(lengths), z, (8, 1), r_max=4.0, n_bins=40)
    g1, _ = obs.rdf(pos, np.diag(lengths), z, (8, 1), r_max=4.0, n_bins=40, sigma=0.05)
    shell = (4 / 3) * math.pi * (torch.linspace(0, 4, 41)[1:] ** 3 - torch.linspace(0, 4, 41)[:-1] ** 3).double()
    c0, c1 = (g0 * shell).sum(1), (g1 * shell).sum(1)  # proportional to counts
    assert torch.allclose(c0, c1, rtol=0.05)


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_local_rdfs_average_to_the_rdf_and_neighbourhoods_are_brute_force(sigma):
    """Per-centre g(r) of every O (or H) averages to the frame's element-pair g(r)
    (like pairs counted from both ends), and neighbourhood members are the atoms within
    the radius under the minimum image, centre included."""
    z, pos, lengths = _random_box_system(1)
    box = np.diag(lengths)
    rdf_obs = obs.RdfObservable(pairs=((8, 8), (8, 1), (1, 1)), r_max=3.9, n_bins=30, sigma=sigma)
    blocks = rdf_obs.local_samples(torch.tensor(pos), z, box, radius=3.0)
    whole = rdf_obs(torch.tensor(pos), z, box)
    assert [b.values.shape for b in blocks] == [(5, 10, 30), (5, 10, 30), (5, 20, 30)]
    torch.testing.assert_close(torch.cat([b.values.mean(1) for b in blocks], -1), whole, rtol=1e-10, atol=1e-12)
    centres = np.flatnonzero(z == 1)
    d = pos[:, centres, None, :] - pos[:, None, :, :]
    d -= lengths * np.round(d / lengths)
    np.testing.assert_array_equal(blocks[2].members.numpy(), np.linalg.norm(d, axis=-1) <= 3.0)
    assert blocks[2].members[:, np.arange(20), centres].all()


def test_rdf_errors():
    z, pos, lengths = _random_box_system()
    with pytest.raises(ValueError, match="no atom pairs"):
        obs.rdf(pos, np.diag(lengths), z, pair=(6, 8))
    with pytest.raises(ValueError, match="periodic box"):
        obs.rdf(pos, None, z)


def test_angles_and_adf_on_known_angle():
    theta = math.radians(104.5)
    pos64 = torch.tensor([[[0.96, 0, 0], [0, 0, 0], [0.96 * math.cos(theta), 0.96 * math.sin(theta), 0]]], dtype=torch.float64)
    pos = pos64.float()
    a = obs.angles(pos, [[0, 1, 2]])
    assert a.dtype == torch.float32 and abs(float(a) - 104.5) < 1e-4
    assert abs(float(obs.angles(pos64, [[0, 1, 2]], degrees=False)) - theta) < 1e-10
    adf, centres = obs.angle_distribution(pos64, [[0, 1, 2]], n_bins=90)
    assert math.isclose(float(adf.sum() * 2.0), 1.0, rel_tol=1e-9)
    assert abs(float(centres[adf[0].argmax()]) - 104.5) <= 1.0
    adf0, _ = obs.angle_distribution(pos64, [[0, 1, 2]], n_bins=90, sigma=0.0)
    assert float(adf0[0, 52]) == pytest.approx(0.5)  # bin [104, 106) holds all of it


def test_angle_triples_ethanol():
    from openmm_stable.geometry import find_bonds

    t = obs.angle_triples(find_bonds(ETHANOL_Z, ETHANOL_POS))
    assert t.shape == (13, 3)  # C1: C(4,2)=6, C2: 6, O: 1
    assert (t[:, 0] < t[:, 2]).all()
    assert [0, 1, 2] in t.tolist() and [1, 2, 8] in t.tolist()  # C-C-O and C-O-H


def test_bond_length_stats():
    pos = torch.tensor([[[0.0, 0, 0], [1.0, 0, 0]], [[0.0, 0, 0], [1.2, 0, 0]]], dtype=torch.float64)
    s = obs.bond_length_stats(pos, [[0, 1]])
    assert torch.allclose(s.lengths, torch.tensor([[1.0], [1.2]], dtype=torch.float64))
    assert torch.allclose(s.mean, torch.tensor([1.1], dtype=torch.float64))
    assert torch.allclose(s.std, torch.tensor([0.1], dtype=torch.float64))


def test_msd_and_diffusivity_random_walk():
    gen = torch.Generator().manual_seed(0)
    dt, step = 0.01, 0.1  # D = step^2 / (2 dt) = 0.5 A^2/ps
    x = torch.cumsum(torch.randn(1000, 4, 50, 3, generator=gen, dtype=torch.float64) * step, 0)
    msd = dynamics.mean_squared_displacement(x, max_lag=100)
    assert msd.shape == (101,) and float(msd[0]) == pytest.approx(0.0, abs=1e-9)
    for lag in (1, 7, 100):  # brute force
        brute = ((x[lag:] - x[:-lag]) ** 2).sum(-1).mean()
        assert float(msd[lag]) == pytest.approx(float(brute), rel=1e-9)
    d = dynamics.diffusivity(msd, dt, fit_range=(0.1, 1.0))
    assert d == pytest.approx(0.5, rel=0.05)
    assert dynamics.mean_squared_displacement(x.float(), 10).dtype == torch.float32
    assert dynamics.A2_PER_PS_IN_CM2_PER_S == 1e-4


def test_unwrap_recovers_trajectory():
    gen = torch.Generator().manual_seed(1)
    x = 5.0 + torch.cumsum(torch.randn(200, 6, 3, generator=gen, dtype=torch.float64) * 0.3, 0)
    box = torch.diag(torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64))
    wrapped = torch.remainder(x, torch.diagonal(box))
    u = dynamics.unwrap(wrapped, box)
    assert torch.allclose(u - u[0], x - x[0], atol=1e-10)


def test_vacf_known_signal_and_brute_force():
    t = torch.arange(2000, dtype=torch.float64) * 0.01
    omega = 3.0
    v = torch.zeros(2000, 2, 3, dtype=torch.float64)
    v[:, :, 0] = torch.cos(omega * t)[:, None]
    c = dynamics.vacf(v, max_lag=200)
    assert torch.allclose(c, torch.cos(omega * t[:201]), atol=0.02)
    raw = dynamics.vacf(v, max_lag=5, normalize=False)
    for lag in range(6):
        brute = (v[: 2000 - lag] * v[lag:]).sum(-1).mean()
        assert float(raw[lag]) == pytest.approx(float(brute), rel=1e-9)
    noise = dynamics.vacf(torch.randn(5000, 3, 4, 3, dtype=torch.float64), max_lag=10)
    assert abs(float(noise[1:].abs().max())) < 0.05 and float(noise[0]) == pytest.approx(1.0)


def test_boltzmann_weights_uniform_when_same_temperature():
    e = torch.tensor([-1.0e4, -1.0e4 + 0.3, -1.0e4 - 0.2], dtype=torch.float32)
    w = obs.boltzmann_weights(e, 500.0, 500.0)
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.full((3,), 1 / 3))
    assert obs.effective_sample_size(w) == pytest.approx(3.0)


def test_boltzmann_weights_two_state():
    T_data, T_target, dE = 300.0, 500.0, 0.05
    n0 = 1000
    n1 = int(round(n0 * math.exp(-dE / kT_eV(T_data))))  # canonical populations at T_data
    e = np.concatenate([np.zeros(n0), np.full(n1, dE)]) - 2.0e4  # large offset: stability
    w = obs.boltzmann_weights(e, T_data, T_target)
    assert w.dtype == torch.float64 and float(w.sum()) == pytest.approx(1.0)
    dbeta = 1 / kT_eV(T_target) - 1 / kT_eV(T_data)
    assert float(w[-1] / w[0]) == pytest.approx(math.exp(-dbeta * dE), rel=1e-10)
    is_excited = torch.tensor([0.0] * n0 + [1.0] * n1, dtype=torch.float64)
    p1 = float(obs.reference_observable(is_excited, w))
    exact = n1 * math.exp(-dbeta * dE) / (n0 + n1 * math.exp(-dbeta * dE))
    assert p1 == pytest.approx(exact, rel=1e-10)
    boltz = math.exp(-dE / kT_eV(T_target)) / (1 + math.exp(-dE / kT_eV(T_target)))
    assert p1 == pytest.approx(boltz, rel=0.01)
    assert 0 < obs.effective_sample_size(w) < n0 + n1


def test_reference_observable_shapes():
    v = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    assert torch.allclose(obs.reference_observable(v), v.mean(0))
    w = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert torch.allclose(obs.reference_observable(v, w), v[2:].mean(0))
    with pytest.raises(ValueError):
        obs.reference_observable(v, torch.ones(3))


def test_make_observable_registry():
    assert set(obs.OBSERVABLES) >= {"hr", "rdf", "bond_lengths", "adf"}
    h = obs.make_observable("hr", r_max=6.0, n_bins=60)
    pos = torch.tensor(ETHANOL_POS)[None].repeat(2, 1, 1)
    assert isinstance(h, obs.Observable)
    assert torch.allclose(h(pos), obs.hr(pos, 6.0, 60)[0]) and h.bin_centres.shape == (60,)
    with pytest.raises(ValueError, match="unknown observable"):
        obs.make_observable("nope")
    with pytest.raises(ValueError, match="unknown setting"):
        obs.make_observable("hr", rmax=3)
    b = obs.make_observable("bond_lengths", squares=True)
    with pytest.raises(ValueError, match="prepare"):
        b(pos)
    b = b.prepare(ETHANOL_Z, ETHANOL_POS)
    assert len(b.bonds) == 8 and b(pos).shape == (2, 16)
    adf = obs.make_observable("adf", n_bins=36).prepare(ETHANOL_Z, ETHANOL_POS)
    assert adf(pos).shape == (2, 36)
    z, p, lengths = _random_box_system()
    g = obs.make_observable("rdf", pair=[8, 1], r_max=4.0, n_bins=20)
    assert g.pair == (8, 1) and g(p, z, np.diag(lengths)).shape == (5, 20)
    with pytest.raises(ValueError, match="box"):
        g(p, z)


def test_reference_from_dataset():
    rng = np.random.default_rng(2)
    frames = ETHANOL_POS + rng.normal(0, 0.05, (6, 9, 3))
    ds = QMDataset(ETHANOL_Z, frames, energies=rng.normal(0, 0.05, 6), temperature=300.0)
    o = obs.make_observable("bond_lengths")
    ref, ess = obs.reference_from_dataset(o, ds)
    assert ref.shape == (8,) and ess == 6.0
    ref2, ess2 = obs.reference_from_dataset(o, ds, temperature=600.0)
    assert ref2.shape == (8,) and 1.0 <= ess2 < 6.0
    # No recorded temperature: taken as sampled at the target (reweighting needs two known temperatures).
    ref3, ess3 = obs.reference_from_dataset(o, QMDataset(ETHANOL_Z, frames), temperature=600.0)
    assert torch.equal(ref3, ref) and ess3 == 6.0
    with pytest.raises(ValueError, match="needs energies"):
        obs.reference_from_dataset(o, QMDataset(ETHANOL_Z, frames, temperature=300.0), temperature=600.0)

"""Stability criteria on hand-built structures with known failures."""
import numpy as np
import pytest
import torch

from openmm_stable import geometry
from openmm_stable import stability as st
from openmm_stable.data.dataset import QMDataset

from _structures import ETHANOL_BONDS, ETHANOL_POSITIONS as ETHANOL_POS, ETHANOL_Z

HYDROXYL_O, HYDROXYL_H = 2, 8  # in `_structures.ETHANOL_*`


def test_find_bonds_ethanol():
    b = geometry.find_bonds(ETHANOL_Z, ETHANOL_POS)
    assert b.dtype == np.int64 and b.shape == (8, 2)
    assert {tuple(x) for x in b.tolist()} == set(ETHANOL_BONDS)
    # a stack of frames uses the first one
    b2 = geometry.find_bonds(ETHANOL_Z, np.stack([ETHANOL_POS, ETHANOL_POS * 3]))
    assert np.array_equal(b, b2)


def test_find_bonds_with_rdkit_if_available():
    Chem = pytest.importorskip("rdkit.Chem")
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("CCO"))
    AllChem.EmbedMolecule(mol, randomSeed=7)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    pos = mol.GetConformer().GetPositions()
    expected = {tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))) for b in mol.GetBonds()}
    assert {tuple(x) for x in geometry.find_bonds(z, pos).tolist()} == expected


def test_find_bonds_unknown_element():
    with pytest.raises(ValueError, match="covalent radius"):
        geometry.find_bonds([6, 100], [[0, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="covalent radius"):
        geometry.find_bonds([0, 1], [[0, 0, 0], [1, 0, 0]])


def _stretched_trajectory(n_frames=10, at=6, by=0.6):
    frames = np.repeat(ETHANOL_POS[None], n_frames, 0).copy()
    direction = ETHANOL_POS[HYDROXYL_H] - ETHANOL_POS[HYDROXYL_O]
    direction /= np.linalg.norm(direction)
    frames[at:, HYDROXYL_H] += by * direction * np.linspace(1, 1.5, n_frames - at)[:, None]  # O-H stretches
    return frames


def test_bond_deviation_detects_stretched_bond():
    crit = st.BondDeviationCriterion.from_structures(ETHANOL_Z, ETHANOL_POS)
    assert crit.threshold == st.EVALUATION_BOND_THRESHOLD == 0.5 and st.TRAINING_BOND_THRESHOLD == 0.25
    frames = _stretched_trajectory()
    values, flags = crit.check(torch.tensor(frames))
    assert values.shape == (10,)
    assert torch.allclose(values[:6], torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert values[6] == pytest.approx(0.6)
    assert flags.tolist() == [False] * 6 + [True] * 4
    assert torch.equal(crit.is_unstable(values), flags)
    # numpy in, and (T, R, N, 3) in -> (T, R) out
    two = np.stack([frames, np.repeat(ETHANOL_POS[None], 10, 0)], 1)
    v2 = crit(two)
    assert v2.shape == (10, 2) and not crit.unstable(v2[:, 1]).any()
    # float32 stays float32
    assert crit(torch.tensor(frames, dtype=torch.float32)).dtype == torch.float32


def test_bond_deviation_from_dataset_uses_mean_lengths():
    rng = np.random.default_rng(0)
    frames = ETHANOL_POS + rng.normal(0, 0.02, (20, 9, 3))
    ds = QMDataset(ETHANOL_Z, frames)
    crit = st.BondDeviationCriterion.from_dataset(ds, threshold=st.TRAINING_BOND_THRESHOLD)
    assert crit.threshold == 0.25 and crit.bonds.shape == (8, 2)
    d = np.linalg.norm(frames[:, crit.bonds[:, 1]] - frames[:, crit.bonds[:, 0]], axis=-1).mean(0)
    np.testing.assert_allclose(crit.reference_lengths.numpy(), d, rtol=1e-12)


def test_nan_frames_are_unstable():
    crit = st.BondDeviationCriterion.from_structures(ETHANOL_Z, ETHANOL_POS)
    frames = np.repeat(ETHANOL_POS[None], 2, 0)
    frames[1, 0, 0] = np.nan
    assert crit.unstable(crit(frames)).tolist() == [False, True]


def _two_waters(separation):
    """Two waters whose O atoms are `separation` apart along x, unwrapped (O of b at x < 0)."""
    w = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    a = w + [0.3, 5.0, 5.0]
    b = -w + [0.3 - separation, 5.0, 5.0]
    return np.concatenate([a, b])


def _intermolecular_min(x):
    return np.linalg.norm(x[:3, None] - x[None, 3:], axis=-1).min()


def test_minimum_distance_criterion_periodic():
    box = np.eye(3) * 10.0
    crit = st.MinimumDistanceCriterion.from_atoms_per_molecule(3, 6, box=box)
    assert crit.direction == "below" and crit.threshold == 1.2
    unwrapped = np.stack([_two_waters(3.0), _two_waters(1.0)])
    frames = unwrapped % 10.0  # the second molecule is wrapped across the x boundary
    values, flags = crit.check(frames)
    assert values.numpy() == pytest.approx([_intermolecular_min(x) for x in unwrapped])
    assert float(values[1]) == pytest.approx(1.0)  # O-O
    assert flags.tolist() == [False, True]
    # without the box the molecules look far apart: the min image matters
    assert float(crit(frames[1], box=np.eye(3) * 100.0)) > 5.0
    with pytest.raises(ValueError):
        st.MinimumDistanceCriterion(np.zeros(3, dtype=int))
    with pytest.raises(ValueError):
        st.MinimumDistanceCriterion.from_atoms_per_molecule(3, 7)


def test_callable_criterion():
    def max_speedish(positions, box):
        return torch.as_tensor(positions).abs().amax(dim=(-1, -2))

    crit = st.CallableCriterion(max_speedish, threshold=2.0)
    assert crit.unstable(crit(np.array([[[1.0, 0, 0]], [[3.0, 0, 0]]]))).tolist() == [False, True]
    below = st.CallableCriterion(max_speedish, threshold=2.0, direction="below")
    assert below.unstable(torch.tensor([1.0, 3.0])).tolist() == [True, False]
    assert isinstance(crit, st.StabilityCriterion)
    with pytest.raises(ValueError):
        st.CallableCriterion(max_speedish, 1.0, direction="up")


def test_first_instability():
    flags = torch.tensor(
        [
            [False, False, True],
            [False, True, True],
            [False, False, False],  # a replica may look fine again after failing: first time counts
            [True, True, True],
        ]
    )
    times = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    t, failed = st.first_instability(flags, times)
    assert t.tolist() == pytest.approx([0.4, 0.2, 0.1])
    assert failed.tolist() == [True, True, True]  # replica 0 failed AT the last check: an event
    t, failed = st.first_instability(flags[:3].numpy(), times[:3].numpy())
    assert t.tolist() == pytest.approx([0.3, 0.2, 0.1])  # never failed -> total time
    assert failed.tolist() == [False, True, True]
    with pytest.raises(ValueError):
        st.first_instability(flags, times[:2])


def test_survival_curve():
    times, frac = st.survival_curve(torch.tensor([1.0, 2.0, 5.0]), [True, True, False], horizon=5.0)
    assert times.tolist() == [0.0, 1.0, 2.0, 5.0]
    assert frac.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 1 / 3])
    times, frac = st.survival_curve(np.array([1.0, 2.0, 5.0]), [True, True, False], horizon=5.0, n_points=6)
    assert times.tolist() == pytest.approx([0, 1, 2, 3, 4, 5])
    assert frac.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3])
    # the third replica failed at the horizon: the curve drops to 0 there
    times, frac = st.survival_curve([1.0, 2.0, 5.0], [True, True, True], horizon=5.0)
    assert times.tolist() == [0.0, 1.0, 2.0, 5.0] and frac.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    with pytest.raises(ValueError, match="2 failed flags for 3"):
        st.survival_curve([1.0, 2.0, 5.0], [True, True], horizon=5.0)

"""Shared test fixtures: small, generic, cheap.

Every test process runs single-threaded, whatever the caller's environment says: the
test machines have few cores shared with other jobs, and the bit-exact comparisons
(e.g. an engine run against the same run after a model swap, a resumed refinement
against an uninterrupted one) assume the same summation order in every run of a
session, which a user's OMP_NUM_THREADS or a torch default of one thread per core
would change. The variables are set (not defaulted) before torch or OpenMM is imported
by any test module, and torch's own intra-op count is pinned too; subprocesses the
tests start inherit the variables.
"""
from __future__ import annotations

import os

TEST_THREADS = "1"
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENMM_CPU_THREADS"):
    os.environ[_name] = TEST_THREADS

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(TEST_THREADS))

from _structures import ETHANOL_BONDS, ETHANOL_POSITIONS, ETHANOL_Z  # noqa: E402


def pytest_configure(config):
    """Refuse to run without pytest-timeout: without it pyproject's ``timeout`` is only an
    unknown-option warning, and a hung OpenMM or Ray call would stall the run for ever."""
    if not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("pytest-timeout is not installed (it is in the test extra: "
                                "pip install -e '.[test]'); the per-test timeout would not apply")


@pytest.fixture(scope="session")
def ethanol_shared():
    """The same (atomic numbers, positions) as `ethanol`, one pair for the whole session.

    For module- or session-scoped fixtures (e.g. a model fitted once); never modify these
    arrays in place. Tests use `ethanol`, which hands out fresh copies.
    """
    return ETHANOL_Z, ETHANOL_POSITIONS


@pytest.fixture
def ethanol(ethanol_shared):
    """(atomic numbers (9,) int64, positions (9, 3) float64 Angstrom) of ethanol; fresh copies."""
    z, positions = ethanol_shared
    return z.copy(), positions.copy()


@pytest.fixture(scope="session")
def ethanol_bonds():
    """The covalent bonds of the `ethanol` fixture as (i, j) pairs."""
    return tuple(ETHANOL_BONDS)


@pytest.fixture
def rng():
    """A seeded NumPy generator, so tests that perturb geometries are reproducible."""
    return np.random.default_rng(1234)


# --- session-wide reference data and a small pre-trained model --------------------------------
# Built once per test session and shared: treat both as read-only (copy before changing).
XTB_ETHANOL_SETTINGS = dict(n_frames=60, temperature=500.0, timestep_fs=0.5, stride=10, equilibration_steps=100, seed=0)


@pytest.fixture(scope="session")
def xtb_ethanol(tmp_path_factory):
    """A `QMDataset` of 60 GFN2-xTB ethanol frames at 500 K (0.3 ps, frames 5 fs apart),
    saved to a file (its ``source``); a few seconds with tblite. Read-only: shared by all tests."""
    pytest.importorskip("tblite")
    from openmm_stable.data.generate import generate_xtb_dataset

    path = tmp_path_factory.mktemp("xtb_ethanol") / "ethanol_xtb.npz"
    return generate_xtb_dataset("ethanol", path, progress=False, **XTB_ETHANOL_SETTINGS)


@pytest.fixture(scope="session")
def pretrained_ethanol_model(xtb_ethanol, tmp_path_factory):
    """A tiny SchNet pre-trained on `xtb_ethanol` for a few seconds (val force MAE ~0.2 eV/A).

    Good enough for short MD at 500 K: with Langevin friction 10/ps replicas stay stable
    for picoseconds; with 1/ps a few of 16 replicas fail within ~1-3 ps (useful for
    stability tests). Read-only: deep-copy before training or changing it."""
    from openmm_stable.training.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("pretrained_ethanol")
    config = PretrainConfig(architecture="schnet", preset="tiny", train=48, val=12, test=0, max_epochs=100,
                            batch_size=16, lr=5e-3, patience=1000, device="cpu", seed=0)
    model, _ = pretrain(xtb_ethanol, config, out, progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def pretrained_ethanol_model_file(pretrained_ethanol_model, tmp_path_factory):
    """`pretrained_ethanol_model` saved with `save_model` (a path; read-only)."""
    from openmm_stable.models import save_model

    path = tmp_path_factory.mktemp("pretrained_ethanol_file") / "model.pt"
    save_model(pretrained_ethanol_model, path)
    return path

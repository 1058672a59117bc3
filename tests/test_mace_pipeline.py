"""A user's MACE `.model` through the whole pipeline, on the CLI and from Python:
import (pickle only with the opt-in) -> simulate -> refine -> export --format mace, and the
refined file gives the refined model's forces in mace's own MACECalculator."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("mace")

from openmm_stable.cli import main  # noqa: E402
from openmm_stable.models import load_model, read_model_record  # noqa: E402
from openmm_stable.models.base import energy_and_forces  # noqa: E402

REFINE_FLAGS = ["--epochs", "2", "--replicas", "2", "--epoch-ps", "0.02", "--equilibration-ps", "0.0",
                "--learning", "windows", "--no-progress"]


@pytest.fixture(scope="module")
def users_mace_file(xtb_ethanol, tmp_path_factory):
    """What a user brings: a tiny MACE trained (by `pretrain`, for a few epochs) on the
    ethanol frames and written as a MACE .model file."""
    from openmm_stable.models.mace import export_mace_model
    from openmm_stable.training.pretrain import PretrainConfig, pretrain

    out = tmp_path_factory.mktemp("users_mace")
    config = PretrainConfig(architecture="mace", preset="tiny", train=48, val=12, test=0, max_epochs=3,
                            batch_size=16, lr=5e-3, patience=1000, device="cpu", seed=0)
    model, _ = pretrain(xtb_ethanol, config, out / "pre", progress=False)
    assert model.spec["hparams"]["atomic_numbers"] == [1, 6, 8]  # the table came from the data
    return export_mace_model(model, out / "users.model")


def _mace_forces(path, dataset, frame: int = 0) -> np.ndarray:
    from ase import Atoms
    from mace.calculators import MACECalculator

    atoms = Atoms(numbers=dataset.atomic_numbers, positions=dataset.positions[frame])
    atoms.calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")
    return atoms.get_forces()


def _our_forces(model, dataset, frame: int = 0) -> np.ndarray:
    model = model.double()
    z = torch.as_tensor(dataset.atomic_numbers)
    pos = torch.as_tensor(dataset.positions[frame], dtype=torch.float64)
    _, forces = energy_and_forces(model, z, pos, torch.zeros(len(z), dtype=torch.long))
    return forces.detach().numpy()


def test_a_users_mace_file_on_the_cli(users_mace_file, xtb_ethanol, tmp_path, capsys):
    data = xtb_ethanol.source
    imported = tmp_path / "imported.pt"
    assert main(["import", str(users_mace_file), "--out", str(imported), "--data", data]) == 2  # no opt-in
    assert not imported.exists()
    assert main(["import", str(users_mace_file), "--allow-pickle", "--out", str(imported), "--data", data]) == 0
    record = read_model_record(imported)  # our record: opens without pickle
    assert record.architecture == "mace" and list(record.atomic_numbers) == list(xtb_ethanol.atomic_numbers)
    np.testing.assert_allclose(_our_forces(load_model(imported), xtb_ethanol), _mace_forces(users_mace_file,
                                                                                            xtb_ethanol),
                               rtol=1e-6, atol=1e-8)

    assert main(["simulate", str(imported), "--data", data, "--replicas", "2", "--time", "0.02", "--check-interval", "0.01",
                 "--out", str(tmp_path / "sim"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert metrics["n_replicas"] == 2 and metrics["replica_ps"] > 0

    assert main(["refine", str(imported), "--data", data, "--out", str(tmp_path / "ref"), *REFINE_FLAGS]) == 0
    refined = load_model(tmp_path / "ref" / "model.pt")
    assert read_model_record(tmp_path / "ref" / "model.pt").architecture == "mace"

    out = tmp_path / "refined.model"
    assert main(["export", str(tmp_path / "ref" / "model.pt"), "--format", "mace", "--out", str(out)]) == 0
    assert "MACECalculator" in capsys.readouterr().out
    np.testing.assert_allclose(_mace_forces(out, xtb_ethanol, 5), _our_forces(refined, xtb_ethanol, 5),
                               rtol=1e-6, atol=1e-8)
    # --format mace writes the model itself: replica options do not apply.
    assert main(["export", str(tmp_path / "ref" / "model.pt"), "--format", "mace", "--replicas", "2",
                 "--out", str(tmp_path / "x.model")]) == 2


def test_a_users_mace_file_from_python(users_mace_file, xtb_ethanol, tmp_path):
    from openmm_stable.models import save_model
    from openmm_stable.models.mace import export_mace_model, import_mace_model
    from openmm_stable.training.stable import StableConfig, refine

    model = import_mace_model(users_mace_file, allow_pickle=True)
    save_model(model, tmp_path / "imported.pt", atomic_numbers=xtb_ethanol.atomic_numbers)
    config = StableConfig(learning="windows", max_epochs=2, n_replicas=2, epoch_ps=0.02, equilibration_ps=0.0,
                          frame_interval_ps=0.01, bond_threshold=0.02, unstable_fraction=0.5,
                          observable={"name": "bond_lengths"}, log_signal=False)
    refined, summary = refine(tmp_path / "imported.pt", xtb_ethanol, config, tmp_path / "ref", progress=False)
    assert summary["epochs"] == 2
    moved = max(float((a - b).abs().max()) for a, b in zip(refined.parameters(), model.parameters()))
    assert moved > 0  # the 0.02 A threshold flags every replica: learning steps were taken
    out = export_mace_model(refined, tmp_path / "refined.model")
    np.testing.assert_allclose(_mace_forces(out, xtb_ethanol, 3), _our_forces(refined, xtb_ethanol, 3),
                               rtol=1e-6, atol=1e-8)

"""A plain revised-MD17 file (no temperature, kcal/mol) through every command, as a new user
runs it; the temperature policy, the model record and the error contract of the CLI."""
import json

import numpy as np
import pytest

from openmm_stable.cli import main
from openmm_stable.data import QMDataset, load_dataset
from openmm_stable.engine import EngineConfig
from openmm_stable.errors import InputError
from openmm_stable.models import read_model_record
from openmm_stable.temperature import FALLBACK_TEMPERATURE_K, dataset_temperature, with_sampling_temperature
from openmm_stable.units import KCAL_PER_MOL_IN_EV


def _write_rmd17(dataset, path):
    """The field's standard layout: coords (A), energies and forces (kcal/mol), nuclear_charges;
    no temperature anywhere."""
    np.savez(path, coords=dataset.positions, nuclear_charges=dataset.atomic_numbers,
             energies=dataset.energies / KCAL_PER_MOL_IN_EV, forces=dataset.forces / KCAL_PER_MOL_IN_EV)
    return path


@pytest.fixture(scope="module")
def rmd17_file(xtb_ethanol, tmp_path_factory):
    return _write_rmd17(xtb_ethanol, tmp_path_factory.mktemp("rmd17") / "rmd17_ethanol.npz")


def test_temperature_rules_in_one_place(xtb_ethanol, capsys):
    bare = QMDataset(xtb_ethanol.atomic_numbers, xtb_ethanol.positions[:4], energies=xtb_ethanol.energies[:4])
    assert EngineConfig().temperature_K is None  # "the dataset's", settled by simulate/refine
    assert dataset_temperature(xtb_ethanol) == 500.0  # recorded by the generator
    assert dataset_temperature(bare, requested=350.0) == 350.0
    assert dataset_temperature(bare) == FALLBACK_TEMPERATURE_K
    assert "records no sampling temperature" in capsys.readouterr().err
    # The reference: as asked, else recorded, else the run temperature (no reweighting).
    assert with_sampling_temperature(bare, 400.0).temperature == 400.0
    assert "without reweighting" in capsys.readouterr().err
    assert with_sampling_temperature(bare, 400.0, reference_temperature_K=500.0).temperature == 500.0
    assert with_sampling_temperature(xtb_ethanol, 400.0) is xtb_ethanol
    with pytest.raises(InputError, match="positive"):
        with_sampling_temperature(bare, 400.0, reference_temperature_K=-3.0)


def test_rmd17_file_through_every_command(rmd17_file, tmp_path, capsys):
    data = load_dataset(rmd17_file)
    assert data.temperature is None and len(data) == 60
    pre = tmp_path / "pre"
    # 60 frames and no split flags: the default split falls back to fractions, with a note.
    assert main(["pretrain", str(rmd17_file), "--out", str(pre), "--preset", "tiny", "--epochs", "2",
                 "--device", "cpu", "--no-progress"]) == 0
    assert "80 % / 10 % / 10 %" in capsys.readouterr().err
    metrics = json.loads((pre / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (48, 6, 6)

    # Every model file carries its record; export needs nothing else.
    record = read_model_record(pre / "model.pt")
    assert record.atomic_numbers.tolist() == data.atomic_numbers.tolist()
    assert record.training_temperature_K is None and record.dataset_fingerprint == data.fingerprint()
    assert main(["export", str(pre / "model.pt"), "--out", str(tmp_path / "model_openmm.pt")]) == 0
    assert "atomic numbers from the model file" in capsys.readouterr().out

    # simulate: the file records no temperature, so the run is at 500 K and the reference is
    # taken at the run temperature; saying the reference temperature makes it reweight.
    sim = ["simulate", str(pre / "model.pt"), "--data", str(rmd17_file), "--replicas", "2", "--time", "0.05",
           "--check-interval", "0.025", "--vacf-interval", "0", "--platform", "CPU", "--no-progress"]
    assert main(sim + ["--out", str(tmp_path / "sim")]) == 0
    err = capsys.readouterr().err
    assert "simulating at 500 K" in err and "without reweighting" in err
    plain = json.loads((tmp_path / "sim" / "metrics.json").read_text())
    assert plain["temperature_K"] == 500.0 and plain["reference_ess"] == 60.0
    assert main(sim + ["--out", str(tmp_path / "sim_rw"), "--reference-temperature", "400"]) == 0
    reweighted = json.loads((tmp_path / "sim_rw" / "metrics.json").read_text())
    assert reweighted["temperature_K"] == 500.0 and 1.0 <= reweighted["reference_ess"] < 60.0

    # refine runs on the same file and its model carries the run temperature.
    assert main(["refine", str(pre / "model.pt"), "--data", str(rmd17_file), "--out", str(tmp_path / "ref"),
                 "--epochs", "1", "--replicas", "2", "--epoch-ps", "0.15", "--platform", "CPU",
                 "--no-progress"]) == 0
    assert read_model_record(tmp_path / "ref" / "model.pt").training_temperature_K == 500.0


def test_model_of_another_molecule_is_refused_before_simulating(rmd17_file, tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(["pretrain", str(rmd17_file), "--out", str(pre), "--preset", "tiny", "--epochs", "1",
                 "--device", "cpu", "--no-progress"]) == 0
    data = load_dataset(rmd17_file)
    water = QMDataset([8, 1, 1], np.array([[[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]]),
                      energies=np.zeros(1), forces=np.zeros((1, 3, 3)))
    from openmm_stable.data import save_dataset

    other = save_dataset(water, tmp_path / "water.npz")
    capsys.readouterr()
    for command in ("simulate", "refine"):
        assert main([command, str(pre / "model.pt"), "--data", str(other), "--out", str(tmp_path / command),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "C2H6O" in err and "H2O" in err and "another molecule" in err
        assert not (tmp_path / command / "metrics.json").exists()
    assert data.n_atoms == 9


def test_bugs_show_their_traceback_and_bad_input_does_not(monkeypatch, tmp_path, capsys):
    import openmm_stable.cli.data as data_cli

    assert main(["data", "info", str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in capsys.readouterr().err

    def broken(args):
        raise ValueError("an internal bug, not bad input")

    monkeypatch.setattr(data_cli, "cmd_info", broken)  # registered anew by every main()
    with pytest.raises(ValueError, match="internal bug"):
        main(["data", "info", str(tmp_path / "missing.npz")])


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch):
    import importlib

    import openmm_stable.cli as cli

    real_import = importlib.import_module

    def failing(name, *rest):
        if name == "openmm_stable.cli.compare":
            raise ModuleNotFoundError("No module named 'openmm_stable.cli.compare'", name=name)
        return real_import(name, *rest)

    monkeypatch.setattr(cli.importlib, "import_module", failing)
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser()

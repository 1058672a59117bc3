"""Bad input is refused early and clearly: an `InputError` (exit code 2 on the command line)
whose message says what is wrong, raised before any simulation or training starts.

Every input here is built by the test itself (a few frames of a fixed ethanol geometry),
so nothing depends on an MD trajectory.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from openmm_stable.cli import main
from openmm_stable.data import QMDataset, load_dataset, save_dataset, split_dataset
from openmm_stable.data.splits import split_indices
from openmm_stable.errors import InputError

from _structures import ETHANOL_POSITIONS, ETHANOL_Z


def _frames(n: int, temperature=500.0) -> QMDataset:
    """`n` labelled frames: ethanol with small fixed displacements (values are arbitrary)."""
    rng = np.random.default_rng(0)
    positions = ETHANOL_POSITIONS[None] + 0.02 * rng.standard_normal((n, len(ETHANOL_Z), 3))
    return QMDataset(ETHANOL_Z, positions, energies=rng.standard_normal(n),
                     forces=rng.standard_normal((n, len(ETHANOL_Z), 3)), temperature=temperature)


# --- 1. too few frames for a split ----------------------------------------------------------------
def test_a_fraction_that_rounds_to_no_frame_is_a_clear_error():
    """refine splits 90 % / 10 %: with 4 frames the validation part was empty (None) and the
    trainer failed later with AttributeError: 'NoneType' object has no attribute 'n_atoms'."""
    with pytest.raises(InputError, match=r"4 frames: too few for a train/val/test split .*val would get 0 frames"):
        split_dataset(_frames(4), 0.9, 0.1, 0)
    with pytest.raises(InputError, match="5 frames: too few .*val would get 0"):
        split_indices(5, "80%", "10%", None)
    # An explicit 0 is not an error, and counts are taken as given.
    assert split_dataset(_frames(4), 3, 1, 0).test is None
    assert [len(p) for p in split_indices(10, 0.9, 0.1, 0)] == [9, 1, 0]


def test_fractions_that_add_up_to_one_never_exceed_the_frames():
    """15 frames at 90 % / 10 %: 13.5 and 1.5 round (half to even) to 14 and 2, one frame
    more than there are; it comes off the larger part instead of failing."""
    assert [len(p) for p in split_indices(15, 0.9, 0.1, 0)] == [13, 2, 0]
    train, val, _ = split_indices(15, 0.9, 0.1, 0)
    assert not set(train) & set(val)
    with pytest.raises(InputError, match="exceed the 15 frames"):  # counts are still checked as given
        split_indices(15, 14, 2, 0)


def test_refine_on_a_four_frame_file_stops_with_the_split_message(tmp_path, capsys):
    from openmm_stable.models import create_model, save_model

    data = save_dataset(_frames(4), tmp_path / "four.npz")
    model = tmp_path / "model.pt"
    save_model(create_model("schnet", "tiny"), model, atomic_numbers=ETHANOL_Z.tolist())
    code = main(["refine", str(model), "--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "4 frames: too few for a train/val/test split" in err and "Traceback" not in err


# --- 2. our own npz format with broken fields ----------------------------------------------------------
@pytest.mark.parametrize("key, value, message", [
    ("metadata", json.dumps([1, 2]), "field 'metadata': a JSON list, expected a JSON object"),
    ("metadata", "{not json", "field 'metadata': not valid JSON"),
    ("temperature", "hot", "field 'temperature': not numeric"),
    ("temperature", -5.0, "field 'temperature': -5.0 K; expected a positive number"),
    ("temperature", [300.0, 310.0], "field 'temperature': expected one number"),
    ("format_version", "one", "field 'format_version': not numeric"),
    ("energies", ["a", "b", "c", "d"], "field 'energies': not numeric"),
])
def test_own_format_with_a_broken_field_names_the_file_and_the_field(tmp_path, key, value, message):
    good = save_dataset(_frames(4), tmp_path / "good.npz")
    arrays = dict(np.load(good))
    arrays[key] = np.array(value)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(InputError, match=f"^{bad}: {message}"):
        load_dataset(bad)
    assert main(["data", "info", str(bad)]) == 2


def test_a_temperature_that_is_not_a_number_is_refused_on_construction():
    with pytest.raises(InputError, match="field 'temperature': not a number"):
        _frames(2, temperature="warm")
    with pytest.raises(InputError, match="field 'temperature': 0.0 K"):
        _frames(2, temperature=0.0)
    assert _frames(2, temperature="300").temperature == 300.0  # a numeric string is a number


# --- 3. another molecule of the same formula ------------------------------------------------------------
def _bonded(spec: str):
    from openmm_stable.data.molecules import build_molecule
    from openmm_stable.geometry import find_bonds

    z, positions = build_molecule(spec)
    return z, positions, find_bonds(z, positions)


def test_same_formula_other_bond_graph_is_another_molecule():
    from openmm_stable.data.dataset import molecule_difference

    z_e, pos_e, bonds_e = _bonded("ethanol")
    z_d, _, bonds_d = _bonded("COC")  # dimethyl ether, C2H6O too
    assert molecule_difference(z_e, z_d) is None  # the formula alone cannot tell them apart
    assert molecule_difference(z_e, z_d, bonds_e, bonds_d) == \
        "both C2H6O, but bonded differently (C-C 1, C-H 5, C-O 1, H-O 1 vs C-H 6, C-O 2)"
    # Atom order does not matter: ethanol with its atoms shuffled is ethanol.
    from openmm_stable.geometry import find_bonds

    order = np.random.default_rng(3).permutation(len(z_e))
    assert molecule_difference(z_e, z_e[order], bonds_e, find_bonds(z_e[order], pos_e[order])) is None
    # Same bond counts, other connectivity: 1-propanol and 2-propanol.
    z1, _, b1 = _bonded("CCCO")
    z2, _, b2 = _bonded("CC(O)C")
    assert molecule_difference(z1, z2, b1, b2) == \
        "both C3H8O with bonds C-C 2, C-H 7, C-O 1, H-O 1, but connected differently"
    assert molecule_difference(z_e, _bonded("O")[0]) == "C2H6O vs H2O"


def test_export_for_another_molecule_needs_force(tmp_path, capsys):
    from openmm_stable.models import create_model, save_model

    z, _, bonds = _bonded("ethanol")
    model = tmp_path / "ethanol.pt"
    save_model(create_model("schnet", "tiny"), model, atomic_numbers=z, bonds=bonds)
    out = tmp_path / "exported.pt"
    for other, why in (("water", "C2H6O vs H2O"), ("COC", "both C2H6O, but bonded differently")):
        assert main(["export", str(model), "--molecule", other, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"molecule {other} is another molecule than {model} was trained on ({why}" in err
        assert "give --force" in err and not out.exists()
    assert main(["export", str(model), "--molecule", "COC", "--out", str(out), "--force"]) == 0
    assert "warning: molecule COC is another molecule" in capsys.readouterr().err and out.exists()
    assert main(["export", str(model), "--molecule", "ethanol", "--out", str(out)]) == 0  # the same molecule
    assert "warning" not in capsys.readouterr().err


# --- 4. a lost worker is a worker failure, not bad input -----------------------------------------------
def test_a_lost_worker_is_reported_as_a_worker_failure_not_bad_input(monkeypatch, capsys):
    import openmm_stable.cli.simulate as simulate_command
    from openmm_stable.distributed import WorkerLostError, WorkerTimeoutError
    from openmm_stable.errors import WorkerError

    for error in (WorkerLostError, WorkerTimeoutError):
        assert issubclass(error, WorkerError) and issubclass(error, RuntimeError)
        assert not issubclass(error, InputError)

    def lose_a_worker(args):
        raise WorkerLostError("distributed engine: worker 1 (replicas 2-3) died and was restarted 3 times already")

    monkeypatch.setattr(simulate_command, "run", lose_a_worker)
    assert main(["simulate", "model.pt", "--data", "data.npz", "--out", "out"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("openmm-stable simulate: worker failure: distributed engine: worker 1 (replicas 2-3) died")
    assert "Traceback" not in err


# --- 7. the example configs --------------------------------------------------------------------------------
EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads_as_refine_reads_it(path):
    from openmm_stable.config import config_from_yaml
    from openmm_stable.training.stable import StableConfig

    config = config_from_yaml(StableConfig, str(path), {})
    assert isinstance(config, StableConfig)


def test_the_readme_configs_exist_and_take_the_datasets_temperature():
    """The README's commands name these files; the molecule one sets no temperature, so a
    500 K aspirin file is refined at 500 K (the demo's 700 K file was a trap when copied)."""
    import re

    import yaml

    readme = (EXAMPLES.parent / "README.md").read_text()
    named = set(re.findall(r"--config (\S+\.yaml)", readme))
    assert {"examples/refine.yaml", "examples/refine_water.yaml"} <= named
    for name in named:
        assert (EXAMPLES.parent / name).exists(), name
    for name in ("refine.yaml", "refine_water.yaml"):
        assert "temperature_K" not in yaml.safe_load((EXAMPLES / name).read_text()).get("engine", {})
    water = yaml.safe_load((EXAMPLES / "refine_water.yaml").read_text())
    assert water["stability"] == "min_distance" and water["observable"]["name"] == "rdf"


def test_production_md_seed_is_reproducible_by_default():
    pytest.importorskip("openmmml")
    import importlib.util

    spec = importlib.util.spec_from_file_location("production_md", EXAMPLES / "production_md.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.parse_args(["model.pt", "--structure", "ethanol"]).seed == 1  # never OpenMM's "random" 0
    with pytest.raises(SystemExit):
        module.parse_args(["model.pt", "--structure", "ethanol", "--seed", "0"])


# --- 8. other malformed input ----------------------------------------------------------------------------
def test_data_info_describes_odd_but_valid_metadata_instead_of_failing(tmp_path, capsys):
    """Metadata is free-form JSON; hand-edited files had `data info` fail with
    AttributeError/KeyError on a molecule that is a string or chains without seeds."""
    ds = _frames(3)
    ds.metadata.update({"molecule": "aspirin", "original_units": "eV", "chains": [{"frames": 3}]})
    path = save_dataset(ds, tmp_path / "odd.npz")
    assert main(["data", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "molecule    aspirin" in out and "frames per chain 3; seeds ?" in out


def test_molecule_metadata_of_the_wrong_type_is_a_clear_error():
    from openmm_stable.geometry import molecule_ids

    ds = _frames(2)
    for key, value, message in (("atoms_per_molecule", "three", "atoms_per_molecule must be a positive integer"),
                                ("atoms_per_molecule", 2.5, "atoms_per_molecule must be a positive integer"),
                                ("molecule_ids", ["a"] * 9, "molecule_ids must be a list of integers")):
        ds.metadata = {key: value}
        with pytest.raises(InputError, match=message):
            molecule_ids(ds)
    ds.metadata = {"atoms_per_molecule": 3}
    assert molecule_ids(ds).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]

"""Dataset formats, unit conversion, input errors, splits and the `data info`/`data split` CLI.

Every test writes its own tiny files (no downloads). Unit checks compare with numbers
worked out by hand, not with the constants the code uses.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from openmm_stable.cli import main
from openmm_stable.data import (
    DatasetError,
    QMDataset,
    load_dataset,
    parse_size,
    save_dataset,
    split_dataset,
)

KCAL_IN_EV = 0.0433641  # 1 kcal/mol = 4.184 kJ/mol / 96.485 kJ/mol per eV
N_FRAMES, Z = 4, np.array([6, 8, 1, 1])  # formaldehyde-like, 4 atoms


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    R = rng.normal(size=(N_FRAMES, len(Z), 3))
    F = rng.normal(size=(N_FRAMES, len(Z), 3))
    E = -1000.0 + rng.normal(size=N_FRAMES)
    return R, F, E


def write_md17(path, **changes):
    R, F, E = _arrays()
    data = {"E": E[:, None], "F": F, "R": R, "z": Z, "name": np.array("test"), "theory": np.array("PBE")}
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not None}
    np.savez(path, **data)
    return path


# --- formats -------------------------------------------------------------------------------
def test_md17_npz_converts_kcal_per_mol(tmp_path):
    path = write_md17(tmp_path / "md17.npz")
    ds = load_dataset(path)
    R, F, E = _arrays()
    assert len(ds) == N_FRAMES and ds.n_atoms == 4
    np.testing.assert_array_equal(ds.atomic_numbers, Z)
    np.testing.assert_allclose(ds.positions, R)
    np.testing.assert_allclose(ds.energies, E * KCAL_IN_EV, rtol=1e-5)
    np.testing.assert_allclose(ds.forces, F * KCAL_IN_EV, rtol=1e-5)  # kcal/mol/A -> eV/A
    assert ds.energies[0] == pytest.approx(E[0] * 0.0433641, rel=1e-5)
    assert ds.metadata["original_units"] == {"energy": "kcal/mol", "length": "Angstrom"}
    assert ds.metadata["name"] == "test" and ds.box is None


def test_md22_npz_same_layout(tmp_path):
    path = write_md17(tmp_path / "md22_Ac-Ala3-NHMe.npz")
    ds = load_dataset(path, format="md22")
    assert ds.metadata["source_format"] == "md22"
    np.testing.assert_allclose(ds.energies, _arrays()[2] * KCAL_IN_EV, rtol=1e-5)
    assert load_dataset(path).metadata["source_format"] == "sgdml"  # auto: MD17 and MD22 look alike


def test_sgdml_unit_keys_are_honoured(tmp_path):
    path = write_md17(tmp_path / "ev.npz", e_unit=np.array("eV"), r_unit=np.array("Ang"))
    ds = load_dataset(path)
    np.testing.assert_allclose(ds.energies, _arrays()[2])


def test_revised_md17_npz(tmp_path):
    R, F, E = _arrays()
    path = tmp_path / "rmd17_aspirin.npz"
    np.savez(path, coords=R, energies=E, forces=F, nuclear_charges=Z, old_indices=np.arange(N_FRAMES))
    ds = load_dataset(path)
    assert ds.metadata["source_format"] == "rmd17"
    np.testing.assert_allclose(ds.energies, E * KCAL_IN_EV, rtol=1e-5)
    np.testing.assert_allclose(ds.forces, F * KCAL_IN_EV, rtol=1e-5)
    np.testing.assert_allclose(ds.positions, R)


def test_extxyz_with_energies_forces_cell_and_velocities(tmp_path):
    import ase
    import ase.io
    import ase.units
    from ase.calculators.singlepoint import SinglePointCalculator

    R, F, E = _arrays()
    cell = np.diag([10.0, 11.0, 12.0])
    frames = []
    for i in range(N_FRAMES):
        atoms = ase.Atoms(numbers=Z, positions=R[i], cell=cell, pbc=True)
        atoms.set_velocities(np.full((len(Z), 3), 0.01 / ase.units.fs))  # 0.01 A/fs = 10 A/ps
        atoms.calc = SinglePointCalculator(atoms, energy=E[i], forces=F[i])
        atoms.info["time_ps"] = 0.005 * i
        frames.append(atoms)
    path = tmp_path / "frames.extxyz"
    ase.io.write(path, frames, format="extxyz")
    ds = load_dataset(path)
    np.testing.assert_allclose(ds.energies, E, atol=1e-6)  # eV as ASE writes it
    np.testing.assert_allclose(ds.forces, F, atol=1e-6)
    np.testing.assert_allclose(ds.positions, R, atol=1e-6)
    np.testing.assert_allclose(ds.box, cell)
    np.testing.assert_allclose(ds.velocities, 10.0, rtol=1e-5)
    np.testing.assert_allclose(ds.times, 0.005 * np.arange(N_FRAMES))
    # An explicit unit overrides ASE's eV, e.g. for an xyz file written in kcal/mol.
    ds_kcal = load_dataset(path, energy_unit="kcal/mol")
    np.testing.assert_allclose(ds_kcal.energies, E * KCAL_IN_EV, rtol=1e-5)
    assert ds_kcal.metadata["original_units"]["energy"] == "kcal/mol"


def test_extxyz_energy_in_info_without_calculator(tmp_path):
    path = tmp_path / "plain.xyz"
    path.write_text(
        "2\nProperties=species:S:1:pos:R:3:forces:R:3 energy=-1.5 pbc=\"F F F\"\n"
        "H 0 0 0 0.1 0 0\nH 0 0 0.74 -0.1 0 0\n"
    )
    ds = load_dataset(path)
    assert ds.energies[0] == pytest.approx(-1.5)
    np.testing.assert_allclose(ds.forces[0, :, 0], [0.1, -0.1])


def test_own_format_round_trip(tmp_path):
    R, F, E = _arrays()
    ds = QMDataset(
        atomic_numbers=Z, positions=R, energies=E, forces=F, box=np.eye(3) * 20.0,
        times=np.arange(N_FRAMES) * 0.01, velocities=F * 2.0, temperature=500.0,
        metadata={"method": "GFN2-xTB", "seed": np.int64(3), "nested": {"a": [1, 2]}},
    )
    path = save_dataset(ds, tmp_path / "own.npz")
    back = load_dataset(path)
    for name in ("atomic_numbers", "positions", "energies", "forces", "box", "times", "velocities"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ds, name))
    assert back.temperature == 500.0
    assert back.metadata["method"] == "GFN2-xTB" and back.metadata["seed"] == 3
    assert back.metadata["nested"] == {"a": [1, 2]}
    assert back.fingerprint() == ds.fingerprint()
    with np.load(path) as raw:  # the file states its format and units explicitly
        assert str(raw["format"]) == "openmm-stable-dataset" and int(raw["format_version"]) == 1
        assert str(raw["energy_unit"]) == "eV" and str(raw["length_unit"]) == "Angstrom"


def test_own_format_converts_stored_units_and_optional_fields(tmp_path):
    R, F, E = _arrays()
    path = tmp_path / "kcal.npz"
    np.savez(path, format=np.array("openmm-stable-dataset"), format_version=np.array(1),
             energy_unit=np.array("kcal/mol"), length_unit=np.array("nm"),
             atomic_numbers=Z, positions=R, energies=E, forces=F, metadata=np.array(json.dumps({})))
    ds = load_dataset(path)
    np.testing.assert_allclose(ds.positions, R * 10.0)
    np.testing.assert_allclose(ds.energies, E * KCAL_IN_EV, rtol=1e-5)
    np.testing.assert_allclose(ds.forces, F * KCAL_IN_EV / 10.0, rtol=1e-5)
    assert ds.temperature is None and ds.box is None and ds.velocities is None


# --- bad input: each class names the file and the field -------------------------------------------
def _error(path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    return message


def test_missing_keys_lists_found_keys(tmp_path):
    message = _error(write_md17(tmp_path / "nof.npz", F=None))
    assert "'F'" in message and "missing" in message
    assert "found: E, R, name, theory, z" in message


def test_unknown_npz_layout(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, a=np.zeros(3), b=np.ones(2))
    message = _error(path)
    assert "unsupported npz layout" in message and "a, b" in message


def test_mismatched_shapes(tmp_path):
    R, F, E = _arrays()
    message = _error(write_md17(tmp_path / "shape.npz", F=F[:, :3]))
    assert "field 'forces' (key 'F')" in message and "shape (4, 3, 3)" in message
    message = _error(write_md17(tmp_path / "shape_e.npz", E=E[:3]))
    assert "field 'energies' (key 'E')" in message


def test_nan_and_inf(tmp_path):
    R, F, E = _arrays()
    R[1, 2, 0] = np.nan
    message = _error(write_md17(tmp_path / "nan.npz", R=R))
    assert "field 'positions' (key 'R')" in message and "non-finite" in message and "(1, 2, 0)" in message
    E[3] = np.inf
    assert "field 'energies'" in _error(write_md17(tmp_path / "inf.npz", E=E))


@pytest.mark.parametrize("bad_z", [0, 200])
def test_unknown_atomic_number(tmp_path, bad_z):
    message = _error(write_md17(tmp_path / "z.npz", z=np.array([6, 8, bad_z, 1])))
    assert "field 'atomic_numbers' (key 'z')" in message and f"unknown atomic number(s) [{bad_z}]" in message


def test_empty_files(tmp_path):
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    assert "empty file" in _error(empty)
    empty_npz = tmp_path / "empty.npz"
    np.savez(empty_npz)
    assert "empty npz" in _error(empty_npz)


def test_unknown_units(tmp_path):
    path = write_md17(tmp_path / "u.npz")
    message = _error(path, energy_unit="furlongs")
    assert "field 'energy_unit'" in message and "unknown energy unit 'furlongs'" in message and "kcal/mol" in message
    assert "field 'length_unit'" in _error(path, length_unit="parsec")


def test_unreadable_and_unsupported_files(tmp_path):
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not a structure\n")
    assert "unreadable or unsupported" in _error(garbage)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, E=np.array([{"a": 1}], dtype=object))
    assert "unreadable npz" in _error(pickled)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_dataset(tmp_path / "missing.npz")


def test_frames_with_different_atoms(tmp_path):
    import ase
    import ase.io

    path = tmp_path / "mixed.xyz"
    ase.io.write(path, [ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]]),
                        ase.Atoms("HF", positions=[[0, 0, 0], [0, 0, 0.9]])])
    assert "frame 1 has different atoms" in _error(path)


# --- splits --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, total, expected",
    [("1k", None, 1000), ("50k", None, 50000), ("1.5k", None, 1500), ("200", None, 200), (200, None, 200),
     ("2M", None, 2_000_000), ("0.1", 500, 50), ("10%", 500, 50), ("0", None, 0)],
)
def test_parse_size(text, total, expected):
    assert parse_size(text, total) == expected


@pytest.mark.parametrize("text", ["abc", "-5", "1.5", "1.2345k", "0.1", "150%"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)  # "0.1" fails here only because no dataset size is given


def _indexed(n=50):
    """Dataset whose energies are the frame numbers, so splits can be read off them."""
    return QMDataset(atomic_numbers=[1, 1], positions=np.zeros((n, 2, 3)), energies=np.arange(n, dtype=float),
                     forces=np.zeros((n, 2, 3)), times=np.arange(n) * 0.1)


def test_contiguous_split_keeps_time_order():
    train, val, test = split_dataset(_indexed(), "20", 10, "0.2", mode="contiguous")
    np.testing.assert_array_equal(train.energies, np.arange(20))
    np.testing.assert_array_equal(val.energies, np.arange(20, 30))
    np.testing.assert_array_equal(test.energies, np.arange(30, 40))
    assert train.metadata["split"]["part"] == "train" and train.metadata["split"]["mode"] == "contiguous"


def test_random_split_is_disjoint_and_seeded():
    ds = _indexed()
    a = split_dataset(ds, 20, 10, 10, mode="random", seed=1)
    b = split_dataset(ds, 20, 10, 10, mode="random", seed=1)
    c = split_dataset(ds, 20, 10, 10, mode="random", seed=2)
    ids = [set(part.energies.astype(int)) for part in a]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    np.testing.assert_array_equal(a.train.energies, b.train.energies)
    assert not np.array_equal(a.train.energies, c.train.energies)
    expected = np.sort(np.random.default_rng(1).permutation(50)[:20])
    np.testing.assert_array_equal(a.train.energies, expected)
    assert np.all(np.diff(a.train.times) > 0)  # time order kept inside a part


def test_split_remainder_and_errors():
    train, val, test = split_dataset(_indexed(), "30", "15", None, mode="contiguous")
    assert len(test) == 5
    assert split_dataset(_indexed(), 40, 10, None).test is None  # nothing left: no empty dataset
    with pytest.raises(ValueError, match="exceed the 50 frames"):
        split_dataset(_indexed(), "1k", 10, 10)
    with pytest.raises(ValueError, match="unknown split mode"):
        split_dataset(_indexed(), 10, 10, 10, mode="shuffled")


# --- CLI -----------------------------------------------------------------------------------
def test_cli_info_good(tmp_path, capsys):
    path = write_md17(tmp_path / "md17.npz")
    assert main(["data", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "frames      4" in out and "formula CH2O" in out
    assert "kcal/mol" in out and "mean |F|" in out and "RMS" in out and "not periodic" in out
    E = _arrays()[2] * KCAL_IN_EV
    shown_min = float(re.search(r"^energy\s+min (\S+)", out, re.MULTILINE).group(1))
    assert shown_min == pytest.approx(E.min(), abs=1e-5)  # printed in eV


def test_cli_info_bad_input(tmp_path, capsys):
    path = write_md17(tmp_path / "nof.npz", F=None)
    assert main(["data", "info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("openmm-stable data: error:") and "'F'" in err and "nof.npz" in err
    assert main(["data", "info", str(write_md17(tmp_path / "ok.npz")), "--energy-unit", "furlongs"]) == 2
    assert "unknown energy unit" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path / "missing.npz")]) == 2


def test_cli_split(tmp_path, capsys):
    path = save_dataset(_indexed(), tmp_path / "all.npz")
    prefix = tmp_path / "part"
    assert main(["data", "split", str(path), "--train", "30", "--val", "10", "--test", "10",
                 "--mode", "contiguous", "--out-prefix", str(prefix)]) == 0
    train = load_dataset(f"{prefix}_train.npz")
    test = load_dataset(f"{prefix}_test.npz")
    np.testing.assert_array_equal(train.energies, np.arange(30))
    np.testing.assert_array_equal(test.energies, np.arange(40, 50))
    assert main(["data", "split", str(path), "--train", "1k", "--val", "1", "--out-prefix", str(prefix)]) == 2

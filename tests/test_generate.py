"""Built-in molecules and xTB reference-data generation (tiny ethanol runs, a second or so each)."""
from __future__ import annotations

import numpy as np
import pytest

from openmm_stable.cli import main
from openmm_stable.data import load_dataset
from openmm_stable.data.generate import generate_xtb_dataset, make_xtb_calculator, partial_paths
from openmm_stable.data.molecules import BUILTIN_SMILES, build_molecule, resolve_molecule

pytest.importorskip("tblite")

AMU_A2_PER_PS2_IN_EV = 1.0364269e-4  # 1 amu * (1 A/ps)^2 = 1.6605e-27 kg * 1e4 m^2/s^2 / 1.6022e-19 J
K_B_EV = 8.617333e-5
FAST = dict(stride=2, equilibration_steps=10, progress=False)


# --- molecules -----------------------------------------------------------------------------
def test_builtin_molecules_case_insensitive_and_deterministic():
    z, pos = build_molecule("aspirin")
    assert sorted(z.tolist()) == sorted([6] * 9 + [1] * 8 + [8] * 4) and pos.shape == (21, 3)
    z2, pos2 = build_molecule("ASPIRIN")
    np.testing.assert_array_equal(z, z2)
    np.testing.assert_allclose(pos, pos2)
    z, _ = build_molecule("ac-ala3-nhme")
    assert len(z) == 42  # C12 H22 N4 O4, the MD22/NequIP peptide
    assert {"aspirin", "ethanol", "Ac-Ala3-NHMe"} <= set(BUILTIN_SMILES)


def test_smiles_and_structure_file(tmp_path):
    import ase.io

    z, pos = build_molecule("C=O")
    assert sorted(z.tolist()) == [1, 1, 6, 8]
    distances = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    assert distances[z == 6][:, z == 8].min() == pytest.approx(1.22, abs=0.05)  # relaxed C=O bond
    path = tmp_path / "start.xyz"
    ase.io.write(path, ase.Atoms(numbers=z, positions=pos))
    assert resolve_molecule(str(path))["kind"] == "file"
    z3, pos3 = build_molecule(str(path))
    np.testing.assert_array_equal(z3, z)
    np.testing.assert_allclose(pos3, pos, atol=1e-6)


def test_unknown_molecule_lists_builtins():
    with pytest.raises(ValueError, match="unknown molecule 'unobtainium'.*aspirin, ethanol, Ac-Ala3-NHMe"):
        build_molecule("unobtainium")


# --- generation ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ethanol(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "ethanol.npz"
    ds = generate_xtb_dataset("ethanol", path, n_frames=5, seed=3, **FAST)
    return path, ds


def test_generated_dataset_shapes_units_metadata(ethanol):
    path, ds = ethanol
    assert len(ds) == 5 and ds.n_atoms == 9
    assert ds.positions.shape == ds.forces.shape == ds.velocities.shape == (5, 9, 3)
    np.testing.assert_allclose(ds.times, (np.arange(5) + 1) * 2 * 0.5e-3)  # (k+1) * stride * dt, ps
    # GFN2 total energy of ethanol is about -11.4 Hartree = -310 eV: catches a Hartree/eV mix-up.
    assert -320 < ds.energies.mean() < -300
    assert np.abs(ds.forces).max() < 20.0  # eV/A: thermal forces, not a unit blow-up
    # Kinetic temperature from velocities in A/ps: a wrong ASE-time conversion is off by ~10x.
    masses = np.array([12.011, 12.011, 15.999] + [1.008] * 6)
    kinetic = 0.5 * (masses[None, :, None] * ds.velocities**2).sum(axis=(1, 2)) * AMU_A2_PER_PS2_IN_EV
    t_kin = 2 * kinetic.mean() / (3 * 9 * K_B_EV)
    assert 150 < t_kin < 1500
    meta = ds.metadata
    assert meta["method"] == "GFN2-xTB" and meta["seed"] == 3 and meta["stride"] == 2
    assert meta["timestep_fs"] == 0.5 and meta["temperature_K"] == 500.0 and meta["complete"] is True
    assert meta["molecule"]["name"] == "ethanol" and meta["versions"]["tblite"]
    assert ds.temperature == 500.0
    back = load_dataset(path)
    np.testing.assert_array_equal(back.forces, ds.forces)
    assert back.metadata["molecule"] == meta["molecule"]
    assert not partial_paths(path)[0].exists()  # finished runs clean up


def test_forces_are_minus_energy_gradient(ethanol):
    """Stored forces = -dE/dx by central differences on stored positions.

    h = 1e-3 A: truncation error h^2/6 |d3E/dx3| and SCF noise / h are both ~1e-4 eV/A here
    (measured). A tolerance of 2e-3 eV/A (0.1 % of typical |F| ~ 1-2 eV/A) still catches
    frames misaligned by one MD step (|dF| ~ 0.1-1 eV/A), unit or sign errors.
    """
    import ase

    _, ds = ethanol
    calc = make_xtb_calculator(ds.metadata["method"])
    h = 1e-3
    for frame in (0, 4):
        for atom, axis in ((0, 0), (2, 1), (5, 2)):
            energies = []
            for sign in (1, -1):
                pos = ds.positions[frame].copy()
                pos[atom, axis] += sign * h
                atoms = ase.Atoms(numbers=ds.atomic_numbers, positions=pos)
                atoms.calc = calc
                energies.append(atoms.get_potential_energy())
            fd_force = -(energies[0] - energies[1]) / (2 * h)
            assert fd_force == pytest.approx(ds.forces[frame, atom, axis], abs=2e-3)


def test_interrupted_generation_keeps_frames_and_resumes(tmp_path):
    out = tmp_path / "eth.npz"
    frames_path, settings_path = partial_paths(out)

    def stop_after_three(k, frame):
        assert set(frame) >= {"positions", "energy", "forces", "velocities", "time"}
        if k == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_xtb_dataset("ethanol", out, n_frames=5, on_frame=stop_after_three, **FAST)
    partial = load_dataset(frames_path)  # the crash-safe file, readable as it is
    assert len(partial) == 3 and partial.velocities is not None and settings_path.exists()
    saved = load_dataset(out)  # frames so far, marked incomplete
    assert len(saved) == 3 and saved.metadata["complete"] is False
    np.testing.assert_allclose(partial.energies, saved.energies, atol=1e-6)

    with pytest.raises(ValueError, match="resume"):  # never silently overwrite a partial run
        generate_xtb_dataset("ethanol", out, n_frames=5, **FAST)
    with pytest.raises(ValueError, match="setting 'seed'"):
        generate_xtb_dataset("ethanol", out, n_frames=5, seed=9, resume=True, **FAST)

    done = generate_xtb_dataset("ethanol", out, n_frames=5, resume=True, **FAST)
    assert len(done) == 5 and done.metadata["complete"] is True and done.metadata["resumed"] is True
    np.testing.assert_allclose(done.energies[:3], saved.energies, atol=1e-6)
    np.testing.assert_allclose(done.times, (np.arange(5) + 1) * 1e-3)
    assert not frames_path.exists() and not settings_path.exists()

    # Against an uninterrupted run with the same seed: the frames before the interruption are
    # that run's (to the 8 decimals the partial file keeps), and the resumed run continues from
    # the last of them. It cannot be the same run after that (the Langevin noise stream
    # restarts; see the module docstring), but one frame later it is still much closer to the
    # uninterrupted frame than that frame is to its predecessor (measured 0.004 A against
    # 0.025 A); a resume that started the molecule afresh would be far off.
    straight = generate_xtb_dataset("ethanol", tmp_path / "straight.npz", n_frames=5, **FAST)
    np.testing.assert_allclose(done.positions[:3], straight.positions[:3], rtol=0, atol=1e-6)
    np.testing.assert_allclose(done.velocities[:3], straight.velocities[:3], rtol=0, atol=1e-5)
    np.testing.assert_allclose(done.energies[:3], straight.energies[:3], rtol=0, atol=1e-5)
    moved = np.abs(straight.positions[3] - straight.positions[2]).max()
    assert np.abs(done.positions[3] - straight.positions[3]).max() < 0.5 * moved


def test_cli_generate(tmp_path, capsys):
    out = tmp_path / "cli.npz"
    args = ["data", "generate", "--molecule", "CO", "--frames", "2", "--stride", "1",
            "--equilibration-steps", "2", "--seed", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert "wrote 2 frames" in capsys.readouterr().out
    ds = load_dataset(out)
    assert len(ds) == 2 and ds.metadata["molecule"]["kind"] == "smiles"
    assert main(["data", "generate", "--molecule", "unobtainium", "--frames", "2", "--out", str(out)]) == 2
    assert "built-in names" in capsys.readouterr().err


# --- friction in 1/ps, torn frames ------------------------------------------------------------------
def _interrupted_after(out, n_done: int, **settings):
    """An interrupted run of 5 frames with `n_done` frames on disk (as after Ctrl-C)."""
    def stop(k, frame):
        if k == n_done - 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_xtb_dataset("ethanol", out, n_frames=5, on_frame=stop, **FAST, **settings)
    return partial_paths(out)


def test_friction_is_per_ps_like_simulate_and_old_partial_settings_still_resume(tmp_path, monkeypatch, capsys):
    """`data generate --friction` is 1/ps, as on simulate and refine (it was 1/fs, so
    `--friction 10` meant a 0.1 fs relaxation). ASE's Langevin gets it in its own units."""
    import json

    import ase.md.langevin
    import ase.units

    given = []

    class RecordingLangevin(ase.md.langevin.Langevin):
        def __init__(self, *args, friction, **kwargs):
            given.append(friction)
            super().__init__(*args, friction=friction, **kwargs)

    monkeypatch.setattr(ase.md.langevin, "Langevin", RecordingLangevin)
    out = tmp_path / "cli.npz"
    assert main(["data", "generate", "--molecule", "ethanol", "--frames", "2", "--stride", "1", "--friction", "5",
                 "--equilibration-steps", "2", "--no-progress", "--out", str(out)]) == 0
    assert load_dataset(out).metadata["friction_per_ps"] == 5.0
    assert given[-1] == pytest.approx(5.0 / (1000.0 * ase.units.fs))  # 5/ps = 0.005/fs
    with pytest.raises(SystemExit):
        main(["data", "generate", "--help"])
    assert "Langevin friction in 1/ps" in " ".join(capsys.readouterr().out.split())

    # A partial run started by an older version recorded friction_per_fs: it resumes, converted.
    frames_path, settings_path = _interrupted_after(tmp_path / "old.npz", 2)
    settings = json.loads(settings_path.read_text())
    settings["friction_per_fs"] = settings.pop("friction_per_ps") / 1000.0
    settings_path.write_text(json.dumps(settings))
    done = generate_xtb_dataset("ethanol", tmp_path / "old.npz", n_frames=5, resume=True, **FAST)
    assert len(done) == 5 and done.metadata["friction_per_ps"] == 10.0 and "friction_per_fs" not in done.metadata
    # ... but not with another friction than the one asked for now.
    _interrupted_after(tmp_path / "other.npz", 2)
    with pytest.raises(ValueError, match="setting 'friction_per_ps' was 10.0, now 2.0"):
        generate_xtb_dataset("ethanol", tmp_path / "other.npz", n_frames=5, resume=True, friction_per_ps=2.0, **FAST)


def test_resume_drops_a_frame_torn_by_a_kill_mid_write(tmp_path, capsys):
    """A kill (or a full disk) in the middle of a frame's write leaves part of it at the end
    of the partial file; --resume cuts it off, says so, and continues from the frame before."""
    out = tmp_path / "eth.npz"
    frames_path, _ = _interrupted_after(out, 3)
    whole = frames_path.read_bytes()
    kept = load_dataset(frames_path)
    frame_bytes = len(whole) // 3
    # Cut by hand inside the third frame's atom lines, in the middle of a number.
    cut = whole[: 2 * frame_bytes + frame_bytes // 2]
    assert not cut.endswith(b"\n") and cut[-1:].isdigit()
    frames_path.write_bytes(cut)
    with pytest.raises(ValueError, match="unreadable"):  # what made the file unusable before
        load_dataset(frames_path)
    done = generate_xtb_dataset("ethanol", out, n_frames=5, resume=True, **FAST)
    err = capsys.readouterr().err
    assert "dropped a torn last frame" in err and "resuming after frame 2" in err
    assert len(done) == 5 and done.metadata["complete"] is True
    np.testing.assert_allclose(done.positions[:2], kept.positions[:2], atol=1e-12)
    assert not np.allclose(done.positions[2], kept.positions[2])  # frame 3 was made again


def test_a_frame_whose_digest_fails_is_dropped_and_garbage_is_refused(tmp_path, capsys):
    from openmm_stable.data.generate import drop_torn_frame

    out = tmp_path / "eth.npz"
    frames_path, _ = _interrupted_after(out, 2)
    whole = frames_path.read_bytes()
    # Complete lines, but one digit of the last frame changed: only the digest tells.
    last_digit = max(i for i in range(len(whole)) if whole[i:i + 1].isdigit())
    changed = whole[:last_digit] + (b"1" if whole[last_digit:last_digit + 1] != b"1" else b"2") + whole[last_digit + 1:]
    frames_path.write_bytes(changed)
    assert drop_torn_frame(frames_path) == 1
    assert "dropped a torn last frame" in capsys.readouterr().err
    first_frame = whole[: whole.index(b"\n9\nProperties") + 1]
    assert frames_path.read_bytes() == first_frame and len(load_dataset(frames_path)) == 1
    assert drop_torn_frame(frames_path) == 1  # a whole file is left alone
    frames_path.write_bytes(whole + b"not a frame\n" * 200)
    with pytest.raises(ValueError, match="not a frame cut short"):
        drop_torn_frame(frames_path)

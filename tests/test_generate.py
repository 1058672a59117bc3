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

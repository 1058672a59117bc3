"""Observable targets from a user's file (`openmm_stable.targets`): g(r) tables mapped onto
an observable's bins, units, every validation error, scalar diffusivity targets, and
their use in `refine --target` and `simulate --rdf-target / --diffusivity-target`.

Every table here is written by the test from an analytic curve, so the expected numbers
are known without any MD; the runs only check that the numbers reported are the ones
computed from the files they wrote.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_water import N_WATERS, TOY_THRESHOLD, ToyWater, lattice_water, toy_lattice_dataset

from openmm_stable.cli import main
from openmm_stable.data import QMDataset
from openmm_stable.data.formats import save_dataset
from openmm_stable.engine import EngineConfig
from openmm_stable.errors import InputError
from openmm_stable.observables import HrObservable, RdfObservable
from openmm_stable.simulate import SimulationConfig, simulate
from openmm_stable.targets import map_curve, observable_target, read_table, scalar_target
from openmm_stable.training.stable import StableConfig, StableTrainer


def g_curve(r):
    """A liquid-like g(r): zero at contact, a first peak at 2.8 A, decaying to 1."""
    r = np.asarray(r, dtype=float)
    return (1.0 - np.exp(-((r / 2.4) ** 8))) * (1.0 + 1.5 * np.exp(-((r - 2.8) / 0.3) ** 2))


def write_table(path, header: str, rows, comment: str = "# a test table\n") -> str:
    lines = [",".join(f"{x:.17g}" for x in row) for row in rows]
    path.write_text(comment + header + "\n" + "\n".join(lines) + "\n")
    return str(path)


def goo_table(path, r=None, column: str = "r_A", scale: float = 1.0, sigma: bool = True) -> str:
    r = np.arange(0.005, 7.0, 0.01) if r is None else r
    rows = np.stack([r * scale, g_curve(r)] + ([0.05 + 0.01 * r] if sigma else []), 1)
    return write_table(path, f"{column},g" + (",sigma" if sigma else ""), rows)


# --- tables onto bins ------------------------------------------------------------------------
def test_table_maps_onto_the_bins_within_the_interpolation_error(tmp_path):
    """Linear interpolation of a table with spacing h errs by at most h^2/8 max|g''|; sigma,
    linear in r, is interpolated exactly, and the weights are 1/sigma^2 with mean 1."""
    obs = RdfObservable(pair=(8, 8), r_max=6.0, n_bins=120)
    target = observable_target(obs, goo_table(tmp_path / "goo.csv"))
    centres = obs.bin_centres.numpy()
    dense = np.linspace(0.005, 7.0, 200001)
    g2 = np.abs(np.gradient(np.gradient(g_curve(dense), dense), dense)).max()
    bound = 0.01 ** 2 / 8 * g2
    err = np.abs(target.values.numpy() - g_curve(centres))
    assert target.values.shape == (120,) and err.max() <= bound * 1.01 and err.max() > 0
    w = 1.0 / (0.05 + 0.01 * centres) ** 2
    np.testing.assert_allclose(target.weights.numpy(), w / w.mean(), rtol=1e-9)
    assert target.weights.mean().item() == pytest.approx(1.0)
    assert target.record()["source"] == str(tmp_path / "goo.csv") and target.record()["sigma_given"]


def test_nm_tables_are_converted_and_nm_under_an_angstrom_name_refused(tmp_path):
    obs = RdfObservable(pair=(8, 8), r_max=6.0, n_bins=120)
    in_a = observable_target(obs, goo_table(tmp_path / "a.csv"))
    in_nm = observable_target(obs, goo_table(tmp_path / "nm.csv", column="r_nm", scale=0.1))
    np.testing.assert_allclose(in_nm.values.numpy(), in_a.values.numpy(), rtol=1e-12, atol=1e-12)
    for column in ("r", "r_A"):  # the same nm numbers under an Angstrom name: first peak at 0.28 "A"
        path = goo_table(tmp_path / f"wrong_{column}.csv", column=column, scale=0.1)
        with pytest.raises(InputError, match=r"highest peak of g lies at r = 0\.28\d* A.*almost surely in nm"):
            read_table(path)


def test_several_pairs_side_by_side_in_the_observables_order(tmp_path):
    """Water's training observable: O-O, O-H, H-H blocks; a column may name a pair in either
    element order; sigma on some pairs only gives no weights."""
    r = np.arange(0.005, 4.0, 0.01)
    rows = np.stack([r, g_curve(r), 2 * g_curve(r), 3 * g_curve(r), 0.1 + 0 * r], 1)
    path = write_table(tmp_path / "w.csv", "r_A,g_H-H,g_H-O,g_O-O,sigma_O-O", rows)
    obs = RdfObservable(pairs=((8, 8), (8, 1), (1, 1)), r_max=3.0, n_bins=30)
    target = observable_target(obs, path)
    c = obs.bin_centres.numpy()
    expected = np.concatenate([np.interp(c, r, 3 * g_curve(r)), np.interp(c, r, 2 * g_curve(r)),
                               np.interp(c, r, g_curve(r))])
    np.testing.assert_allclose(target.values.numpy(), expected, rtol=1e-12)
    assert target.columns == ["g_O-O", "g_H-O", "g_H-H"] and target.weights is None
    with pytest.raises(InputError, match=r"pair O-O needs a column 'g_O-O'"):
        observable_target(RdfObservable(pairs=((8, 8), (8, 1))), write_table(tmp_path / "one.csv", "r_A,g_O-H",
                                                                               rows[:, :2]))


def test_hr_and_whitespace_tables(tmp_path):
    r = np.arange(0.01, 11.0, 0.05)
    h = np.exp(-((r - 1.5) / 0.2) ** 2)
    path = tmp_path / "h.txt"
    path.write_text("# h(r) of a molecule\n r_A  h \n" + "\n".join(f"{a:.17g}   {b:.17g}" for a, b in zip(r, h)))
    obs = HrObservable(r_max=10.0, n_bins=200)
    np.testing.assert_allclose(observable_target(obs, path).values.numpy(), np.interp(obs.bin_centres.numpy(), r, h))
    with pytest.raises(InputError, match="rdf or hr observable; the observable here is 'bond_lengths'"):
        observable_target(type("Obs", (), {"name": "bond_lengths"})(), path)


@pytest.mark.parametrize("header, rows, message", [
    ("r_A,sigma", [[1.0, 0.1], [2.0, 0.1]], "column 'sigma' has no value column"),
    ("x,g", [[1.0, 0.0], [2.0, 1.0]], r"exactly one distance column, one of r, r_A, r_nm"),
    ("r,r_nm,g", [[1.0, 0.1, 0.0], [2.0, 0.2, 1.0]], r"exactly one distance column"),
    ("r_A", [[1.0], [2.0]], "no value column"),
    ("r_A,g", [[1.0, 0.0], [3.0, 1.0], [2.0, 0.5]], r"strictly increasing \(3 then 2 A in data rows 2, 3\)"),
    ("r_A,g", [[1.0, 0.0], [1.0, 1.0]], "strictly increasing"),
    ("r_A,g", [[0.0, 0.0], [2.0, 1.0]], r"r must be > 0"),
    ("r_A,g", [[1.0, -0.1], [2.0, 1.0]], r"g must be >= 0 \(found -0.1 at r = 1 A\)"),
    ("r_A,g,sigma", [[1.0, 0.0, 0.1], [2.0, 1.0, 0.0]], "sigma must be > 0"),
    ("r_A,g", [[1.0, float("nan")], [2.0, 1.0]], "line 3: values must be finite"),
    ("r_A,g", [[1.0, 0.0]], "at least two rows"),
    ("r_A,g,g", [[1.0, 0.0, 0.0], [2.0, 1.0, 1.0]], "repeated column names"),
    ("r_A,g,err", [[1.0, 0.0, 0.1], [2.0, 1.0, 0.1]], r"unknown column\(s\) \['err'\]"),
    ("r_A,g_O-O,sigma_O-H", [[1.0, 0.0, 0.1], [2.0, 1.0, 0.1]], "column 'sigma_O-H' has no value column"),
    ("r_nm,g", [[0.01, 0.0], [0.02, 1.0], [0.03, 0.5]], "even with r read as nm"),
])
def test_every_table_error_names_the_problem(tmp_path, header, rows, message):
    with pytest.raises(InputError, match=message):
        read_table(write_table(tmp_path / "bad.csv", header, rows))


def test_malformed_lines_and_missing_files(tmp_path):
    (tmp_path / "short.csv").write_text("r_A,g\n1,0\n2\n")
    with pytest.raises(InputError, match="line 3 has 1 fields, the header names 2"):
        read_table(tmp_path / "short.csv")
    (tmp_path / "text.csv").write_text("r_A,g\n1,0\n2,abc\n")
    with pytest.raises(InputError, match="line 3: not a number"):
        read_table(tmp_path / "text.csv")
    with pytest.raises(InputError, match="does not exist"):
        read_table(tmp_path / "none.csv")


def test_a_table_that_does_not_cover_the_bins_says_which_range_is_missing(tmp_path):
    obs = RdfObservable(pair=(8, 8), r_max=6.0, n_bins=120)  # centres 0.025 .. 5.975 A
    short = goo_table(tmp_path / "short.csv", r=np.arange(2.0, 5.0, 0.01))
    with pytest.raises(InputError, match=r"covers r = 2-4\.99 A.*missing 0\.025-2 A and 4\.99-5\.975 A"):
        observable_target(obs, short)
    # the documented way out: bins that the table covers (r_min, r_max)
    inside = RdfObservable(pair=(8, 8), r_min=2.0, r_max=4.9, n_bins=29)
    np.testing.assert_allclose(observable_target(inside, short).values.numpy(),
                               g_curve(inside.bin_centres.numpy()), atol=1e-4)
    with pytest.raises(InputError, match="for the rdf or hr observable"):
        map_curve(read_table(short), inside.bin_centres.numpy(), None, "adf")


# --- scalar targets ----------------------------------------------------------------------------
def test_diffusivity_units_convert_exactly(tmp_path):
    """1 cm^2/s = 1e16 A^2 / 1e12 ps = 1e4 A^2/ps; 1 m^2/s = 1e4 cm^2/s = 1e8 A^2/ps."""
    assert scalar_target("1cm^2/s").value == 1e4
    assert scalar_target("1 m^2/s").value == 1e8
    assert scalar_target("0.23A^2/ps").value == 0.23
    t = scalar_target("2.5e-5+-0.5e-5 cm^2/s")
    assert t.value == pytest.approx(0.25, rel=1e-15) and t.sigma == pytest.approx(0.05, rel=1e-15)
    assert scalar_target({"name": "diffusivity", "value": 2.5e-9, "sigma": 1e-10, "unit": "m^2/s"}).value == \
        pytest.approx(0.25, rel=1e-15)
    (tmp_path / "d.yaml").write_text("name: diffusivity\nvalue: 2.5e-5\nsigma: 1.0e-6\nunit: cm^2/s\n")
    t = scalar_target(str(tmp_path / "d.yaml"))
    assert t.value == pytest.approx(0.25, rel=1e-15) and t.sigma == pytest.approx(0.01, rel=1e-15)


@pytest.mark.parametrize("spec, message", [
    ("2.3e-5", "has no unit"),
    ("2.3e-5 cm2/s", "unknown diffusivity unit 'cm2/s'; known: A\\^2/ps, cm\\^2/s, m\\^2/s"),
    ("-2.3e-5 cm^2/s", "must be finite and > 0"),
    ("2.3e-5+-0 cm^2/s", "sigma must be finite and > 0"),
    ("fast", "expected VALUE\\[\\+-SIGMA\\]UNIT"),
    ({"value": 1.0, "unit": "A^2/ps", "error": 0.1}, "unknown key\\(s\\) \\['error'\\]"),
    ({"value": 1.0}, "needs 'value' and 'unit'"),
    ({"name": "viscosity", "value": 1.0, "unit": "A^2/ps"}, "known scalar targets: diffusivity"),
])
def test_bad_scalar_targets(spec, message):
    with pytest.raises(InputError, match=message):
        scalar_target(spec)


# --- refine --target ---------------------------------------------------------------------------
def labelled_water(n_frames: int = 10) -> QMDataset:
    """Lattice water frames jiggled by 0.05 A, labelled with SPC/Fw (the real reference)."""
    from openmm_stable.data.water import WaterReference

    x, box = lattice_water()
    frames = x[None] + np.random.default_rng(0).normal(0.0, 0.05, (n_frames, *x.shape))
    ref = WaterReference(N_WATERS, box)
    labels = [ref(f) for f in frames]
    return QMDataset(np.tile([8, 1, 1], N_WATERS), frames, energies=np.array([e for e, _ in labels]),
                     forces=np.stack([f for _, f in labels]), box=box, temperature=300.0,
                     metadata={"atoms_per_molecule": 3}, source="jiggled lattice")


def test_refine_with_a_target_table(tmp_path):
    """The target is the table on the observable's bins (recorded in metrics.json), the
    loss is computed against it, and a non-curve observable is refused before any run."""
    from openmm_stable.models import create_model, save_model

    data = labelled_water()
    save_dataset(data, tmp_path / "water.npz")
    torch.manual_seed(0)
    model = create_model("schnet", "tiny", cutoff=3.0)
    save_model(model, tmp_path / "model.pt", atomic_numbers=data.atomic_numbers)
    table = goo_table(tmp_path / "goo.csv")
    observable = {"name": "rdf", "pair": [8, 8], "r_max": 3.0, "n_bins": 30}
    # the loss the trainer computes on given frames is the MSE against the table on its bins
    config = StableConfig(n_replicas=2, epoch_ps=0.1, frame_interval_ps=0.01, equilibration_ps=0.02,
                          observable=observable, observable_target=table,
                          engine=EngineConfig(temperature_K=300.0, platform="CPU"))
    trainer = StableTrainer(model, data, config, tmp_path / "direct", progress=False)
    obs = RdfObservable(pair=(8, 8), r_max=3.0, n_bins=30)
    expected = np.interp(obs.bin_centres.numpy(), *np.loadtxt(table, delimiter=",", skiprows=2, usecols=(0, 1)).T)
    mean = obs(torch.as_tensor(data.positions), data.atomic_numbers, data.box).mean(0).numpy()
    assert trainer.observable_loss_of(data.positions) == pytest.approx(np.mean((mean - expected) ** 2), rel=1e-9)
    assert trainer.reference_ess is None

    (tmp_path / "refine.yaml").write_text(
        "n_replicas: 2\nepoch_ps: 0.1\nframe_interval_ps: 0.01\nequilibration_ps: 0.02\nmax_epochs: 2\n"
        "unstable_fraction: 0.01\nmin_distance_threshold: 5.0\nengine: {platform: CPU}\n"
        "observable: {name: rdf, pair: [8, 8], r_max: 3.0, n_bins: 30}\n")
    code = main(["refine", str(tmp_path / "model.pt"), "--data", str(tmp_path / "water.npz"), "--config",
                 str(tmp_path / "refine.yaml"), "--target", table, "--out", str(tmp_path / "ref"), "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    recorded = summary["observable_target"]
    assert recorded["source"] == table and recorded["columns"] == ["g"] and recorded["sigma_used_as_weight"] is False
    np.testing.assert_allclose(recorded["values"], expected, rtol=1e-12)
    # threshold 5 A: every replica fails in epoch 1, so epoch 2 takes a step against the table
    assert summary["learning_steps"] == 1 and np.isfinite(summary["last_observable_loss"])
    assert main(["refine", str(tmp_path / "model.pt"), "--data", str(tmp_path / "water.npz"), "--target", table,
                 "--config", str(tmp_path / "refine.yaml"), "--out", str(tmp_path / "ref"), "--overwrite",
                 "--no-progress"]) == 0  # flags over the file: the target is in the saved config
    import yaml

    assert yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())["observable_target"] == table
    with pytest.raises(InputError, match="observable_target: a target table gives a curve over r bins"):
        StableConfig(observable={"name": "bond_lengths"}, observable_target=table)
    with pytest.raises(InputError, match="strictly increasing"):
        StableConfig(observable_target=write_table(tmp_path / "bad.csv", "r_A,g", [[2.0, 0.0], [1.0, 1.0]]))
    assert StableConfig().observable_target is None


# --- simulate --rdf-target / --diffusivity-target -------------------------------------------------
def test_simulate_reports_rdf_and_diffusivity_against_targets(tmp_path):
    """rdf_target_mae is the MAE between the run's rdf.npz model curve and the table
    interpolated independently; the diffusivity error is the run's own number against the
    target, in cm^2/s."""
    start = toy_lattice_dataset()
    table = goo_table(tmp_path / "goo.csv")
    config = SimulationConfig(n_replicas=2, time_ps=0.2, check_interval_ps=0.02, min_distance_threshold=TOY_THRESHOLD,
                              vacf_interval_ps=None, engine=EngineConfig(temperature_K=300.0, platform="CPU"))
    target = scalar_target("2.3e-5+-0.1e-5cm^2/s")
    metrics = simulate(ToyWater(), start, config, tmp_path / "sim", progress=False, rdf_targets={"O-O": table},
                       diffusivity_target=target)
    rdf = np.load(tmp_path / "sim" / "rdf.npz")
    r, g = np.loadtxt(table, delimiter=",", skiprows=2, usecols=(0, 1)).T
    assert set(metrics["rdf_target_mae"]) == {"O-O"}
    assert metrics["rdf_target_mae"]["O-O"] == pytest.approx(np.abs(rdf["model_O-O"] - np.interp(rdf["r"], r, g)).mean(),
                                                             rel=1e-12)
    np.testing.assert_allclose(rdf["target_O-O"], np.interp(rdf["r"], r, g), rtol=1e-12)
    assert metrics["rdf_target"]["O-O"]["source"] == table and metrics["rdf_target"]["O-O"]["sigma_given"]
    d = metrics["diffusivity_target_error"]
    assert d["target_cm2_per_s"] == pytest.approx(2.3e-5) and d["sigma_cm2_per_s"] == pytest.approx(1e-6)
    assert d["error_cm2_per_s"] == pytest.approx(metrics["diffusivity_cm2_per_s"] - 2.3e-5, rel=1e-9)
    assert d["z"] == pytest.approx(d["error_cm2_per_s"] / 1e-6, rel=1e-9)
    assert json.loads((tmp_path / "sim" / "metrics.json").read_text())["rdf_target_mae"] == metrics["rdf_target_mae"]
    # bad targets fail before the run: a pair the system lacks, a table short of the bins
    with pytest.raises(InputError, match="pairs are O-O, O-H, H-H"):
        simulate(ToyWater(), start, config, tmp_path / "x", progress=False, rdf_targets={"O-C": table})
    short = goo_table(tmp_path / "short.csv", r=np.arange(2.0, 5.0, 0.01))
    with pytest.raises(InputError, match="missing 0.0"):
        simulate(ToyWater(), start, config, tmp_path / "y", progress=False, rdf_targets={"H-O": short})
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_simulate_cli_target_flags(tmp_path, capsys):
    """Malformed flags are refused (exit 2) before the model or the data are read."""
    missing = str(tmp_path / "no_model.pt")
    args = ["simulate", missing, "--data", str(tmp_path / "no_data.npz"), "--out", str(tmp_path / "o")]
    assert main(args + ["--rdf-target", "O-O"]) == 2
    assert "expected PAIR=FILE" in capsys.readouterr().err
    assert main(args + ["--diffusivity-target", "2.3e-5"]) == 2
    assert "has no unit" in capsys.readouterr().err
    from openmm_stable.cli import build_parser
    from openmm_stable.cli.simulate import targets_from_args

    parsed = build_parser().parse_args(args + ["--rdf-target", "O-O=a.csv", "--rdf-target", "H-O = b.csv",
                                               "--diffusivity-target", "0.23+-0.01A^2/ps"])
    tables, d = targets_from_args(parsed)
    assert tables == {"O-O": "a.csv", "H-O": "b.csv"} and d.value == 0.23 and d.sigma == 0.01

"""`simulate`: stable times detected at the right check, frozen failed replicas, contained
NaN replicas, metrics.json / plots / DCD files, and the `openmm-stable simulate` CLI.

A model without forces and a Langevin integrator without friction make atoms fly on
straight lines, x(t) = x0 + v0 t, from velocities the tests can draw themselves
(`maxwell_boltzmann` with the engine's seed): every bond deviation, and so every
replica's time of failure, is known in advance.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from openmm_stable.cli import main
from openmm_stable.data import QMDataset, save_dataset
from openmm_stable.errors import InputError
from openmm_stable.engine import EngineConfig, masses_amu, maxwell_boltzmann
from openmm_stable.models import save_model
from openmm_stable.dynamics import first_minimum, green_kubo_diffusivity, vacf, vacf_over_segments
from openmm_stable.simulate import (SimulationConfig, initial_frames, run_replicas, simulate, summary,
                                    vacf_comparison, write_trajectories)
from openmm_stable.stability import BondDeviationCriterion

from test_engine import ElasticNetwork, NaNBeyond, ZeroModel

METRIC_KEYS = {"n_replicas", "time_ps", "temperature_K", "stable_time_ps", "failed", "median_stable_time_ps",
               "stable_fraction", "failures", "replica_ps", "failure_rate_per_ps", "replica_steps_per_s"}


def ballistic_config(**kw) -> SimulationConfig:
    """4 replicas, 0.1 ps, a check every 0.005 ps (10 steps), no friction."""
    engine = EngineConfig(temperature_K=500.0, platform="CPU", friction_per_ps=0.0)
    return SimulationConfig(n_replicas=4, time_ps=0.1, check_interval_ps=0.005, seed=0, engine=engine, **kw)


def predicted_deviations(dataset, config, criterion):
    """(T, R) bond deviations of free flight from the run's starting frames and velocities,
    until each replica's first failure (NaN afterwards), and the expected stable times."""
    start = dataset.positions[initial_frames(dataset, config.n_replicas, config.seed)]
    v0 = maxwell_boltzmann(masses_amu(dataset.atomic_numbers), config.engine.temperature_K,
                           config.n_replicas, config.seed)
    times = (np.arange(config.n_checks) + 1) * config.steps_per_check * config.engine.timestep_ps
    frames = start[None] + v0[None] * times[:, None, None, None]
    dev = criterion(frames).numpy()
    bad = dev > criterion.threshold
    assert bad.any(0).all(), "every replica should fail within the run"
    first = bad.argmax(0)
    expected_dev = np.where(np.arange(len(times))[:, None] <= first[None, :], dev, np.nan)
    return times, expected_dev, times[first]


def test_failures_detected_at_the_right_check_and_frozen(xtb_ethanol, tmp_path):
    config = ballistic_config()
    criterion = BondDeviationCriterion.from_dataset(xtb_ethanol, config.bond_threshold)
    times, expected_dev, expected_stable = predicted_deviations(xtb_ethanol, config, criterion)
    result = run_replicas(ZeroModel(), xtb_ethanol, config, progress=False)

    np.testing.assert_allclose(result.times_ps, times)
    until_failure = ~np.isnan(expected_dev)
    np.testing.assert_allclose(result.deviations[until_failure], expected_dev[until_failure], rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.stable_time_ps, expected_stable, rtol=0, atol=1e-9)
    assert len(set(np.round(expected_stable, 6))) > 1  # replicas fail at different checks
    # frozen: once failed, never stable again; the failed replica restarts from its first frame
    failed_at = until_failure.sum(0) - 1  # index of the check that saw the failure
    for k, c in enumerate(failed_at):
        assert result.stable_mask[:c, k].all() and not result.stable_mask[c:, k].any()
        if c + 1 < len(times):
            assert result.deviations[c + 1, k] < result.deviations[c, k]

    # the recorded frames go to DCD files that mdtraj reads back
    import mdtraj

    paths = write_trajectories(tmp_path / "traj", xtb_ethanol.atomic_numbers, result)
    assert len(paths) == 4
    for k, path in enumerate(paths):
        traj = mdtraj.load(str(path), top=str(tmp_path / "traj" / "topology.pdb"))
        assert traj.n_frames == len(times) and traj.n_atoms == xtb_ethanol.n_atoms
        np.testing.assert_allclose(traj.xyz * 10.0, result.positions[:, k], rtol=0, atol=1e-3)


def test_simulate_metrics_for_failing_model(xtb_ethanol, tmp_path):
    config = ballistic_config()
    criterion = BondDeviationCriterion.from_dataset(xtb_ethanol, config.bond_threshold)
    _, _, expected_stable = predicted_deviations(xtb_ethanol, config, criterion)
    metrics = simulate(ZeroModel(), xtb_ethanol, config, tmp_path, progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert METRIC_KEYS <= set(saved) and "hr_mae" not in saved  # no reference given
    np.testing.assert_allclose(saved["stable_time_ps"], expected_stable, rtol=0, atol=1e-9)
    assert saved["failed"] == [True] * 4
    # Kaplan-Meier with every replica failed: the 2nd of 4 failures takes survival to 0.5
    assert saved["median_stable_time_ps"] == pytest.approx(np.sort(expected_stable)[1])
    assert saved["stable_fraction"] == 0.0
    assert saved["failures"] == 4 and saved["replica_ps"] == pytest.approx(expected_stable.sum())
    assert saved["failure_rate_per_ps"] == pytest.approx(4 / expected_stable.sum())
    assert saved["time_ps"] == pytest.approx(0.1)


def test_a_failure_at_the_last_check_is_a_failure(xtb_ethanol, tmp_path):
    """The run ends at the check where the last replica fails: that replica's stable time
    equals the horizon, yet it is an event in the result, in metrics.json and in the
    median (the old code gave it the survivors' time and called it censored)."""
    config = ballistic_config()
    criterion = BondDeviationCriterion.from_dataset(xtb_ethanol, config.bond_threshold)
    _, _, expected_stable = predicted_deviations(xtb_ethanol, config, criterion)
    last = float(expected_stable.max())
    config = dataclasses.replace(ballistic_config(), time_ps=last)
    result = run_replicas(ZeroModel(), xtb_ethanol, config, progress=False)
    assert result.times_ps[-1] == pytest.approx(last)
    latest = int(np.argmax(expected_stable))
    assert result.stable_time_ps[latest] == pytest.approx(last) and result.failed.all()
    saved = simulate(ZeroModel(), xtb_ethanol, config, tmp_path, progress=False)
    assert saved["failed"] == [True] * 4 and saved["stable_fraction"] == 0.0 and saved["failures"] == 4
    assert saved["median_stable_time_ps"] == pytest.approx(np.sort(expected_stable)[1])
    assert "median stable time: > " not in summary(saved)


def test_nan_replica_detected_at_first_check_others_run_on(xtb_ethanol):
    """A replica on which the model returns NaN (an atom 20 A away) fails at the first
    check; the run goes on and the others stay stable (an elastic network: they cannot
    break, see `ElasticNetwork`)."""
    positions = xtb_ethanol.positions[:4].copy()
    positions[2, 8] += [20.0, 0.0, 0.0]
    data = QMDataset(xtb_ethanol.atomic_numbers, positions, source="broken")
    config = SimulationConfig(n_replicas=4, time_ps=0.05, check_interval_ps=0.01, seed=0,
                              engine=EngineConfig(platform="CPU", friction_per_ps=10.0))
    broken_replica = int(np.flatnonzero(initial_frames(data, 4, config.seed) == 2)[0])
    criterion = BondDeviationCriterion.from_dataset(xtb_ethanol, config.bond_threshold)
    result = run_replicas(NaNBeyond(ElasticNetwork(xtb_ethanol.positions[0]), radius=8.0), data, config, criterion,
                          progress=False)
    assert np.isfinite(result.positions).all()
    expected = np.full(4, result.times_ps[-1])
    expected[broken_replica] = result.times_ps[0]
    np.testing.assert_allclose(result.stable_time_ps, expected)
    assert result.failed.tolist() == [k == broken_replica for k in range(4)]
    others = np.arange(4) != broken_replica
    assert result.stable_mask[:, others].all()
    assert (result.deviations[:, others] < 0.5).all()


def test_simulate_outputs(xtb_ethanol, tmp_path):
    """metrics.json, plots, h(r), VACF and DCD files of a run whose outcome is known: an
    elastic network of the molecule (`ElasticNetwork`) cannot break in 0.1 ps, so every
    replica is stable to the end; each summary number is checked against the curves the
    run wrote."""
    config = SimulationConfig(n_replicas=3, time_ps=0.1, check_interval_ps=0.025, write_trajectories=True,
                              engine=EngineConfig(platform="CPU", friction_per_ps=10.0))
    metrics = simulate(ElasticNetwork(xtb_ethanol.positions[0]), xtb_ethanol, config, tmp_path, reference=xtb_ethanol,
                       progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert METRIC_KEYS | {"hr_mae"} <= set(saved)
    assert saved == json.loads(json.dumps(metrics))
    assert saved["n_replicas"] == 3 and saved["temperature_K"] == 500.0
    assert saved["time_ps"] == pytest.approx(0.1)
    assert saved["stable_time_ps"] == pytest.approx([0.1] * 3)
    assert saved["failed"] == [False] * 3 and saved["failures"] == 0
    # nobody failed: the median is beyond the horizon, not measured
    assert saved["median_stable_time_ps"] is None and saved["stable_fraction"] == 1.0
    assert "median stable time: > 0.10 ps" in summary(saved)
    assert saved["replica_steps_per_s"] > 0
    for name in ("survival.png", "bond_deviation.png", "hr.png"):
        assert (tmp_path / name).stat().st_size > 1000
    with np.load(tmp_path / "hr.npz") as hr:
        assert {"r", "model", "reference"} <= set(hr.files)
        assert np.trapezoid(hr["model"], hr["r"]) == pytest.approx(1.0, abs=0.02)
        assert saved["hr_mae"] == pytest.approx(np.abs(hr["model"] - hr["reference"]).mean(), rel=1e-9)
    # the network holds every distance within ~0.1 A of a dataset frame's, so its h(r) is that
    # frame's, smoothed: 0.022 1/A against the xTB data (measured); another molecule: 0.1-0.2
    assert saved["hr_mae"] < 0.05
    # VACF: velocities every 2.5 fs; the xTB reference has them every 5 fs, fine enough for
    # its own first minimum and for a comparison at its lags. No diffusivity for a molecule.
    assert saved["vacf_interval_ps"] == pytest.approx(0.0025)
    with np.load(tmp_path / "vacf.npz") as v:
        assert v["model"][0] == 1.0 and v["reference"][0] == pytest.approx(1.0)
        assert v["lag_ps"][-1] == pytest.approx(0.05)  # half of the 0.1 ps run
        assert saved["vacf_first_minimum_ps"] == pytest.approx(first_minimum(v["model"]) * 0.0025)
        assert saved["reference_vacf_first_minimum_ps"] == pytest.approx(first_minimum(v["reference"]) * 0.005)
        n = min(len(v["model"][::2]), len(v["reference"]))
        assert saved["vacf_mae"] == pytest.approx(np.abs(v["model"][::2][1:n] - v["reference"][1:n]).mean(), rel=1e-9)
    # C-H stretches (period ~11 fs in xTB, ~17 fs in the network) put both first minima early
    assert 0 < saved["vacf_first_minimum_ps"] < 0.05 and 0 < saved["reference_vacf_first_minimum_ps"] < 0.05
    assert "vacf_diffusivity_cm2_per_s" not in saved
    rows = (tmp_path / "vacf.csv").read_text().splitlines()
    assert rows[0] == "lag_ps,model,reference" and len(rows) == 1 + 21
    assert rows[3].split(",")[2] != "" and rows[2].split(",")[2] == ""  # reference at 5 fs lags only
    assert (tmp_path / "vacf.png").stat().st_size > 1000
    print(f"h(r) MAE {saved['hr_mae']:.4f}, VACF MAE {saved['vacf_mae']:.3f}")

    import mdtraj

    folder = tmp_path / "trajectories"
    for k in range(3):
        traj = mdtraj.load(str(folder / f"replica_{k:03d}.dcd"), top=str(folder / "topology.pdb"))
        assert traj.n_frames == 4 and traj.n_atoms == 9
        cc = np.linalg.norm(traj.xyz[:, 0] - traj.xyz[:, 1], axis=-1) * 10.0
        assert ((cc > 1.3) & (cc < 1.8)).all()  # a C-C bond, in Angstrom after nm -> A


# --- VACF ---------------------------------------------------------------------------------------
def test_free_flight_vacf_is_flat(ethanol):
    """No forces, no friction: every velocity stays v0, so the saved velocities are the
    drawn ones and the VACF is C(0) at every lag (no minimum)."""
    z, pos = ethanol
    dataset = QMDataset(z, pos[None].repeat(4, 0), temperature=500.0, source="ethanol")
    config = ballistic_config(vacf_interval_ps=0.001, stability="bonds", bond_threshold=10.0)
    result = run_replicas(ZeroModel(), dataset, config, progress=False)
    assert result.velocity_interval_ps == pytest.approx(0.001) and result.velocities_per_check == 5
    assert result.velocities.shape == (config.n_checks * 5, 4, len(z), 3) and result.stable_mask.all()
    v0 = maxwell_boltzmann(masses_amu(z), 500.0, 4, config.seed)
    np.testing.assert_allclose(result.velocities, np.broadcast_to(v0, result.velocities.shape), rtol=1e-5, atol=1e-4)
    out = vacf_comparison(result, dataset, None, config)
    np.testing.assert_allclose(out["model"], 1.0, rtol=1e-6)
    assert out["first_minimum_ps"] is None and len(out["model"]) == 51  # lags up to half of 100 frames


def test_vacf_over_segments_pools_time_origins(rng):
    """Segments of different lengths: each lag averages v(t).v(t+lag) over every origin of
    every segment at least twice that long (brute force)."""
    segments = [rng.normal(size=(40, 3, 3)), rng.normal(size=(25, 3, 3)), rng.normal(size=(3, 3, 3))]
    pooled = vacf_over_segments(segments, max_lag=15)
    assert len(pooled) == 16  # the longest segment gives lags up to 20, capped at 15
    for lag in range(16):
        products = [np.einsum("tni,tni->tn", v[:len(v) - lag], v[lag:]).reshape(-1)
                    for v in segments if lag <= len(v) // 2]
        assert pooled[lag] == pytest.approx(np.concatenate(products).mean(), rel=1e-10)
    np.testing.assert_allclose(vacf_over_segments(segments[:1], 20),
                               vacf(segments[0], 20, normalize=False).numpy(), rtol=1e-10)


def test_green_kubo_diffusivity_of_an_ornstein_uhlenbeck_process(rng):
    """Langevin velocities v' = -gamma v + noise: VACF sigma^2 exp(-gamma t), so the
    Green-Kubo integral gives D = sigma^2 / gamma; the MSD of the integrated path agrees."""
    from openmm_stable.dynamics import diffusivity, mean_squared_displacement

    gamma, sigma, dt, steps, particles = 5.0, 2.0, 0.01, 3000, 300
    a = np.exp(-gamma * dt)
    v = np.empty((steps, particles, 3))
    v[0] = rng.normal(0.0, sigma, size=(particles, 3))
    noise = rng.normal(0.0, sigma * np.sqrt(1 - a * a), size=(steps, particles, 3))
    for t in range(1, steps):
        v[t] = a * v[t - 1] + noise[t]
    c = vacf_over_segments([v], max_lag=200)  # 2 ps = 10 / gamma
    assert green_kubo_diffusivity(c, dt) == pytest.approx(sigma**2 / gamma, rel=0.05)
    x = np.cumsum(v, 0) * dt
    d_msd = diffusivity(mean_squared_displacement(x, 400), dt)
    assert d_msd == pytest.approx(green_kubo_diffusivity(c, dt), rel=0.1)
    assert first_minimum(np.exp(-np.arange(50) * 0.1) * np.cos(np.arange(50) * 0.3)) is not None
    assert first_minimum(np.exp(-np.arange(50) * 0.1)) is None


# --- command line ------------------------------------------------------------------------------
def cli_args(model, data, out, *extra):
    return ["simulate", str(model), "--data", str(data), "--out", str(out), "--replicas", "2", "--time", "0.05",
            "--check-interval", "0.025", "--platform", "CPU", "--friction", "10", "--no-progress", *map(str, extra)]


def test_cli_simulate(pretrained_ethanol_model_file, xtb_ethanol, tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(cli_args(pretrained_ethanol_model_file, xtb_ethanol.source, out, "--trajectories",
                         "--temperature", "450")) == 0
    printed = capsys.readouterr().out
    assert "median stable time" in printed and "h(r) MAE" in printed and "VACF first minimum" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["temperature_K"] == 450.0  # an explicit --temperature wins over the data's 500 K
    assert metrics["n_replicas"] == 2 and metrics["time_ps"] == pytest.approx(0.05)
    assert len(metrics["stable_time_ps"]) == 2 and "hr_mae" in metrics  # --data is the reference
    assert len(list((out / "trajectories").glob("replica_*.dcd"))) == 2
    assert main(cli_args(pretrained_ethanol_model_file, xtb_ethanol.source, tmp_path / "novacf",
                         "--vacf-interval", "0")) == 0
    assert "vacf_interval_ps" not in json.loads((tmp_path / "novacf" / "metrics.json").read_text())
    assert not (tmp_path / "novacf" / "vacf.npz").exists()


def test_cli_simulate_bad_inputs(pretrained_ethanol_model, pretrained_ethanol_model_file, xtb_ethanol, tmp_path,
                                 capsys):
    water = QMDataset([8, 1, 1], np.tile([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], (3, 1, 1)),
                      temperature=500.0, source="water")
    water_path = save_dataset(water, tmp_path / "water.npz")
    missing = tmp_path / "no_model.pt"
    cases = [
        (cli_args(missing, xtb_ethanol.source, tmp_path / "a"), "does not exist"),
        (cli_args(pretrained_ethanol_model_file, tmp_path / "no_data.npz", tmp_path / "b"), "no_data.npz"),
        (cli_args(pretrained_ethanol_model_file, xtb_ethanol.source, tmp_path / "c", "--reference", water_path),
         "another molecule"),
    ]
    # a model file that records its molecule (as refine writes it) run on another molecule
    water_model = tmp_path / "water_model.pt"
    save_model(pretrained_ethanol_model, water_model, atomic_numbers=[8, 1, 1])
    cases.append((cli_args(water_model, xtb_ethanol.source, tmp_path / "d"), "trained on 3 atoms"))
    # 0.01 ps of 0.1 ps checks used to run 0.1 ps and report "median 0.10 ps, stable fraction 0.00"
    cases.append((cli_args(pretrained_ethanol_model_file, xtb_ethanol.source, tmp_path / "e", "--time", "0.01",
                           "--check-interval", "0.1"), "shorter than one stability check"))
    cases.append((cli_args(pretrained_ethanol_model_file, xtb_ethanol.source, tmp_path / "f", "--time", "0.06"),
                  "not a whole number of checks"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "openmm-stable simulate: error:" in err and message in err, err
        assert "Traceback" not in err
    for folder in "abcdef":
        assert not (tmp_path / folder / "metrics.json").exists()
    with pytest.raises(InputError, match="whole number of 0.5 fs steps"):
        SimulationConfig(time_ps=1.0, check_interval_ps=0.0123)
    assert SimulationConfig(time_ps=0.3, check_interval_ps=0.1).n_checks == 3  # 0.3 / 0.1 = 2.9999999999999996


def test_cli_compare_molecules(pretrained_ethanol_model_file, xtb_ethanol, tmp_path, capsys):
    """Molecular runs: h(r), force and VACF columns; no RDF or diffusivity columns."""
    for label in ("pre", "post"):
        assert main(cli_args(pretrained_ethanol_model_file, xtb_ethanol.source, tmp_path / label,
                             "--test-data", xtb_ethanol.source)) == 0
    capsys.readouterr()
    assert main(["compare", f"pre={tmp_path / 'pre'}", str(tmp_path / "post"), "--out", str(tmp_path / "cmp")]) == 0
    header, *rows = capsys.readouterr().out.splitlines()[:3]
    assert all(t in header for t in ("median stable (ps)", "h(r) MAE", "force MAE (meV/A)", "VACF min (ps)"))
    assert "RDF" not in header and "D (cm^2/s)" not in header
    assert rows[0].split()[0] == "pre" and rows[1].split()[0] == "post"  # a bare folder is labelled by its name
    assert (tmp_path / "cmp" / "hr.png").exists() and (tmp_path / "cmp" / "vacf.png").exists()
    assert not (tmp_path / "cmp" / "rdf.png").exists()
    assert main(["compare", f"x={tmp_path}", "--out", str(tmp_path / "cmp2")]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def _write_metrics(folder, **values):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(values))
    return folder


def test_cli_compare_censors_runs_of_different_lengths_at_the_common_horizon(tmp_path, capsys):
    """A 1 ps run (one failure AT its last check) against a 2 ps run: the log-rank test runs
    over the common 1 ps, where the long run's failure at 1.5 ps is a survivor and the short
    run's failure at 1.0 ps an event. The old code, inferring events from t < horizon, made
    that failure censored and printed another p."""
    from openmm_stable.statistics import logrank_p

    short = _write_metrics(tmp_path / "short", time_ps=1.0, stable_time_ps=[0.2, 0.5, 1.0, 1.0, 1.0],
                           failed=[True, True, True, True, False], stable_fraction=0.2, median_stable_time_ps=1.0)
    long = _write_metrics(tmp_path / "long", time_ps=2.0, stable_time_ps=[0.3, 1.5, 2.0, 2.0, 2.0],
                          failed=[True, True, False, False, False], stable_fraction=0.6, median_stable_time_ps=None)
    assert main(["compare", f"short={short}", f"long={long}", "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    right = logrank_p([0.3, 1.0, 1.0, 1.0, 1.0], [True, False, False, False, False],
                      [0.2, 0.5, 1.0, 1.0, 1.0], [True, True, True, True, False], 1.0)
    wrong = logrank_p([0.3, 1.0, 1.0, 1.0, 1.0], [True, False, False, False, False],
                      [0.2, 0.5, 1.0, 1.0, 1.0], [True, True, False, False, False], 1.0)
    assert f"{right:.2g}" != f"{wrong:.2g}"
    assert f"log-rank test, long vs short over the common 1 ps: p = {right:.2g}" in printed
    assert "short: 1 ps" in printed  # Kaplan-Meier median of the short run: its failures at 1.0 count
    assert "4 failures in 3.7 replica-ps" in printed and "failure-rate ratio, long / short" in printed
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["long"]["failed"] == [True, True, False, False, False]
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["comparison.json", "comparison.txt",
                                                                   "survival.png"]  # no .tmp left


def test_cli_compare_old_and_broken_metrics_files(tmp_path, capsys):
    """A metrics.json without failed flags (an older simulate) is read with t < horizon and
    a warning; a truncated one (a kill during a plain write) is an error naming the file."""
    old = _write_metrics(tmp_path / "old", time_ps=1.0, stable_time_ps=[0.2, 1.0], median_stable_time_ps=0.6,
                         stable_fraction=0.5)
    new = _write_metrics(tmp_path / "new", time_ps=1.0, stable_time_ps=[0.4, 1.0], failed=[True, True])
    assert main(["compare", f"old={old}", f"new={new}", "--out", str(tmp_path / "cmp")]) == 0
    captured = capsys.readouterr()
    assert "has no 'failed' flags" in captured.err and "count as survivors" in captured.err
    assert str(old / "metrics.json") in captured.err and str(new / "metrics.json") not in captured.err
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text())["old"]["failed"] == [True, False]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text('{"n_replicas": 2, "time_ps": 1.0, "stable_ti')
    for bad, message in ((broken, "not valid JSON"), (_write_metrics(tmp_path / "list", values=[1]), "no stable_time_ps")):
        assert main(["compare", f"a={old}", f"b={bad}", "--out", str(tmp_path / "cmp_bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and str(bad / "metrics.json") in err and "Traceback" not in err
    assert not (tmp_path / "cmp_bad").exists()  # nothing written before every file was read


def test_the_seed_reaches_the_thermostat(xtb_ethanol, monkeypatch):
    """SimulationConfig(seed=k) seeds the Langevin integrator of the engine it runs (before,
    from Python it changed only the start frames; the thermostat always drew seed 1)."""
    import openmm_stable.simulate as simulate_module

    seen = []
    real = simulate_module.create_engine

    def recording(*args, **kwargs):
        engine = real(*args, **kwargs)
        seen.append([ctx.getIntegrator().getRandomNumberSeed() for ctx in engine._contexts])
        return engine

    monkeypatch.setattr(simulate_module, "create_engine", recording)
    engine = EngineConfig(temperature_K=500.0, platform="CPU")
    for seed in (3, 4):
        run_replicas(ZeroModel(), xtb_ethanol, SimulationConfig(n_replicas=2, time_ps=0.01, check_interval_ps=0.005,
                                                                seed=seed, vacf_interval_ps=None, engine=engine),
                     progress=False)
    assert seen[0] != seen[1]

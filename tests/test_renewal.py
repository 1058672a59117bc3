"""`simulate --renewal`: a failed replica restarts from a fresh dataset frame with new
velocities and its clock runs on, so every failure is counted in R x horizon replica-ps;
a resumed renewal run is the uninterrupted one; h(r) errors over the occupied bins and
the reference's own noise band; `compare` on renewal runs.

As in test_simulate.py, a model without forces and a Langevin integrator without friction
make atoms fly on straight lines from velocities the test draws itself, so the time at
which each segment fails follows from its start frame and velocities alone.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from openmm_stable.cli import main
from openmm_stable.engine import EngineConfig, masses_amu, maxwell_boltzmann
from openmm_stable.errors import InputError
from openmm_stable.observables import HrObservable, reference_from_dataset
from openmm_stable.simulate import (SimulationConfig, hr_comparison, initial_frames, occupied_mae, restart_velocities,
                                    run_replicas, simulate, stable_runs, summary)
from openmm_stable.stability import BondDeviationCriterion

from test_engine import ElasticNetwork, ZeroModel
from test_simulate_resume import Killed, frames, kill_after, langevin_config


def ballistic_renewal_config(**kw) -> SimulationConfig:
    """4 replicas, 0.1 ps, a check every 0.005 ps (10 steps), no friction, renewal."""
    engine = EngineConfig(temperature_K=500.0, platform="CPU", friction_per_ps=0.0)
    return SimulationConfig(n_replicas=4, time_ps=0.1, check_interval_ps=0.005, seed=0, engine=engine, renewal=True,
                            **kw)


def segment_rows(segments: dict) -> list[tuple]:
    return list(zip(*(segments[k] for k in ("replica", "start_ps", "end_ps", "failed", "start_frame"))))


def check_free_flight(dataset, config, segments, result=None):
    """Each recorded segment, flown from its start frame with the velocities of its start
    (the run's Maxwell-Boltzmann draw for the first segments, `restart_velocities` of the
    restart's number for the others, numbered by check then replica), fails exactly where
    the run says, or survives to the horizon. A deviation within 1e-3 A of the threshold
    would make that depend on rounding: the input is checked to have none."""
    criterion = BondDeviationCriterion.from_dataset(dataset, config.bond_threshold)
    masses = masses_amu(dataset.atomic_numbers)
    T, R = config.engine.temperature_K, config.n_replicas
    times = (np.arange(config.n_checks) + 1) * config.steps_per_check * config.engine.timestep_ps
    rows = segment_rows(segments)
    first = maxwell_boltzmann(masses, T, R, config.seed)
    restarted = sorted((row for row in rows if row[1] > 0), key=lambda row: (row[1], row[0]))
    velocity = {(row[0], row[1]): first[row[0]] for row in rows if row[1] == 0}
    for q, row in enumerate(restarted):
        velocity[(row[0], row[1])] = restart_velocities(masses, T, config.seed, [q])[0]
    for k, t0, t1, failed, frame in rows:
        later = times[times > t0 + 1e-9]
        flown = dataset.positions[frame][None] + velocity[(k, t0)][None] * (later - t0)[:, None, None]
        dev = criterion(flown).numpy()
        bad = dev > criterion.threshold
        end = int(bad.argmax()) if bad.any() else len(later) - 1
        assert (np.abs(dev[:end + 1] - criterion.threshold) > 1e-3).all(), "a deviation too close to the threshold"
        assert bool(bad.any()) == failed and later[end] == pytest.approx(t1, abs=1e-9), (k, t0)
        if result is not None:  # the recorded frames are that flight
            c = np.flatnonzero(np.isclose(result.times_ps, later[0]))[0]
            np.testing.assert_allclose(result.positions[c:c + end + 1, k], flown[:end + 1], rtol=0, atol=2e-4)


def test_renewal_restarts_from_unused_frames_and_counts_every_failure(xtb_ethanol, tmp_path):
    config = ballistic_renewal_config()
    result = run_replicas(ZeroModel(), xtb_ethanol, config, progress=False)
    rows = segment_rows(result.segments)
    starts = initial_frames(xtb_ethanol, 4, config.seed)
    restart_frames = [row[4] for row in rows if row[1] > 0]
    assert len(restart_frames) >= 8  # free flight breaks bonds within 0.01-0.05 ps: several restarts each
    assert len(set(restart_frames)) == len(restart_frames) and not set(restart_frames) & set(starts.tolist())
    assert [row[4] for row in rows if row[1] == 0] == starts.tolist()
    check_free_flight(xtb_ethanol, config, result.segments, result)
    # the segments of each replica tile the run: each starts where the last failed
    for k in range(4):
        mine = [row for row in rows if row[0] == k]
        assert mine[0][1] == 0.0 and mine[-1][2] == pytest.approx(0.1)
        assert all(a[2] == b[1] and a[3] for a, b in zip(mine, mine[1:]))
    # stable flags: False exactly at the failing checks, True again after a restart
    fail_checks = {(row[0], int(round(row[2] / 0.005)) - 1) for row in rows if row[3]}
    assert {(k, c) for c, k in zip(*np.nonzero(~result.stable_mask))} == fail_checks
    assert sum(b - a for _, a, b in stable_runs(result.stable_mask)) == result.stable_mask.sum()
    # first segments are what Kaplan-Meier sees
    first = [row for row in rows if row[1] == 0]
    np.testing.assert_allclose(result.stable_time_ps, [row[2] for row in first], atol=1e-12)
    assert result.failed.tolist() == [row[3] for row in first]

    metrics = simulate(ZeroModel(), xtb_ethanol, config, tmp_path, reference=xtb_ethanol, progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics)) and saved["segments"] == json.loads(json.dumps(result.segments))
    events = sum(row[3] for row in rows)
    assert saved["renewal"] is True and saved["failures"] == events > 4
    assert saved["replica_ps"] == pytest.approx(4 * 0.1) and saved["failure_rate_per_ps"] == pytest.approx(events / 0.4)
    assert saved["restarts"] == len(restart_frames) and saved["restarts_from_reused_frames"] == 0
    assert saved["stable_time_ps"] == pytest.approx([row[2] for row in first])
    # h(r) over the stable frames of every segment
    with np.load(tmp_path / "hr.npz") as hr:
        stable = result.positions[result.stable_mask]
        expected = HrObservable()(np.asarray(stable, dtype=np.float64)).mean(0).numpy()
        np.testing.assert_allclose(hr["model"], expected, rtol=1e-9, atol=1e-12)
    assert "renewal" in summary(saved) and f"failures: {events} in 0.4 replica-ps" in summary(saved)


def test_renewal_reuses_frames_with_a_note_when_the_fresh_ones_run_out(xtb_ethanol, capsys):
    """6 frames for 4 starts leave 2 fresh ones: restarts then cycle through them."""
    data = xtb_ethanol.subset(np.arange(6))
    config = ballistic_renewal_config()
    result = run_replicas(ZeroModel(), data, config, progress=False)
    assert "no fresh frames left (2 dataset frames were not starts)" in capsys.readouterr().err
    rows = segment_rows(result.segments)
    restart_frames = [row[4] for row in sorted((r for r in rows if r[1] > 0), key=lambda r: (r[1], r[0]))]
    fresh = sorted(set(range(6)) - set(initial_frames(data, 4, config.seed).tolist()))
    assert len(restart_frames) > 2 and sorted(restart_frames[:2]) == fresh
    assert restart_frames == [restart_frames[q % 2] for q in range(len(restart_frames))]
    check_free_flight(data, config, result.segments)


def test_a_killed_renewal_run_resumes_to_the_uninterrupted_result(xtb_ethanol, tmp_path):
    """Langevin random walks break bonds at random checks on both sides of the kill; the
    restart log and the frame pointer in progress.json and the engine checkpoint make the
    continuation the same run, bit for bit."""
    config = langevin_config(renewal=True)
    full = simulate(ZeroModel(), xtb_ethanol, config, tmp_path / "full", progress=False)
    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        simulate(ZeroModel(), xtb_ethanol, config, cut, progress=False, on_chunk=kill_after(9))
    partial = json.loads((cut / "progress.json").read_text())
    assert partial["checks_done"] == 9
    before = len(partial["renewal"]["restarts"])
    assert before >= 1 and partial["renewal"]["frames_used"] == before
    assert partial["metrics"]["replica_ps"] == pytest.approx(4 * 0.045)
    resumed = simulate(ZeroModel(), xtb_ethanol, config, cut, progress=False, resume=True)
    assert full["restarts"] > before  # restarts after the kill too
    for key in ("segments", "failures", "replica_ps", "stable_time_ps", "failed", "restarts", "vacf_first_minimum_ps"):
        assert resumed[key] == full[key], key
    a, b = frames(tmp_path / "full"), frames(cut)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # a renewal run is another run than a frozen one: resuming it as one is refused
    with pytest.raises(InputError, match="config.renewal"):
        simulate(ZeroModel(), xtb_ethanol, dataclasses.replace(config, renewal=False), cut, progress=False,
                 resume=True)


# --- h(r): occupied bins and the reference noise ----------------------------------------------
def test_occupied_mae_by_hand():
    reference = np.array([0.0, 0.5, 0.5, 0.0, 0.0])
    curve = np.array([0.1, 0.4, 0.7, 0.0, 0.3])
    assert occupied_mae(curve, reference, reference) == pytest.approx((0.1 + 0.2) / 2)
    assert np.abs(curve - reference).mean() == pytest.approx(0.7 / 5)  # hr_mae: diluted by the empty bins
    assert math.isnan(occupied_mae(curve, reference, np.zeros(5)))


@pytest.fixture(scope="module")
def elastic_run(xtb_ethanol):
    """A short run of an elastic network of the molecule (stable, frames near the data)."""
    config = SimulationConfig(n_replicas=2, time_ps=0.05, check_interval_ps=0.025, vacf_interval_ps=None,
                              engine=EngineConfig(platform="CPU", friction_per_ps=10.0, temperature_K=500.0))
    return config, run_replicas(ElasticNetwork(xtb_ethanol.positions[0]), xtb_ethanol, config, progress=False)


def test_hr_mae_over_the_occupied_bins_and_the_noise_band(xtb_ethanol, elastic_run):
    config, result = elastic_run
    obs = HrObservable(r_max=config.hr_r_max, n_bins=config.hr_bins)
    hr = hr_comparison(result, xtb_ethanol, xtb_ethanol, config)
    occupied = hr["reference"] > 0
    # ethanol's distances reach ~4 A: well under half of the 200 bins to 10 A have any mass
    assert hr["hr_occupied_bins"] == occupied.sum() and 40 < occupied.sum() < 100
    assert hr["hr_mae_occupied"] == pytest.approx(np.abs(hr["model"] - hr["reference"])[occupied].mean(), rel=1e-12)
    assert hr["hr_mae_occupied"] == pytest.approx(hr["hr_mae"] * 200 / occupied.sum(), rel=1e-9)
    # no second chain: first half against second half, scaled to the full length
    halves = [reference_from_dataset(obs, xtb_ethanol.subset(np.arange(a, a + 30)))[0].numpy() for a in (0, 30)]
    assert hr["hr_noise_mae_split_half"] == pytest.approx(
        np.abs(halves[0] - halves[1])[occupied].mean() / math.sqrt(2), rel=1e-9)
    assert "hr_noise_mae" not in hr
    # a second chain: the MAE between the two references on the reference's occupied bins
    first, second = xtb_ethanol.subset(np.arange(30)), xtb_ethanol.subset(np.arange(30, 60))
    hr_b = hr_comparison(result, xtb_ethanol, first, config, reference_b=second)
    assert "hr_noise_mae_split_half" not in hr_b
    occupied_a = halves[0] > 0
    assert hr_b["hr_noise_mae"] == pytest.approx(np.abs(halves[1] - halves[0])[occupied_a].mean(), rel=1e-9)
    assert hr_comparison(result, xtb_ethanol, first, config, reference_b=first)["hr_noise_mae"] == 0.0
    # both references are reweighted to the run temperature as the reference is
    cooler = dataclasses.replace(config, engine=dataclasses.replace(config.engine, temperature_K=450.0))
    hr_cool = hr_comparison(result, xtb_ethanol, first, cooler, reference_b=second)
    cool = [reference_from_dataset(obs, part, 450.0)[0].numpy() for part in (first, second)]
    assert hr_cool["hr_noise_mae"] == pytest.approx(np.abs(cool[1] - cool[0])[cool[0] > 0].mean(), rel=1e-9)
    assert hr_cool["hr_noise_mae"] != pytest.approx(hr_b["hr_noise_mae"], rel=1e-6)
    # the terminal line states both MAEs and the verdict against the noise
    line = summary({"n_replicas": 2, "time_ps": 0.05, "temperature_K": 500.0, "median_stable_time_ps": None,
                    "stable_fraction": 1.0, "failures": 0, "replica_ps": 0.1, "replica_steps_per_s": 1.0,
                    "reference_ess": 30.0, **{k: hr_b[k] for k in ("hr_mae", "hr_mae_occupied", "hr_occupied_bins",
                                                                  "hr_noise_mae")}})
    assert "over all bins (as published)" in line and f"over the {hr_b['hr_occupied_bins']} occupied" in line
    verdict = "within" if hr_b["hr_mae_occupied"] <= hr_b["hr_noise_mae"] else "beyond"
    assert f"(second chain): {verdict} the reference noise" in line


# --- command line ------------------------------------------------------------------------------
def test_cli_renewal_reference_b_and_compare(pretrained_ethanol_model_file, xtb_ethanol, tmp_path, capsys):
    from openmm_stable.data import save_dataset

    chain_b = save_dataset(xtb_ethanol.subset(np.arange(30, 60)), tmp_path / "chain_b.npz")
    base = ["simulate", str(pretrained_ethanol_model_file), "--data", str(xtb_ethanol.source), "--replicas", "2",
            "--time", "0.02", "--check-interval", "0.01", "--platform", "CPU", "--vacf-interval", "0", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a"), "--renewal", "--reference-b", str(chain_b)]) == 0
    printed = capsys.readouterr().out
    assert "renewal" in printed and "reference noise" in printed and "(second chain)" in printed
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["renewal"] is True and saved["replica_ps"] == pytest.approx(0.04)
    assert {"hr_mae", "hr_mae_occupied", "hr_noise_mae"} <= set(saved)
    assert main(base + ["--out", str(tmp_path / "b")]) == 0
    saved_b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert "renewal" not in saved_b and "hr_noise_mae_split_half" in saved_b
    capsys.readouterr()
    assert main(["compare", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}", "--out", str(tmp_path / "cmp")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert all(t in header for t in ("h(r) MAE occ.", "h(r) ref noise", "h(r) noise split"))


def _write_metrics(folder, **values):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(values))
    return folder


def test_compare_uses_every_segment_of_renewal_runs_and_says_what_it_resolves(tmp_path, capsys):
    """Renewal runs: the events and exposure of every segment (not of the first ones),
    the exact rate test on them, and the smallest ratio those exposures resolve."""
    from openmm_stable.statistics import detectable_rate_ratio, rate_ratio_test

    first = dict(time_ps=8.0, stable_time_ps=[3.0, 8.0], failed=[True, False], renewal=True, failures=60,
                 replica_ps=1000.0)
    before = _write_metrics(tmp_path / "before", **first)
    after = _write_metrics(tmp_path / "after", **{**first, "failures": 25, "replica_ps": 1100.0})
    assert main(["compare", f"before={before}", f"after={after}", "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "60 failures in 1e+03 replica-ps, renewal: every segment" in printed
    assert "25 failures in 1.1e+03 replica-ps, renewal: every segment" in printed
    r = rate_ratio_test(25, 1100.0, 60, 1000.0)
    shown = f"{r['estimate']:.3g} [{r['lower95']:.3g}, {r['upper95']:.3g}]"
    assert f"failure-rate ratio, after / before: {shown}" in printed
    d = detectable_rate_ratio(1100.0, 1000.0, 60 / 1000.0)
    assert 0.5 < d < 0.65
    assert f"resolve with 80 % power at alpha 0.05 (two-sided), at before's rate: {d:.2g} ({1 / d:.2g}x" in printed
    few = _write_metrics(tmp_path / "few", **{**first, "failures": 1, "replica_ps": 10.0})
    assert main(["compare", f"few={few}", f"after={after}", "--out", str(tmp_path / "cmp2")]) == 0
    assert "none (1 failures in few are too few)" in capsys.readouterr().out

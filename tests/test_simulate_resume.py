"""`simulate` streams frames and progress to its folder, and a killed run resumed from its
last saved chunk ends exactly where the uninterrupted run does (Langevin noise included,
through the engine's OpenMM checkpoint). A folder that holds a run is refused unless
resumed or overwritten; nothing is left half-written.

The kill is an exception raised from the `on_chunk` hook after a chunk was saved, which
is where a real kill (at any later moment) leaves the folder too.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from openmm_stable.cli import main
from openmm_stable.engine import EngineConfig
from openmm_stable.errors import InputError
from openmm_stable.simulate import SimulationConfig, simulate

from test_engine import ZeroModel


class Killed(Exception):
    pass


def kill_after(checks: int):
    def on_chunk(done: int) -> None:
        if done >= checks:
            raise Killed(done)
    return on_chunk


def langevin_config(**kw) -> SimulationConfig:
    """Free atoms with Langevin friction: random walks that break bonds at random checks
    (replicas fail and are reset on both sides of the kill), 20 checks in chunks of 3."""
    engine = EngineConfig(temperature_K=500.0, platform="CPU", friction_per_ps=20.0)
    settings = dict(n_replicas=4, time_ps=0.1, check_interval_ps=0.005, seed=5, chunk_checks=3,
                    vacf_interval_ps=0.0025, engine=engine)
    return SimulationConfig(**{**settings, **kw})


def frames(folder) -> dict:
    return {name: np.load(folder / "frames" / f"{name}.npy") for name in ("positions", "deviations", "stable",
                                                                          "velocities")}


def test_a_killed_run_resumes_to_the_uninterrupted_result(xtb_ethanol, tmp_path):
    config = langevin_config()
    full = simulate(ZeroModel(), xtb_ethanol, config, tmp_path / "full", progress=False)
    with pytest.raises(Killed):
        simulate(ZeroModel(), xtb_ethanol, config, tmp_path / "cut", progress=False, on_chunk=kill_after(3))
    cut = tmp_path / "cut"
    assert not (cut / "metrics.json").exists()
    # the killed run's numbers so far: the full run's, censored at the 3rd check (0.015 ps;
    # the replicas here first fail around 0.015-0.035 ps, so mostly after the kill)
    partial = json.loads((cut / "progress.json").read_text())
    assert partial["checks_done"] == 3 and not partial["finished"]
    assert partial["metrics"]["time_ps"] == pytest.approx(0.015)
    horizon = 0.015 + 1e-9
    t_full, f_full = np.asarray(full["stable_time_ps"]), np.asarray(full["failed"])
    np.testing.assert_allclose(partial["metrics"]["stable_time_ps"], np.minimum(t_full, 0.015))
    assert partial["metrics"]["failed"] == (f_full & (t_full <= horizon)).tolist()
    assert [p.name for p in (cut / "frames").glob("state_*.pt")] == ["state_000003.pt"]

    # the same run again without --resume is refused; with it, it continues
    with pytest.raises(InputError, match="partial simulate run.*--resume.*--overwrite"):
        simulate(ZeroModel(), xtb_ethanol, config, cut, progress=False)
    resumed = simulate(ZeroModel(), xtb_ethanol, config, cut, progress=False, resume=True)
    for key in ("stable_time_ps", "failed", "median_stable_time_ps", "stable_fraction", "failures", "replica_ps",
                "vacf_first_minimum_ps"):
        assert resumed[key] == full[key], key
    a, b = frames(tmp_path / "full"), frames(cut)
    for name in a:  # bit for bit: the checkpoint restored the Langevin noise stream too
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    print(f"failures {full['failures']} of 4, stable times {full['stable_time_ps']}")
    progress = json.loads((cut / "progress.json").read_text())
    assert progress["finished"] and progress["checks_done"] == 20 and progress["state"] is None
    assert not list((cut / "frames").glob("state_*.pt"))
    assert not list(tmp_path.rglob("*.tmp"))  # no debris of the atomic writes


def test_run_folder_refusals_and_overwrite(xtb_ethanol, tmp_path):
    config = langevin_config(time_ps=0.01)
    out = tmp_path / "run"
    with pytest.raises(InputError, match="nothing to resume"):
        simulate(ZeroModel(), xtb_ethanol, config, out, progress=False, resume=True)
    first = simulate(ZeroModel(), xtb_ethanol, config, out, progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert {"metrics.json", "progress.json", "frames", "survival.png"} <= set(names)
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(InputError, match="finished simulate run.*--resume.*--overwrite"):
        simulate(ZeroModel(), xtb_ethanol, config, out, progress=False)
    with pytest.raises(InputError, match="another config.seed"):
        simulate(ZeroModel(), xtb_ethanol, dataclasses.replace(config, seed=6), out, progress=False, resume=True)
    with pytest.raises(InputError, match="another dataset"):
        simulate(ZeroModel(), xtb_ethanol.subset(np.arange(10)), config, out, progress=False, resume=True)
    with pytest.raises(InputError, match="exclude each other"):
        simulate(ZeroModel(), xtb_ethanol, config, out, progress=False, resume=True, overwrite=True)
    # resuming a finished run redoes only the outputs, from the saved frames
    again = simulate(ZeroModel(), xtb_ethanol, config, out, progress=False, resume=True)
    assert again["stable_time_ps"] == first["stable_time_ps"] and again["failed"] == first["failed"]
    # a setting that does not change the numbers may differ on resume
    simulate(ZeroModel(), xtb_ethanol, dataclasses.replace(config, chunk_checks=1), out, progress=False, resume=True)
    (out / "stray_note.txt").write_text("mine")
    other = simulate(ZeroModel(), xtb_ethanol, dataclasses.replace(config, seed=6), out, progress=False,
                     overwrite=True)
    assert json.loads((out / "progress.json").read_text())["identity"]["config"]["seed"] == 6
    assert (out / "stray_note.txt").exists()  # --overwrite removes only what simulate writes
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(other))
    # a run started before a setting existed (here renewal) resumes: it ran at the default
    progress = json.loads((out / "progress.json").read_text())
    del progress["identity"]["config"]["renewal"]
    (out / "progress.json").write_text(json.dumps(progress))
    assert simulate(ZeroModel(), xtb_ethanol, dataclasses.replace(config, seed=6), out, progress=False,
                    resume=True)["stable_time_ps"] == other["stable_time_ps"]
    with pytest.raises(InputError, match="another config.renewal"):
        simulate(ZeroModel(), xtb_ethanol, dataclasses.replace(config, seed=6, renewal=True), out, progress=False,
                 resume=True)
    (out / "progress.json").write_text('{"checks_done": 3, "ident')
    with pytest.raises(InputError, match="progress.json: not a simulate progress file"):
        simulate(ZeroModel(), xtb_ethanol, config, out, progress=False, resume=True)


def test_cli_resume_and_overwrite(pretrained_ethanol_model_file, xtb_ethanol, tmp_path, capsys):
    out = tmp_path / "sim"
    argv = ["simulate", str(pretrained_ethanol_model_file), "--data", str(xtb_ethanol.source), "--out", str(out),
            "--replicas", "2", "--time", "0.02", "--check-interval", "0.01", "--platform", "CPU", "--vacf-interval",
            "0", "--no-progress"]
    assert main(argv + ["--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert main(argv + ["--resume"]) == 0  # the finished run: outputs again from its frames
    assert json.loads((out / "metrics.json").read_text())["stable_time_ps"] == metrics["stable_time_ps"]
    assert main(argv + ["--overwrite", "--seed", "1"]) == 0
    assert main(argv + ["--resume"]) == 2  # the folder now holds the seed-1 run
    assert "another config.seed" in capsys.readouterr().err

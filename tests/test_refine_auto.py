"""``learning: auto``: a renewal probe of the start picks the windows loop for a fragile start
and the failure bank for a rare one; the choice is recorded, and a resumed run keeps it."""
from __future__ import annotations

import json

import pytest
import yaml

from openmm_stable.engine import EngineConfig
from openmm_stable.training import auto
from openmm_stable.training.stable import StableConfig, refine


def test_the_rule_separates_the_two_measured_starts():
    """benchmarks/README 5a's fragile start (median 1.8 ps: ~0.39 failures per replica-ps)
    gets the windows loop, 5e's rare start (0.057 per replica-ps) the failure bank."""
    assert auto.choose_learning_mode(0.39, 1.0, 0.15)[0] == "windows"
    assert auto.choose_learning_mode(0.057, 1.0, 0.15)[0] == "failure_bank"
    # The epoch length matters: the same rare start in 0.25-ps epochs is rarer still per epoch.
    assert auto.choose_learning_mode(0.39, 0.25, 0.15)[0] == "failure_bank"
    assert auto.choose_learning_mode(0.0, 1.0, 0.15)[0] == "failure_bank"


def test_a_rare_start_gets_the_measured_recipe_under_the_users_settings():
    config = StableConfig(learning="auto", n_replicas=12, engine=EngineConfig(temperature_K=700.0),
                          failure_bank={"step_norm": 0.02})
    rare = auto.settings_for(config, "failure_bank")
    assert rare.learning == "failure_bank" and rare.n_replicas == 12  # the user's replica count wins
    assert rare.epoch_ps == auto.RARE_START_SETTINGS["epoch_ps"] and rare.equilibration_ps == 0.0
    assert rare.failure_bank["direction"] == "hr" and rare.failure_bank["step_norm"] == 0.02
    assert rare.failure_bank["training_temperature_K"] == pytest.approx(900.0)
    fragile = auto.settings_for(config, "windows")
    assert fragile.learning == "windows" and fragile.epoch_ps == StableConfig().epoch_ps


def _config(**overrides) -> StableConfig:
    values = dict(learning="auto", n_replicas=4, epoch_ps=0.05, frame_interval_ps=0.01, equilibration_ps=0.01,
                  max_epochs=1, learning_epochs=2, bond_threshold=0.02, unstable_fraction=0.1, probe_ps=0.05,
                  observable={"name": "bond_lengths"}, log_signal=False,
                  engine=EngineConfig(temperature_K=500.0, timestep_fs=0.5, friction_per_ps=10.0, platform="CPU"))
    values.update(overrides)
    return StableConfig(**values)


def test_refine_auto_probes_records_the_choice_and_resumes_with_it(xtb_ethanol, pretrained_ethanol_model, tmp_path,
                                                                  monkeypatch):
    out = tmp_path / "run"
    _, summary = refine(pretrained_ethanol_model, xtb_ethanol, _config(), out, progress=False)
    choice = json.loads((out / auto.CHOICE_FILE).read_text())
    probe = choice["probe"]
    assert probe["replica_ps"] > 0 and 0 <= probe["failures"]
    # The mode is what the rule gives for the probe's own rate, and the run used it.
    assert choice["mode"] == auto.choose_learning_mode(probe["failure_rate_per_ps"], 0.05, 0.15)[0]
    assert yaml.safe_load((out / "config.yaml").read_text())["learning"] == choice["mode"]
    assert summary["learning_choice"]["mode"] == choice["mode"]
    assert json.loads((out / "metrics.json").read_text())["learning_choice"] == choice

    # A resumed run reads the choice; it does not probe again.
    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed run probed again")

    monkeypatch.setattr(auto, "probe_failure_rate", no_probe)
    _, again = refine(pretrained_ethanol_model, xtb_ethanol, _config(max_epochs=2), out, progress=False, resume=True)
    assert again["learning_choice"] == choice


def test_refine_auto_runs_the_failure_bank_on_a_rare_probe(xtb_ethanol, pretrained_ethanol_model, tmp_path,
                                                            monkeypatch):
    """A probe that saw no failure: the failure bank runs (its log is written)."""
    monkeypatch.setattr(auto, "probe_failure_rate",
                        lambda *a, **k: {"failures": 0, "replica_ps": 8.0, "failure_rate_per_ps": 0.0})
    out = tmp_path / "rare"
    config = _config(n_replicas=4, epoch_ps=0.05, max_epochs=1, failure_bank={"constraint_frames": 8,
                                                                               "background_frames": 8})
    _, summary = refine(pretrained_ethanol_model, xtb_ethanol, config, out, progress=False)
    assert summary["learning_choice"]["mode"] == "failure_bank"
    assert yaml.safe_load((out / "config.yaml").read_text())["learning"] == "failure_bank"
    assert (out / "bank_log.csv").exists() and "failure_bank" in summary


def test_bad_auto_settings_are_refused():
    from openmm_stable.errors import InputError

    with pytest.raises(InputError, match="probe_ps"):
        StableConfig(learning="auto", probe_ps=0)
    with pytest.raises(InputError, match="rare_start_failures_per_epoch"):
        StableConfig(learning="auto", rare_start_failures_per_epoch=1.5)

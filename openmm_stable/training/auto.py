"""``learning: auto``: measure how often the start fails, then pick the learning mode that
was measured to help a start like it (benchmarks/README section 5).

The windows loop learns only once ``unstable_fraction`` of the replicas have failed in a
cycle; it tripled the median of a fragile start (5a: ~0.4 failures per replica-ps at
700 K) and changed nothing measurable on a start that fails rarely (5e: 0.057 per
replica-ps; the paper-faithful loop 0.91x). The failure bank with the projected h(r)
direction (``RARE_START_SETTINGS``) cut the rare start's failure rate to 0.29x. A short
renewal probe of the start (``probe_ps`` per replica, the evaluation's criterion) tells
the two apart: a start whose expected failures per replica in one epoch are below
``rare_start_failures_per_epoch`` (default 0.15, the geometric middle of the two measured
starts at ``epoch_ps`` 1) is a rare start. The probe and the choice go to
``learning_choice.json`` in the run's folder, which a resumed run reads instead of probing
again.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

from torch import nn

from openmm_stable.data import QMDataset
from openmm_stable.io import atomic_write_text

CHOICE_FILE = "learning_choice.json"
# The failure-bank recipe of benchmarks/README 5e's `bank_hr` arm, as a rare start gets it.
# Its replicas ran at 900 K for a 700 K target: the training temperature is kept as that
# ratio of the run's temperature.
RARE_START_SETTINGS = {
    "learning": "failure_bank", "n_replicas": 32, "epoch_ps": 0.25, "frame_interval_ps": 0.025,
    "equilibration_ps": 0.0, "max_epochs": 400, "failure_bank": {"direction": "hr"},
}
RARE_START_TEMPERATURE_RATIO = 900.0 / 700.0


def _defaults(config_class) -> dict:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(config_class)}


def _user_given(config) -> set:
    """The fields of `config` that differ from their defaults: the user's, which the chosen
    mode's settings do not override."""
    defaults = _defaults(type(config))
    return {name for name, default in defaults.items() if getattr(config, name) != default}


def settings_for(config, mode: str):
    """`config` (``learning: auto``) with the chosen mode's settings under the user's own."""
    if mode == "windows":
        return dataclasses.replace(config, learning="windows")
    given = _user_given(config)
    values = {k: v for k, v in RARE_START_SETTINGS.items() if k not in given or k == "learning"}
    bank = {**RARE_START_SETTINGS["failure_bank"], **config.failure_bank}
    bank.setdefault("training_temperature_K", config.engine.temperature_K * RARE_START_TEMPERATURE_RATIO)
    values["failure_bank"] = bank
    if "equilibration_ps" not in given:
        values["equilibration_ps"] = 0.0
    return dataclasses.replace(config, **values)


def probe_failure_rate(model: nn.Module, dataset: QMDataset, config, out_dir: Path, progress: bool) -> dict:
    """Failures per replica-ps of `model` in a renewal run of ``config.probe_ps`` per
    replica from `dataset`'s frames, at the run's temperature and the evaluation's criterion."""
    from openmm_stable.simulate import SimulationConfig, simulate

    probe = SimulationConfig(n_replicas=config.n_replicas, time_ps=config.probe_ps,
                             check_interval_ps=config.frame_interval_ps, stability=config.stability, renewal=True,
                             seed=config.seed + 7919, vacf_interval_ps=None, engine=config.engine)
    metrics = simulate(model, dataset, probe, out_dir, progress=progress, overwrite=True)
    return {"failures": int(metrics["failures"]), "replica_ps": float(metrics["replica_ps"]),
            "failure_rate_per_ps": float(metrics["failure_rate_per_ps"])}


def choose_learning_mode(rate_per_ps: float, epoch_ps: float, threshold: float) -> tuple[str, str]:
    """(mode, why) for a start failing `rate_per_ps`: the failure bank when a replica's
    chance to fail in one epoch of the windows loop is below `threshold`."""
    per_epoch = 1.0 - math.exp(-rate_per_ps * epoch_ps)
    if per_epoch < threshold:
        return "failure_bank", (f"a rare start: {per_epoch:.3f} failures per replica per {epoch_ps:g}-ps epoch "
                                f"< {threshold:g}; the windows loop would seldom see one")
    return "windows", (f"a fragile start: {per_epoch:.3f} failures per replica per {epoch_ps:g}-ps epoch "
                       f">= {threshold:g}")


def resolve_auto(model: nn.Module, dataset: QMDataset, config, out_dir, resume: bool, progress: bool):
    """(config with a concrete learning mode, the choice record). A resumed run reads the
    choice it made (no second probe); a fresh one probes and records it."""
    out_dir = Path(out_dir)
    path = out_dir / CHOICE_FILE
    if resume and path.exists():
        choice = json.loads(path.read_text())
    else:
        probe = probe_failure_rate(model, dataset, config, out_dir / "probe", progress)
        mode, why = choose_learning_mode(probe["failure_rate_per_ps"], config.epoch_ps,
                                         config.rare_start_failures_per_epoch)
        choice = {"probe": probe, "mode": mode, "why": why, "probe_ps_per_replica": config.probe_ps,
                  "threshold_failures_per_epoch": config.rare_start_failures_per_epoch}
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(choice, indent=1))
    if progress:
        print(f"learning: auto -> {choice['mode']} ({choice['why']}; probe: {choice['probe']['failures']} failures "
              f"in {choice['probe']['replica_ps']:g} replica-ps)")
    return settings_for(config, choice["mode"]), choice


def learning_choice(out_dir) -> Optional[dict]:
    path = Path(out_dir) / CHOICE_FILE
    return json.loads(path.read_text()) if path.exists() else None

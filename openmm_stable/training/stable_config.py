"""`StableConfig`: every setting of a refinement run, validated once on construction.

Kept apart from the loop (`openmm_stable.training.stable`) so the loop module reads as the
algorithm; YAML files and `refine --config` map onto these fields one to one.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from openmm_stable.config import config_from_dict
from openmm_stable.engine import EngineConfig
from openmm_stable.errors import InputError
from openmm_stable.stability import STABILITY_KINDS, TRAINING_BOND_THRESHOLD, WATER_MIN_DISTANCE_THRESHOLD
from openmm_stable.training.estimator import ObservableLoss

SAMPLE_SOURCES = ("all", "stable", "unstable")
LEARNING_RESTARTS = ("initial", "last_window")
FAILURE_RESETS = ("last_stable", "epoch_start")
OPTIMIZERS = ("adam", "sgd")
OBJECTIVES = ("ensemble", "per_frame")
# How learning gets its samples and takes its steps: "windows" re-runs the window in which
# instabilities happened (the paper's loop, with this project's recipe settings);
# "failure_bank" banks every replica's frames near and at failures and steps whenever
# enough failures are banked (`openmm_stable.training.failure_bank`; for starts that fail rarely).
# "auto": a short probe of the start picks windows (fragile) or the failure bank (rare):
# `openmm_stable.training.auto`.
LEARNING_MODES = ("auto", "windows", "paper", "failure_bank")  # "paper": windows with `PAPER_SETTINGS`
REPLAYS = ("states", "exact")
LEARNING_WINDOWS = ("triggering_epoch", "failing_epochs")
SCALE_SOURCES = ("first_learning_window", "simulation_epochs")
RESTORE_OPTIMIZERS = ("shared", "lbfgs")
SCHEDULE_METRICS = ("observable_loss", "unstable_fraction")

# `learning: paper`: the learning loop as the paper's published code runs it (read from the
# authors' repository, ../shared/DESIGN.md): plain SGD at 1e-3, the summed gradient clipped
# to norm 1, the energy/force gradient over the whole training set unnormalised with weight
# 10, a new optimizer per learning phase, ReduceLROnPlateau (patience 10) on the unstable
# fraction, learning until no replica fails or the rate is 1/25 of its start; failed
# replicas go back to the start of the epoch in which they failed, and learning replays
# those windows exactly (thermostat state included) with every frame a sample. Keys given
# next to `learning: paper` win over these.
PAPER_SETTINGS = {
    "optimizer": "sgd", "lr": 1e-3, "grad_clip": 1.0, "warmup_steps": 0, "normalize_losses": False,
    "energy_force_weight": 10.0, "qm_batch_size": None, "new_optimizer_per_phase": True,
    "lr_patience": 10, "lr_factor": 0.2, "max_lr_reductions": 2, "lr_schedule_on": "unstable_fraction",
    "learning_restart": "last_window", "failure_reset": "epoch_start", "until_stable": True,
    "random_reset_fraction": 0.05, "unstable_fraction": 0.75, "replay": "exact",
    "learning_window": "failing_epochs", "equilibrate_replays": False, "samples_from": "all",
}

@dataclasses.dataclass
class StableConfig:
    """Every refinement setting; defaults follow the paper where they fit a CPU. The failure
    handling and the learning rate are the recipe that stabilised the fragile start of
    benchmarks/README section 5 (the first recipe, kept reachable through these fields, did not)."""

    learning: str = "windows"  # LEARNING_MODES
    # learning: failure_bank: its settings (`openmm_stable.training.failure_bank.FailureBankSettings` fields)
    failure_bank: dict = dataclasses.field(default_factory=dict)
    # learning: auto: replica-ps per replica of the renewal probe, and the failures per replica
    # per epoch below which the start counts as rare (training/auto.py says where 0.15 comes from)
    probe_ps: float = 2.0
    rare_start_failures_per_epoch: float = 0.15
    n_replicas: int = 16
    epoch_ps: float = 1.0  # simulated time per replica per epoch
    frame_interval_ps: float = 0.05  # stability checks and estimator samples
    equilibration_ps: float = 0.1  # learning phase: frames before this are not samples
    stability: str = "auto"  # "bonds", "min_distance", "min_nonbonded_distance"; "auto": min_distance if periodic
    bond_threshold: float = TRAINING_BOND_THRESHOLD
    min_distance_threshold: float = WATER_MIN_DISTANCE_THRESHOLD
    unstable_fraction: float = 0.75  # fraction of failed replicas that starts learning
    learning_epochs: int = 10  # epochs per learning phase (the most, with until_stable)
    # Where every learning epoch starts: "initial" = the replicas' dataset frames with fresh
    # velocities; "last_window" = the states at the start of the simulation epoch in which
    # the unstable fraction was reached, so each learning epoch re-runs the window where the
    # instabilities happened (the paper's code does this).
    learning_restart: str = "last_window"
    until_stable: bool = True  # end a learning phase early once an epoch has no failing replica
    # Simulation phase: where a replica that crossed the threshold goes back to. "last_stable":
    # its last stable frame (under deterministic dynamics it re-fails at once and parks);
    # "epoch_start": its state at the start of the epoch in which it failed (the paper's code),
    # so a learning window that starts there holds the whole approach to failure.
    failure_reset: str = "epoch_start"
    # How a learning epoch re-runs its window: "states" sets positions and velocities (a fresh
    # thermostat: new Langevin noise, Nose-Hoover chains at rest); "exact" restores OpenMM's
    # checkpoint of the window's start, so the re-run is the same dynamics under the updated
    # model (the paper's deterministic replay; needs an engine in this process).
    replay: str = "states"
    # Which states the learning window holds: "triggering_epoch" = every replica's state at
    # the start of the epoch that reached `unstable_fraction`; "failing_epochs" = a replica
    # that failed earlier in the cycle starts from the start of ITS failing epoch, so the
    # re-run holds every failure of the cycle, not only the last epoch's.
    learning_window: str = "triggering_epoch"
    # Simulation phase: keep the frames of each failing replica up to its failure and add them
    # to the first learning step's samples (they are dropped at the reset otherwise).
    simulation_failure_samples: bool = False
    # Drop the first `equilibration_ps` of a learning epoch also when it replays saved,
    # already equilibrated states (True: as before; a failure early in a window is then lost).
    equilibrate_replays: bool = True
    random_reset_fraction: float = 0.05  # simulation epochs: this fraction of stable replicas restart (paper: 0.05)
    new_optimizer_per_phase: bool = True  # the paper's code makes a new optimizer for each learning phase
    max_epochs: int = 20
    max_learning_steps: Optional[int] = None  # stop after this many optimizer steps (controls match a run's count)
    observable: dict = dataclasses.field(default_factory=lambda: {"name": "hr"})
    # A target table file (r, g, sigma; `openmm_stable.targets`) for a curve observable (rdf,
    # hr): the target comes from it instead of the reference frames. None: from the frames.
    observable_target: Optional[str] = None
    observable_loss: str = "mse"
    # "ensemble": L(<O>), match the average; "per_frame": <L(O(x))>, score every frame
    # against the target, so frames far from it (the failures) raise their own energy
    # (`openmm_stable.training.estimator`; the paper's code offers both).
    observable_objective: str = "ensemble"
    local_neighbourhoods: bool = False  # periodic RDF: every atom's environment is a sample (needs per-atom energies)
    neighbourhood_radius: Optional[float] = None  # A; default: the RDF's r_max
    samples_from: str = "all"
    observable_weight: float = 1.0
    energy_force_weight: float = 10.0
    # True: each loss divided by its value at the start (weights are relative); False: the
    # plain weighted sum, as the paper's code adds the energy/force gradient unnormalised.
    normalize_losses: bool = True
    # With normalize_losses, the observable loss's scale: the first learning window's loss
    # (one noisy window) or the mean over the simulation epochs before the first step.
    observable_scale_from: str = "first_learning_window"
    energy_weight: float = 1.0  # inside the energy/force loss, as in pre-training
    force_weight: float = 100.0
    qm_batch_size: Optional[int] = 32  # None: the energy/force gradient over the whole training set
    # A trust region on the QM fit: after a learning step that leaves the training-set force
    # MAE above this multiple of its value at the start, energy/force-only steps follow until
    # it is back within (at most `max_restore_steps`). None: off. A fixed energy/force weight
    # either holds the force error and loses the stability gain or keeps the gain and lets
    # the force error drift (benchmarks/README section 5a); the budget acts only on the drift.
    force_mae_budget: Optional[float] = None
    max_restore_steps: int = 10
    # The restore steps' optimizer: "shared" = the learning optimizer (its moments carry the
    # observable gradient into the restore); "lbfgs" = a new L-BFGS on the energy/force loss.
    restore_optimizer: str = "shared"
    optimizer: str = "adam"
    lr: float = 5e-4
    grad_clip: Optional[float] = 1.0
    warmup_steps: int = 5  # learning rate ramps up over the first steps (Adam's first steps are large)
    lr_factor: float = 0.5
    lr_patience: int = 3
    lr_schedule_on: str = "observable_loss"  # the ReduceLROnPlateau metric (the paper: unstable_fraction)
    max_lr_reductions: int = 3  # training stops after this many reductions
    estimator_minibatch: int = 256
    # Signal diagnostics per learning step: the cosine between the estimator gradients of two
    # disjoint halves of the replicas (near 0: the step is noise) and the first-order
    # predicted change of the observable loss (costs two extra backward passes).
    log_signal: bool = True
    # With a threshold: a learning epoch whose split-half cosine is below it takes no step;
    # its frames are kept and the next epoch's are added (the model has not changed, so they
    # sample the same ensemble), up to `max_accumulated_windows` windows per step.
    min_split_half_cosine: Optional[float] = None
    max_accumulated_windows: int = 4
    val_fraction: float = 0.1
    seed: int = 0
    # K at which the reference frames were sampled when the file records none (MD17: 500);
    # None: as recorded, else the run temperature (`openmm_stable.temperature`).
    reference_temperature_K: Optional[float] = None
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if isinstance(self.engine, dict):
            self.engine = EngineConfig(**self.engine)

        def fail(field, message):
            raise InputError(f"refine config: {field}: {message}")

        if self.warmup_steps < 0:
            fail("warmup_steps", "must be >= 0")
        for name in ("n_replicas", "learning_epochs", "max_epochs", "estimator_minibatch"):
            if int(getattr(self, name)) < 1:
                fail(name, "must be >= 1")
        if self.min_split_half_cosine is not None and not -1 <= self.min_split_half_cosine <= 1:
            fail("min_split_half_cosine", "must be in [-1, 1] (or unset)")
        if self.min_split_half_cosine is not None and not self.log_signal:
            fail("min_split_half_cosine", "needs log_signal: true (the cosine is measured there)")
        if self.max_accumulated_windows < 1:
            fail("max_accumulated_windows", "must be >= 1")
        if self.force_mae_budget is not None and not self.force_mae_budget >= 1:
            fail("force_mae_budget", "must be >= 1 (a ratio to the starting force MAE), or unset")
        if self.max_restore_steps < 1:
            fail("max_restore_steps", "must be >= 1")
        if self.qm_batch_size is not None and int(self.qm_batch_size) < 1:
            fail("qm_batch_size", "must be >= 1 (or unset: the whole training set)")
        if self.failure_reset not in FAILURE_RESETS:
            fail("failure_reset", f"must be one of {', '.join(FAILURE_RESETS)}")
        if not 0 <= self.random_reset_fraction < 1:
            fail("random_reset_fraction", "must be in [0, 1)")
        if self.observable_weight < 0 or self.energy_force_weight < 0:
            fail("observable_weight" if self.observable_weight < 0 else "energy_force_weight", "must be >= 0")
        for name in ("epoch_ps", "frame_interval_ps", "bond_threshold", "min_distance_threshold", "lr"):
            if not getattr(self, name) > 0:
                fail(name, "must be > 0")
        if not 0 <= self.equilibration_ps < self.epoch_ps:
            fail("equilibration_ps", f"{self.equilibration_ps:g} ps must be >= 0 and shorter than epoch_ps "
                                     f"({self.epoch_ps:g} ps); set both (refine --epoch-ps, --equilibration-ps)")
        if not self.probe_ps > 0:
            fail("probe_ps", "must be > 0")
        if not 0 < self.rare_start_failures_per_epoch < 1:
            fail("rare_start_failures_per_epoch", "must be in (0, 1)")
        if not 0 < self.unstable_fraction <= 1:
            fail("unstable_fraction", "must be in (0, 1]")
        if self.stability not in STABILITY_KINDS:
            fail("stability", f"must be one of {', '.join(STABILITY_KINDS)}")
        if self.learning_restart not in LEARNING_RESTARTS:
            fail("learning_restart", f"must be one of {', '.join(LEARNING_RESTARTS)}")
        for name, allowed in (("learning", LEARNING_MODES), ("replay", REPLAYS), ("learning_window", LEARNING_WINDOWS),
                              ("observable_scale_from", SCALE_SOURCES), ("restore_optimizer", RESTORE_OPTIMIZERS),
                              ("lr_schedule_on", SCHEDULE_METRICS)):
            if getattr(self, name) not in allowed:
                fail(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.failure_bank, dict):
            fail("failure_bank", "must be a mapping of FailureBankSettings fields")
        if self.observable_objective not in OBJECTIVES:
            fail("observable_objective", f"must be one of {', '.join(OBJECTIVES)}")
        if self.observable_objective == "per_frame" and self.local_neighbourhoods:
            fail("observable_objective", "per_frame is not available with local_neighbourhoods")
        if self.samples_from not in SAMPLE_SOURCES:
            fail("samples_from", f"must be one of {', '.join(SAMPLE_SOURCES)}")
        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        if not isinstance(self.observable, dict) or "name" not in self.observable:
            fail("observable", "must be a mapping with a 'name' (hr, rdf, bond_lengths, adf, min_distance) and its settings")
        if not 0 < self.val_fraction < 1:
            fail("val_fraction", "must be in (0, 1)")
        if self.neighbourhood_radius is not None and not self.neighbourhood_radius > 0:
            fail("neighbourhood_radius", "must be > 0 (or unset: the RDF's r_max)")
        ObservableLoss(torch.zeros(1), self.observable_loss)  # validates the loss name
        if self.observable_target is not None:
            from openmm_stable.targets import CURVE_OBSERVABLES, read_table

            if self.observable["name"] not in CURVE_OBSERVABLES:
                fail("observable_target", f"a target table gives a curve over r bins, for the "
                                          f"{' or '.join(CURVE_OBSERVABLES)} observable, not "
                                          f"{self.observable['name']!r}")
            self.observable_target = str(self.observable_target)
            read_table(self.observable_target)  # a malformed table fails here, before any simulation

    @classmethod
    def from_dict(cls, values: dict) -> "StableConfig":
        """From a mapping (YAML, the CLI); unknown keys are an error. ``learning: paper``
        brings `PAPER_SETTINGS`, under any key given beside it."""
        values = dict(values or {})
        if values.get("learning") == "paper":
            values = {**PAPER_SETTINGS, **values}
        return config_from_dict(cls, values, "refine config")

    @classmethod
    def paper(cls, **overrides) -> "StableConfig":
        """The paper's learning loop (`PAPER_SETTINGS`); `overrides` win."""
        return cls.from_dict({"learning": "paper", **overrides})

    @property
    def steps_per_frame(self) -> int:
        return max(1, round(self.frame_interval_ps / self.engine.timestep_ps))

    @property
    def frames_per_epoch(self) -> int:
        return max(1, round(self.epoch_ps / self.frame_interval_ps))

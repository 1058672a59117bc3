"""StABlE training: simulate replicas, find instabilities, correct the model with the
Boltzmann estimator, repeat (arXiv 2402.13984, algorithm 1).

Phases, one epoch at a time:

* simulation: replicas run ``epoch_ps``; a replica that crosses the training threshold
  (bond deviation 0.25 A for molecules; for periodic boxes, ``stability: auto``, a minimum
  intermolecular distance below 1.2 A) goes back to the state it had at the start of the
  epoch (``failure_reset``), and a few stable ones restart from their initial frames
  (``random_reset_fraction``). Once the fraction of replicas that failed in this cycle
  reaches ``unstable_fraction``, learning starts.
* learning: every learning epoch re-runs the window in which that happened
  (``learning_restart``), and the frames after ``equilibration_ps`` give the gradient of
  the observable objective (Boltzmann estimator, beta = 1/kT; L(<O>) or, per frame,
  <L(O(x))>) plus ``energy_force_weight`` times the energy/force loss gradient on the QM
  data; clip, step; with ``force_mae_budget``, energy/force-only steps until the
  training-set force MAE is back within the budget; re-export into the running Context.
  The phase ends when a re-run has no failing replica (``until_stable``) or after
  ``learning_epochs``; a new cycle starts. ``replay``, ``learning_window``,
  ``simulation_failure_samples`` and ``equilibrate_replays`` choose how faithfully a window
  is replayed; ``learning: paper`` is the paper code's loop (`PAPER_SETTINGS`).

The step's parts (objective, regulariser, step rule, force budget) are in
`openmm_stable.training.learning`; this module is the loop that feeds them frames.
``learning: failure_bank`` is another loop over the same parts
(`openmm_stable.training.failure_bank`).

Every epoch ends with an atomic checkpoint (model, optimizer, scheduler, replica states,
RNG states, phase and cycle), so ``refine(..., resume=True)`` continues after a kill.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from openmm_stable.errors import InputError
from openmm_stable.config import config_to_dict
from openmm_stable.data.dataset import QMDataset
from openmm_stable.data.splits import split_indices
from openmm_stable.engines import create_engine
from openmm_stable.io import atomic_write_json, atomic_write_text, load_torch_file, save_torch_file, get_rng_state, set_rng_state, write_csv
from openmm_stable.models import NNIP, model_from_record, read_model_record, save_model
from openmm_stable.geometry import find_bonds, half_box_width
from openmm_stable.observables import element_pair_list, make_observable, reference_from_dataset
from openmm_stable.temperature import settle_temperatures
from openmm_stable.stability import make_criterion, molecule_ids
from openmm_stable.training.batching import FrameTensors, evaluate, refit_energy_shift
from openmm_stable.training.estimator import ObservableLoss, model_atom_energy_fn
from openmm_stable.training.learning import (EnergyForceRegulariser, ForceBudget, ObservableObjective, StepRule,
                                             gradient_norm, predicted_change)
from openmm_stable.training.stable_config import StableConfig

# Settings that may change when a run is resumed: the limits that say when it stops.
RESUMABLE_CHANGES = ("max_epochs", "max_learning_steps", "max_lr_reductions")

LOG_COLUMNS = ["epoch", "cycle", "phase", "observable_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A",
               "unstable_fraction", "lr", "grad_norm", "observable_grad_norm", "energy_force_grad_norm",
               "split_half_cosine", "accumulated_windows", "predicted_loss_change", "realised_loss_change",
               "n_samples", "n_local_samples", "train_force_mae_meV_per_A", "restore_steps", "sim_time_s",
               "grad_time_s"]


def observable_settings(observable: dict, dataset: QMDataset) -> dict:
    """The training observable's settings for `dataset`. Molecules: as given. A periodic
    box has no single molecule whose h(r) could be matched, so there the default ``hr``
    means the paper's liquid observable, the element-pair RDFs of every pair (O-O, O-H,
    H-H for water); an RDF's r_max is capped at half the box, and ``min_distance`` gets
    the dataset's molecules."""
    settings = dict(observable)
    if dataset.box is None:
        return settings
    if settings["name"] == "hr":
        settings = {"name": "rdf", "pairs": element_pair_list(dataset.atomic_numbers)}
    if settings["name"] == "rdf":
        settings["r_max"] = min(float(settings.get("r_max", 6.0)), half_box_width(dataset.box))
    if settings["name"] == "min_distance" and settings.get("molecule_ids") is None:
        settings["molecule_ids"] = molecule_ids(dataset).tolist()
    return settings


def qm_frames(dataset: QMDataset, config: StableConfig, model_split: Optional[dict] = None,
              model_fingerprint: Optional[str] = None) -> tuple[QMDataset, QMDataset, dict]:
    """The QM frames of the regulariser and of the validation errors, and a record of them.

    When `dataset` is the file the model was pre-trained on (same fingerprint) and the
    model's record holds its split, the regulariser trains on the pre-training frames and
    validates on its validation frames: the test frames stay unseen, so the test errors
    reported after refinement still mean something. Otherwise a random split of
    `dataset` (1 - ``val_fraction`` / ``val_fraction``), and the record says so."""
    if model_split and model_fingerprint is not None and model_fingerprint == dataset.fingerprint():
        train, val, test = (np.asarray(model_split.get(k, []), dtype=np.int64) for k in ("train", "val", "test"))
        source = "model record"
        note = (f"QM frames: the model's pre-training split ({train.size} train / {val.size} validation; "
                f"its {test.size} test frames are not used)")
    else:
        train, val, test = split_indices(len(dataset), 1.0 - config.val_fraction, config.val_fraction, 0,
                                         mode="random", seed=config.seed)
        why = ("the model records no split" if not model_split else
               "--data is not the file the model was trained on (another fingerprint)")
        source = "random split of --data"
        note = (f"QM frames: {why}, so a random {1 - config.val_fraction:.0%}/{config.val_fraction:.0%} split of the "
                f"{len(dataset)} frames of --data ({len(train)} train / {len(val)} validation); if --data holds "
                "frames the model was tested on, its test errors are no longer independent")
    if len(train) == 0 or len(val) == 0:
        raise InputError(f"refine: {len(dataset)} frames in {dataset.source} leave {len(train)} training and "
                         f"{len(val)} validation frames for the QM regulariser; it needs at least one of each")
    split = {"source": source, "note": note, "train": train.tolist(), "val": val.tolist(), "test": test.tolist()}
    return dataset.subset(train), dataset.subset(val), split


@dataclasses.dataclass
class LoopState:
    """Everything the loop needs to continue where it stopped (stored in the checkpoint)."""

    epoch: int = 0
    cycle: int = 0
    phase: str = "simulation"
    learning_epochs_done: int = 0
    lr_reductions: int = 0
    learning_steps: int = 0
    warmup_start: int = 0  # learning_steps when the current optimizer was made
    observable_loss_scale: Optional[float] = None  # first learning epoch's observable loss
    energy_force_loss_scale: Optional[float] = None  # energy/force loss of the starting model
    failed_this_cycle: Optional[np.ndarray] = None  # (R,) bool
    positions: Optional[np.ndarray] = None  # (R, N, 3) current replica states
    velocities: Optional[np.ndarray] = None
    stable_positions: Optional[np.ndarray] = None  # last stable state per replica
    stable_velocities: Optional[np.ndarray] = None
    window_positions: Optional[np.ndarray] = None  # states at the start of the current simulation epoch
    window_velocities: Optional[np.ndarray] = None
    learning_positions: Optional[np.ndarray] = None  # learning_restart="last_window": where learning epochs start
    learning_velocities: Optional[np.ndarray] = None
    window_checkpoint: Optional[list] = None  # replay="exact": the engine's checkpoint at the window start
    learning_checkpoint: Optional[list] = None  # ... of the window learning replays
    failing_window_positions: Optional[np.ndarray] = None  # per replica: start of the epoch it last failed in
    failing_window_velocities: Optional[np.ndarray] = None
    own_window: Optional[np.ndarray] = None  # (R,) bool: replicas whose learning start is their own failing epoch
    failure_samples: Optional[np.ndarray] = None  # simulation_failure_samples: frames up to each failure
    failure_sample_replicas: Optional[np.ndarray] = None
    pending_samples: Optional[np.ndarray] = None  # frames of windows kept for the next step (min_split_half_cosine)
    pending_replicas: Optional[np.ndarray] = None
    pending_windows: int = 0
    predicted_loss_change: Optional[float] = None  # of the last learning step, first order
    start_force_mae: Optional[float] = None  # training-set force MAE before the first step (force_mae_budget)
    restore_steps: int = 0  # energy/force-only steps taken to keep force_mae_budget
    last_learning_loss: Optional[float] = None  # observable loss that step was computed from
    history: list = dataclasses.field(default_factory=list)
    finished: bool = False


class StableTrainer:
    """Owns the model, optimizer, engine and loop state of one refinement run."""

    def __init__(self, model: NNIP, dataset: QMDataset, config: StableConfig, out_dir,
                 reference: Optional[QMDataset] = None, progress: bool = True, model_split: Optional[dict] = None,
                 model_fingerprint: Optional[str] = None):
        """`model_split` / `model_fingerprint`: the train/val/test indices and the dataset
        fingerprint the model's record holds (`qm_frames`)."""
        self.config = config
        self.out = Path(out_dir)
        self.progress = progress
        self.model = model
        torch.manual_seed(config.seed)
        if dataset.energies is None or dataset.forces is None:
            raise InputError(f"refine: {dataset.source} has no {'energies' if dataset.energies is None else 'forces'}: "
                             "the QM regulariser and the validation errors need labelled frames (energies and forces)")
        self.train_set, self.val_set, self.qm_split = qm_frames(dataset, config, model_split, model_fingerprint)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dataset = dataset
        self.z = dataset.atomic_numbers
        dtype = next(iter(model.parameters())).dtype
        self.train_tensors = FrameTensors(self.train_set, dtype=dtype)
        self.val_tensors = FrameTensors(self.val_set, dtype=dtype)
        self.budget: Optional[ForceBudget] = None
        if config.force_mae_budget is not None:
            budget_idx = np.sort(np.random.default_rng(config.seed).permutation(len(self.train_set))[:256])
            self.budget = ForceBudget(FrameTensors(self.train_set.subset(budget_idx), dtype=dtype),
                                      config.force_mae_budget, config.max_restore_steps, config.restore_optimizer)
        self.criterion = make_criterion(dataset, config.stability, config.bond_threshold, config.min_distance_threshold)
        self.box = None if dataset.box is None else torch.as_tensor(dataset.box, dtype=dtype)
        self.observable_config = observable_settings(config.observable, dataset)
        self.observable = make_observable(**self.observable_config).prepare(dataset.atomic_numbers,
                                                                            dataset.positions[0])
        self.target_record = None  # observable_target: where the target came from (metrics.json)
        if config.observable_target is not None:  # a user's table (`openmm_stable.targets`)
            from openmm_stable.targets import observable_target

            target = observable_target(self.observable, config.observable_target)
            reference_target, self.reference_ess = target.values, None
            self.target_record = {**target.record(), "sigma_used_as_weight": False}
        else:
            reference_target, self.reference_ess = reference_from_dataset(
                self.observable, reference if reference is not None else dataset, config.engine.temperature_K)
        if config.local_neighbourhoods:
            if dataset.box is None or not hasattr(self.observable, "local_samples"):
                raise InputError("refine config: local_neighbourhoods: only for the rdf observable of a periodic box "
                                 f"(here: {self.observable_config['name']!r}"
                                 f"{'' if dataset.box is not None else ', no box'})")
            model_atom_energy_fn(model, self.z, self.box)  # raises for networks without per-atom energies
        self.objective = ObservableObjective(
            self.observable, ObservableLoss(reference_target, config.observable_loss), self.z, dataset.box, self.box,
            config.engine.temperature_K, per_frame=config.observable_objective == "per_frame",
            local_neighbourhoods=config.local_neighbourhoods, neighbourhood_radius=config.neighbourhood_radius,
            minibatch=config.estimator_minibatch)
        self._new_optimizer()
        self.rng = np.random.default_rng(config.seed)
        self.regulariser = EnergyForceRegulariser(self.train_tensors, config.energy_weight, config.force_weight,
                                                  config.qm_batch_size, self.rng)
        start = self.rng.choice(len(dataset), size=config.n_replicas, replace=len(dataset) < config.n_replicas)
        self.initial_positions = dataset.positions[start]
        self.engine = create_engine(model, self.z, config.n_replicas, config.engine, dataset.box, seed=config.seed)
        if config.replay == "exact" and not hasattr(self.engine, "checkpoint"):
            raise InputError("refine config: replay: exact needs OpenMM checkpoints of the engine, which the "
                             "distributed engine (workers > 1) does not offer; use replay: states")
        self.state = LoopState()
        self.best: Optional[dict] = None  # {"path", "cycle", "epoch", "val_force_mae_meV_per_A"} of best.pt

    def _new_optimizer(self) -> None:
        """A fresh step rule (at refinement start, and with ``new_optimizer_per_phase`` at
        each learning phase; the warm-up starts over)."""
        cfg = self.config
        self.step_rule = StepRule(self.model, cfg.optimizer, cfg.lr, cfg.grad_clip, cfg.warmup_steps, cfg.lr_factor,
                                  cfg.lr_patience)
        if hasattr(self, "state"):
            self.state.warmup_start = self.state.learning_steps

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step_rule.optimizer

    @property
    def scheduler(self):
        return self.step_rule.scheduler

    # --- checkpoints ---------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        engine_checkpoint = self.engine.checkpoint() if hasattr(self.engine, "checkpoint") else None
        save_torch_file({
            "format": "openmm-stable-refine", "spec": self.model.spec, "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "loop": dataclasses.asdict(self.state), "config": config_to_dict(self.config),
            "initial_positions": self.initial_positions, "rng": get_rng_state(),
            "np_rng": self.rng.bit_generator.state, "dataset_fingerprint": self.dataset.fingerprint(),
            "qm_split": self.qm_split, "best": self.best,
            # OpenMM's own checkpoint (with the Langevin random state): a resumed run is the
            # run it continues, not only a valid continuation of it.
            "engine_checkpoint": engine_checkpoint, "engine_platform": self.engine.platform_name,
            "mode_state": self.mode_state(),
        }, self.checkpoint_path)

    def mode_state(self) -> dict:
        """What a learning mode keeps beyond `LoopState` (e.g. a failure bank): plain data
        for the checkpoint; `restore_mode_state` gets it back on resume."""
        return {}

    def restore_mode_state(self, values: dict) -> None:
        pass

    def check_resumable(self, payload: dict) -> None:
        """Refuse to continue a run on other data or with other settings; only the limits
        that say when to stop (``RESUMABLE_CHANGES``) may differ."""
        if payload.get("dataset_fingerprint") != self.dataset.fingerprint():
            raise InputError(f"{self.checkpoint_path}: written for another dataset; use a new --out folder")
        saved, now = payload.get("config", {}), config_to_dict(self.config)
        # A setting added after the run started is absent from its checkpoint: unchanged if
        # it still has its default (an upgrade does not strand a run).
        defaults = config_to_dict(StableConfig())
        saved = {**{k: defaults[k] for k in now if k not in saved and k in defaults}, **saved}
        changed = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if changed:
            detail = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise InputError(f"{self.checkpoint_path}: the run was started with other settings ({detail}); resume with "
                             f"the same config (only {', '.join(RESUMABLE_CHANGES)} may change) or use --overwrite")
        if "qm_split" not in payload:
            raise InputError(f"{self.checkpoint_path}: written by an earlier version of openmm-stable, which did not "
                             "record its QM frames; start again with --overwrite")
        if payload["qm_split"]["train"] != self.qm_split["train"]:
            raise InputError(f"{self.checkpoint_path}: the run used other QM training frames "
                             f"({payload['qm_split']['note']}; now: {self.qm_split['note']})")

    def load_checkpoint(self) -> None:
        payload = load_torch_file(self.checkpoint_path)
        self.check_resumable(payload)
        self.best = payload.get("best")
        self.model.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.state = LoopState(**payload["loop"])
        self.restore_mode_state(payload.get("mode_state") or {})
        self.state.finished = self._done()  # the config may allow more epochs now
        self.initial_positions = payload["initial_positions"]
        set_rng_state(payload["rng"])
        self.rng.bit_generator.state = payload["np_rng"]
        self.engine.update_model(self.model)
        saved = payload.get("engine_checkpoint")
        if saved is not None and hasattr(self.engine, "restore_checkpoint") and \
                payload.get("engine_platform") == self.engine.platform_name:
            self.engine.restore_checkpoint(saved)
        else:  # another platform (or engine): the same states, a new random stream
            self.engine.set_states(self.state.positions, self.state.velocities)

    # --- one epoch -----------------------------------------------------------------------
    def _simulate_epoch(self) -> tuple[np.ndarray, np.ndarray]:
        """Run one epoch; frames (T, R, N, 3) and unstable flags (T, R). In the simulation
        phase a failing replica is reset at once (`failure_reset`); the loop is the engine's
        `run_checked`, shared with `simulate`."""
        cfg, st = self.config, self.state
        T, R = cfg.frames_per_epoch, cfg.n_replicas
        frames = np.empty((T, R, len(self.z), 3))
        flags = np.zeros((T, R), dtype=bool)

        def record_and_reset(frame) -> None:
            frames[frame.index], flags[frame.index] = frame.positions, frame.unstable
            if st.phase != "simulation":
                return  # learning: failing replicas run on; their frames are samples too
            ok = ~frame.unstable
            st.stable_positions[ok], st.stable_velocities[ok] = frame.positions[ok], frame.velocities[ok]
            if frame.unstable.any():
                idx = np.flatnonzero(frame.unstable)
                st.failing_window_positions[idx] = st.window_positions[idx]
                st.failing_window_velocities[idx] = st.window_velocities[idx]
                if cfg.failure_reset == "epoch_start":
                    self.engine.reset_replicas(idx, st.window_positions[idx], st.window_velocities[idx])
                else:
                    self.engine.reset_replicas(idx, st.stable_positions[idx], st.stable_velocities[idx])

        self.engine.run_checked(T, cfg.steps_per_frame, self.criterion, record_and_reset)
        if st.phase == "simulation" and cfg.simulation_failure_samples and flags.any():
            self._keep_failure_samples(frames, flags)
        if st.phase == "simulation" and cfg.random_reset_fraction > 0:
            stable = np.flatnonzero(~flags.any(axis=0))
            chosen = stable[self.rng.random(stable.size) < cfg.random_reset_fraction]
            if chosen.size:  # back to their initial frames with fresh velocities
                self.engine.reset_replicas(chosen, self.initial_positions[chosen],
                                           seed=cfg.seed + 7919 * (st.epoch + 1))
        return frames, flags

    def _keep_failure_samples(self, frames: np.ndarray, flags: np.ndarray) -> None:
        """Simulation phase: the frames of each replica that failed in this epoch, up to its
        last failure (the approach to failure, which the reset would drop), kept for the next
        learning step; at most one window's worth, the latest kept."""
        st, cfg = self.state, self.config
        failed = np.flatnonzero(flags.any(axis=0))
        last = flags.shape[0] - 1 - np.argmax(flags[::-1, failed], axis=0)
        kept = [frames[:t + 1, r] for r, t in zip(failed, last)]
        replicas = [np.full(t + 1, r) for r, t in zip(failed, last)]
        if st.failure_samples is not None:
            kept, replicas = [st.failure_samples, *kept], [st.failure_sample_replicas, *replicas]
        cap = cfg.frames_per_epoch * cfg.n_replicas
        st.failure_samples = np.concatenate(kept)[-cap:]
        st.failure_sample_replicas = np.concatenate(replicas)[-cap:]

    def _enter_learning(self) -> None:
        """The unstable fraction was reached: learning starts and its window is fixed. With
        ``learning_window: failing_epochs`` a replica that failed earlier in the cycle
        replays the start of its own failing epoch, so every failure of the cycle is in it."""
        st, cfg = self.state, self.config
        st.phase = "learning"
        if cfg.new_optimizer_per_phase:
            self._new_optimizer()
        st.learning_positions, st.learning_velocities = st.window_positions, st.window_velocities
        st.learning_checkpoint, st.own_window = st.window_checkpoint, None
        if cfg.learning_window == "failing_epochs":
            own = st.failed_this_cycle & ~np.all(st.failing_window_positions == st.window_positions, axis=(1, 2))
            st.learning_positions = np.where(own[:, None, None], st.failing_window_positions, st.window_positions)
            st.learning_velocities = np.where(own[:, None, None], st.failing_window_velocities, st.window_velocities)
            st.own_window = own

    def _restart_replicas(self, for_learning: bool = False) -> None:
        """All replicas back to their initial frames with fresh Maxwell-Boltzmann velocities,
        or, for a learning epoch with ``learning_restart="last_window"``, to the saved states
        of the window in which the instabilities happened: with ``replay: exact`` OpenMM's
        checkpoint of its start (thermostat chains and random stream included), then the
        replicas with a window of their own (`_enter_learning`) set to it."""
        st, cfg = self.state, self.config
        if for_learning and cfg.learning_restart == "last_window" and st.learning_positions is not None:
            if cfg.replay == "exact" and st.learning_checkpoint is not None:
                self.engine.restore_checkpoint(st.learning_checkpoint)
                own = np.flatnonzero(st.own_window) if st.own_window is not None else np.zeros(0, dtype=int)
                self.engine.reset_replicas(own, st.learning_positions[own], st.learning_velocities[own])
            else:
                self.engine.set_states(st.learning_positions, st.learning_velocities)
        else:
            self.engine.set_states(self.initial_positions, seed=cfg.seed + 1000 * (st.epoch + 1))
            st.failure_samples = st.failure_sample_replicas = None  # a new cycle: other dynamics
        st.stable_positions, st.stable_velocities = self.engine.get_states()
        st.failed_this_cycle = np.zeros(cfg.n_replicas, dtype=bool)
        if not for_learning:
            st.failing_window_positions, st.failing_window_velocities = (a.copy() for a in self.engine.get_states())

    def _select_samples(self, frames: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sample frames (K, N, 3) and the replica each came from (K,)."""
        cfg, st = self.config, self.state
        replay = cfg.learning_restart == "last_window" and st.learning_positions is not None
        skip = 0 if replay and not cfg.equilibrate_replays else int(round(cfg.equilibration_ps / cfg.frame_interval_ps))
        frames, flags = frames[skip:], flags[skip:]
        ever_failed = np.cumsum(flags, axis=0) > 0  # (T, R): replica has failed by frame t
        if cfg.samples_from == "stable":
            mask = ~ever_failed
        elif cfg.samples_from == "unstable":
            mask = np.broadcast_to(ever_failed[-1], ever_failed.shape)
        else:
            mask = np.ones_like(ever_failed)
        mask = mask & np.isfinite(frames).all(axis=(2, 3))
        replica = np.broadcast_to(np.arange(frames.shape[1]), mask.shape)
        return frames[mask], replica[mask]

    def _learning_step(self, samples: np.ndarray, replica_of_sample: Optional[np.ndarray] = None,
                       unstable_fraction: Optional[float] = None) -> dict:
        """One step on  w_obs L_obs + w_ef L_ef  (each loss divided by its scale when
        ``normalize_losses``: the weights are then relative and independent of units and bin
        counts; raw h(r) losses are ~1e-2 while energy/force losses are ~1e1), composed of the
        parts in `openmm_stable.training.learning`: signal check, objective, regulariser,
        step rule, force budget; then the new weights go into the running Context."""
        cfg, st = self.config, self.state
        self.model.train()
        self.optimizer.zero_grad(set_to_none=False)
        x = torch.as_tensor(samples, dtype=torch.float64)
        row = self._signal_check(x, samples, replica_of_sample)
        if row.get("waiting"):
            row.pop("waiting")
            return {**row, "n_samples": int(len(samples))}  # no step: the gradient is still noise
        if self.budget is not None and st.start_force_mae is None:
            st.start_force_mae = self.budget.mae(self.model)
        params = list(self.model.parameters())
        result, n_local = self.objective.backward(self.model, x)
        if n_local is not None:
            row["n_local_samples"] = n_local
        if st.last_learning_loss is not None and st.predicted_loss_change is not None:
            row["realised_loss_change"] = result.loss - st.last_learning_loss
        if cfg.normalize_losses and st.observable_loss_scale is None:
            st.observable_loss_scale = max(self._observable_scale(result.loss), 1e-12)
        obs_factor = cfg.observable_weight / (st.observable_loss_scale if cfg.normalize_losses else 1.0)
        observable_grads = [p.grad.detach().clone() for p in params]  # of the plain L_obs
        if obs_factor != 1.0:
            for p in params:
                p.grad.mul_(obs_factor)
        if cfg.energy_force_weight > 0:
            self.regulariser.backward(self.model, self._energy_force_scale(cfg.energy_force_weight))
        obs_norm = gradient_norm(observable_grads) * obs_factor
        ef_norm = gradient_norm([p.grad - obs_factor * g for p, g in zip(params, observable_grads)])
        grad_norm = self.step_rule.clip()
        before = [p.detach().clone() for p in params]
        if math.isfinite(grad_norm):
            self.step_rule.step(st.learning_steps - st.warmup_start)
            st.learning_steps += 1
        st.predicted_loss_change = predicted_change(observable_grads, params, before)
        st.last_learning_loss = result.loss
        refit_energy_shift(self.model, self.train_tensors)
        row.update(self._keep_force_budget())
        by_unstable = cfg.lr_schedule_on == "unstable_fraction" and unstable_fraction is not None
        if self.step_rule.schedule(unstable_fraction if by_unstable else result.loss):
            st.lr_reductions += 1
        self.engine.update_model(self.model)
        return {"observable_loss": result.loss, "grad_norm": grad_norm, "observable_grad_norm": obs_norm,
                "energy_force_grad_norm": ef_norm, "n_samples": int(len(samples)),
                "predicted_loss_change": st.predicted_loss_change, **row}

    def _signal_check(self, x: torch.Tensor, samples: np.ndarray, replica_of_sample: Optional[np.ndarray]) -> dict:
        """The split-half cosine of this step's frames; with ``min_split_half_cosine``, a
        window whose cosine is below it is kept for the next step (``"waiting"`` in the row)
        together with the next window's frames, up to ``max_accumulated_windows``."""
        cfg, st = self.config, self.state
        row: dict = {}
        if cfg.log_signal and not cfg.local_neighbourhoods and replica_of_sample is not None:
            cosine = self.objective.split_half_cosine(self.model, x, replica_of_sample)
            if cosine is not None:
                row["split_half_cosine"] = cosine
            row["accumulated_windows"] = st.pending_windows + 1
            if (cfg.min_split_half_cosine is not None and cosine is not None and cosine < cfg.min_split_half_cosine
                    and st.pending_windows + 1 < cfg.max_accumulated_windows):
                st.pending_samples, st.pending_replicas = samples, replica_of_sample
                st.pending_windows += 1
                return {**row, "waiting": True}
        st.pending_samples = st.pending_replicas = None
        st.pending_windows = 0
        return row

    def _observable_scale(self, window_loss: float) -> float:
        """The observable loss's normalisation: this (first) window's loss, or the mean loss
        of the simulation epochs so far (many windows: less noise, F9 of the notes)."""
        if self.config.observable_scale_from == "simulation_epochs":
            losses = [r["observable_loss"] for r in self.state.history
                      if r["phase"] == "simulation" and r.get("observable_loss") is not None]
            if losses:
                return float(np.mean(losses))
        return window_loss

    def _energy_force_scale(self, weight: float) -> float:
        """`weight` over the energy/force loss of the starting model with ``normalize_losses``
        (measured once, on up to 256 training frames), else `weight` itself."""
        cfg, st = self.config, self.state
        if not cfg.normalize_losses:
            return weight
        if st.energy_force_loss_scale is None:
            st.energy_force_loss_scale = self.regulariser.loss(self.model)
        return weight / st.energy_force_loss_scale

    def _keep_force_budget(self) -> dict:
        """``force_mae_budget``: energy/force-only steps until the training-set force MAE is
        back within budget (`ForceBudget`). In the fragile-start runs the training frames'
        force MAE rose with the test set's (1.03-1.29x vs 1.03-1.22x)."""
        if self.budget is None:
            return {}
        mae, steps = self.budget.restore(self.model, self.state.start_force_mae, self.regulariser,
                                         self._energy_force_scale(1.0), self.step_rule, self.train_tensors)
        self.state.restore_steps += steps
        return {"train_force_mae_meV_per_A": mae, "restore_steps": steps}

    def observable_loss_of(self, frames: np.ndarray) -> float:
        """The training objective on `frames`: L(<O>), or <L(O(x))> with ``per_frame``."""
        return self.objective.loss_of(frames)

    def run_epoch(self) -> dict:
        cfg, st = self.config, self.state
        row = {"epoch": st.epoch + 1, "cycle": st.cycle, "phase": st.phase, "lr": self.optimizer.param_groups[0]["lr"]}
        t0 = time.perf_counter()
        if st.phase == "learning":
            self._restart_replicas(for_learning=True)
        else:
            st.window_positions, st.window_velocities = self.engine.get_states()
            if cfg.replay == "exact":
                st.window_checkpoint = self.engine.checkpoint()
        frames, flags = self._simulate_epoch()
        row["sim_time_s"] = time.perf_counter() - t0
        st.failed_this_cycle |= flags.any(axis=0)
        row["unstable_fraction"] = float(st.failed_this_cycle.mean())
        t1 = time.perf_counter()
        if st.phase == "learning":
            samples, replica_of_sample = self._select_samples(frames, flags)
            if st.pending_samples is not None:  # earlier windows whose gradient was noise
                samples = np.concatenate([st.pending_samples, samples])
                replica_of_sample = np.concatenate([st.pending_replicas, replica_of_sample])
            if st.failure_samples is not None:  # the simulation phase's approaches to failure
                samples = np.concatenate([st.failure_samples, samples])
                replica_of_sample = np.concatenate([st.failure_sample_replicas, replica_of_sample])
                row["n_failure_samples"] = int(len(st.failure_samples))
                st.failure_samples = st.failure_sample_replicas = None
            if len(samples) >= 2:
                row.update(self._learning_step(samples, replica_of_sample,
                                               unstable_fraction=float(flags.any(axis=0).mean())))
            st.learning_epochs_done += 1
            all_stable = cfg.until_stable and not flags.any()
            if st.learning_epochs_done >= cfg.learning_epochs or all_stable:  # back to simulation: new cycle
                self._save_snapshot(ended_stable=not flags.any())
                st.phase, st.cycle, st.learning_epochs_done = "simulation", st.cycle + 1, 0
                self._restart_replicas()
        else:
            stable_frames = frames[flags.cumsum(0) == 0]
            row["observable_loss"] = self.observable_loss_of(stable_frames) if len(stable_frames) >= 2 else None
            if st.failed_this_cycle.mean() >= cfg.unstable_fraction:
                self._enter_learning()
        row["grad_time_s"] = time.perf_counter() - t1
        return self._end_epoch(row)

    def _end_epoch(self, row: dict) -> dict:
        """What every learning mode does after an epoch: validation errors into the row, the
        replica states and the row into the loop state, the stop rule."""
        st = self.state
        metrics = evaluate(self.model, self.val_tensors)
        row["val_energy_mae_meV"] = metrics["energy_mae_meV"]
        row["val_force_mae_meV_per_A"] = metrics["force_mae_meV_per_A"]
        st.epoch += 1
        st.positions, st.velocities = self.engine.get_states()
        st.history.append(row)
        st.finished = self._done()
        return row

    def _save_model(self, path: Path, **extra) -> None:
        save_model(self.model, path, atomic_numbers=self.z, kind="refined",
                   training_temperature_K=self.config.engine.temperature_K,
                   dataset_fingerprint=self.dataset.fingerprint(), split=self.qm_split,
                   bonds=find_bonds(self.z, self.dataset.positions[0], box=self.dataset.box), **extra)

    def _save_snapshot(self, ended_stable: bool) -> None:
        """The model at the end of each learning phase, ``snapshots/cycle_K.pt``; and
        ``best.pt``: of the phases whose last re-run had no failing replica (the stability
        constraint), the model with the lowest validation force MAE."""
        st = self.state
        mae = float(evaluate(self.model, self.val_tensors)["force_mae_meV_per_A"])
        folder = self.out / "snapshots"
        folder.mkdir(exist_ok=True)
        info = {"cycle": st.cycle, "epoch": st.epoch + 1, "val_force_mae_meV_per_A": mae, "ended_stable": ended_stable}
        self._save_model(folder / f"cycle_{st.cycle:03d}.pt", snapshot=info)
        if ended_stable and (self.best is None or mae < self.best["val_force_mae_meV_per_A"]):
            self._save_model(self.out / "best.pt", snapshot=info)
            self.best = {**info, "path": "best.pt"}

    def _done(self) -> bool:
        cfg = self.config
        return (self.state.lr_reductions > cfg.max_lr_reductions or self.state.epoch >= cfg.max_epochs
                or (cfg.max_learning_steps is not None and self.state.learning_steps >= cfg.max_learning_steps))

    # --- the loop --------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        from tqdm.auto import tqdm

        from openmm_stable import report

        import yaml

        if resume:
            self.load_checkpoint()  # refuses other data or settings before anything is written
        else:
            self._restart_replicas()
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(config_to_dict(self.config), sort_keys=False))
        if self.progress:
            print(self.qm_split["note"])
        cfg = self.config
        bar = tqdm(total=cfg.max_epochs, initial=self.state.epoch, desc="refine", unit="epoch",
                   disable=not self.progress)
        while not self.state.finished:
            row = self.run_epoch()
            self.save_checkpoint()
            write_csv(self.out / "log.csv", self.state.history, LOG_COLUMNS)
            bar.update(1)
            bar.set_postfix(phase=row["phase"], obs=_fmt(row.get("observable_loss")),
                            fMAE=_fmt(row["val_force_mae_meV_per_A"]), unstable=f"{row['unstable_fraction']:.2f}")
        bar.close()
        self._save_model(self.out / "model.pt")
        # The signal diagnostics sit beside the losses: a split-half cosine near 0 says the
        # steps were noise, and the two gradient norms say which loss drove them.
        report.plot_csv_columns(self.out / "log.csv", ["observable_loss", "val_force_mae_meV_per_A",
                                                       "unstable_fraction", "lr", "split_half_cosine",
                                                       "observable_grad_norm", "energy_force_grad_norm"],
                                self.out / "learning_curves.png",
                                logy=["observable_loss", "observable_grad_norm", "energy_force_grad_norm"])
        losses = [r["observable_loss"] for r in self.state.history if r.get("observable_loss") is not None
                  and r["phase"] == "learning"]
        summary = {
            "epochs": self.state.epoch, "cycles": self.state.cycle, "learning_steps": self.state.learning_steps,
            "restore_steps": self.state.restore_steps,
            "first_observable_loss": losses[0] if losses else None,
            "last_observable_loss": losses[-1] if losses else None,
            "val_energy_mae_meV": self.state.history[-1]["val_energy_mae_meV"],
            "val_force_mae_meV_per_A": self.state.history[-1]["val_force_mae_meV_per_A"],
            "reference_ess": self.reference_ess,
            "observable_target": self.target_record or {"source": "reference frames"},
            "stability": self.criterion.__class__.__name__,
            "observable": {k: v for k, v in self.observable_config.items() if k != "molecule_ids"},
            "sim_time_s": sum(r["sim_time_s"] for r in self.state.history),
            "grad_time_s": sum(r["grad_time_s"] for r in self.state.history),
            "replica_steps": self.state.epoch * cfg.n_replicas * cfg.frames_per_epoch * cfg.steps_per_frame,
            "qm_frames": {k: self.qm_split[k] for k in ("source", "note")} | {
                "train": len(self.qm_split["train"]), "val": len(self.qm_split["val"])},
            "best": self.best,
        }
        atomic_write_json(self.out / "metrics.json", summary)
        return summary


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def check_output_folder(out_dir, resume: bool, overwrite: bool) -> None:
    """A refinement folder is never silently reused: continuing needs ``resume`` and a
    checkpoint; starting over in a folder that holds a run needs ``overwrite``."""
    out = Path(out_dir)
    if resume and overwrite:
        raise InputError("refine: --resume and --overwrite exclude each other")
    has_run = (out / "checkpoint.pt").exists() or (out / "model.pt").exists()
    if resume and not (out / "checkpoint.pt").exists():
        raise InputError(f"refine --resume: {out} holds no checkpoint.pt to continue from"
                         + ("" if out.exists() else " (the folder does not exist)"))
    if has_run and not resume and not overwrite:
        state = "a finished refinement" if (out / "model.pt").exists() else "a refinement in progress (or killed)"
        raise InputError(f"refine: {out} already holds {state}; --resume continues it, --overwrite starts over")
    if overwrite:
        for name in ("checkpoint.pt", "model.pt", "best.pt", "log.csv", "metrics.json"):
            (out / name).unlink(missing_ok=True)
        if (out / "snapshots").is_dir():
            for snapshot in (out / "snapshots").glob("cycle_*.pt"):
                snapshot.unlink()


def refine(model, dataset: QMDataset, config: StableConfig, out_dir, reference: Optional[QMDataset] = None,
           resume: bool = False, progress: bool = True, overwrite: bool = False) -> tuple[nn.Module, dict]:
    """StABlE-refine `model` (an `NNIP` or a model file) on `dataset`; see module doc.

    Given the model FILE, the QM regulariser uses the split its record holds when `dataset`
    is the file it was trained on (`qm_frames`); an `NNIP` carries no record, so its QM
    frames are a random split of `dataset` (the summary says which).
    Writes model.pt, best.pt, snapshots/cycle_K.pt, checkpoint.pt, log.csv,
    learning_curves.png, metrics.json and config.yaml to `out_dir`; `resume` continues
    from checkpoint.pt, `overwrite` replaces an earlier run. Returns the refined model and
    the summary metrics.
    """
    check_output_folder(out_dir, resume, overwrite)
    split = fingerprint = None
    if isinstance(model, (str, Path)):
        record = read_model_record(model)
        split, fingerprint = record.payload.get("split"), record.dataset_fingerprint
        model = model_from_record(record)
    else:
        # Train a copy: the caller's model stays the pre-trained one (a benchmark that
        # refined in place silently compared the refined model with itself).
        model = copy.deepcopy(model)
    engine, reference = settle_temperatures(config.engine, dataset, reference if reference is not None else dataset,
                                            config.reference_temperature_K)
    config = dataclasses.replace(config, engine=engine)
    choice = None
    if config.learning == "auto":
        from openmm_stable.training.auto import resolve_auto

        config, choice = resolve_auto(model, dataset, config, out_dir, resume, progress)
    trainer_class = StableTrainer
    if config.learning == "failure_bank":
        from openmm_stable.training.failure_bank import FailureBankTrainer

        trainer_class = FailureBankTrainer
    trainer = trainer_class(model, dataset, config, out_dir, reference=reference, progress=progress,
                            model_split=split, model_fingerprint=fingerprint)
    summary = trainer.fit(resume=resume)
    if choice is not None:
        summary["learning_choice"] = choice
        atomic_write_json(Path(out_dir) / "metrics.json", summary)
    return trainer.model, summary

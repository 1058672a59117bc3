"""QM pre-training: fit an NNIP to the energies and forces of a static dataset.

Step 1 of StABlE training. The split, per-element energy offsets and energy scale are
fixed once from the training frames; then Adam with ReduceLROnPlateau, gradient
clipping, optional EMA of the weights and early stopping on the validation loss.

Usage::

    from openmm_stable.training import PretrainConfig, pretrain
    config = PretrainConfig(architecture="schnet", preset="small", train="1k", val="100", test="200")
    model, metrics = pretrain(dataset, config, "runs/aspirin")    # resume=True after a crash
    print(metrics["force_mae_meV_per_A"])

`pretrain` is the entry point; the run is a `Pretrainer` (state, one method per phase,
checkpoints written and read in one place each), the shape `StableTrainer` has for refine.

Files in ``out_dir``: ``model.pt`` (best model, `openmm_stable.models.load_model` reads it
and both checkpoints), ``checkpoint_last.pt`` / ``checkpoint_best.pt``, ``log.csv`` (one row
per epoch), ``learning_curve.png``, ``metrics.json`` (test-split errors) and ``config.yaml``.

Choices. Loss = energy_weight * MSE(E) + force_weight * MSE(F), errors in units of
``model.energy_scale`` (see `openmm_stable.training.batching`); the default 1 : 100 is
force-heavy, like the MD17 recipes StABlE starts from, because MD only needs forces and
there are 3N force labels per energy label. ``energy_scale`` is the RMS of the training
force components (eV/A): with forces dominating the loss it puts the network's outputs
(and force errors) at order one. The offsets carry the large atomisation energy so the
network only learns the geometry-dependent remainder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import yaml
from torch import nn

from openmm_stable.errors import InputError
from openmm_stable.allocator import keep_freed_memory
from openmm_stable.data.dataset import QMDataset
from openmm_stable.data.splits import parse_size, split_indices
from openmm_stable.temperature import recorded_temperature
from openmm_stable.models import create_model, load_model, save_model
from openmm_stable.models.registry import family_names, get_family
from openmm_stable.models.base import MAX_Z, NNIP, check_cutoff_fits_box
from openmm_stable.config import config_from_dict, load_config
from openmm_stable.geometry import find_bonds
from openmm_stable.io import atomic_write_text, get_rng_state, load_torch_file, set_rng_state, write_csv
from openmm_stable.training.ema import EMA
from openmm_stable.training.batching import FrameTensors, energy_force_loss, evaluate, loss_from_metrics, refit_energy_shift

SizeLike = Union[int, float, str]

LOG_COLUMNS = [
    "epoch", "lr", "train_loss", "train_energy_mae_meV", "train_force_mae_meV_per_A",
    "val_loss", "val_energy_mae_meV", "val_force_mae_meV_per_A", "time_s",
]


AUTO = "auto"  # a split size left to `split_sizes`
DEFAULT_SPLIT = ("1k", "100", "200")
SMALL_FILE_SPLIT = ("80%", "10%", None)  # the rest (about 10 %) is the test set


def split_sizes(config: "PretrainConfig", n_frames: int, log=None) -> tuple:
    """(train, val, test) sizes. Sizes left at "auto" are 1,000 / 100 / 200 frames; when
    all three are "auto" and the file is too small for that, 80 / 10 / 10 % (with a note),
    so a small file needs no flags. Sizes the user gives are kept as they are."""
    sizes = (config.train, config.val, config.test)
    if all(v == AUTO for v in sizes) and n_frames < sum(parse_size(v) for v in DEFAULT_SPLIT):
        print(f"note: {n_frames} frames are fewer than the default split of 1,000 / 100 / 200; using "
              "80 % / 10 % / 10 % instead (--train/--val/--test choose other sizes)", file=log or sys.stderr)
        return SMALL_FILE_SPLIT
    return tuple(default if v == AUTO else v for v, default in zip(sizes, DEFAULT_SPLIT))


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; a lower learning rate or stronger clipping usually helps."""


@dataclasses.dataclass
class PretrainConfig:
    """Every pre-training setting, validated once on construction.

    Split sizes take counts (``200``, ``"1k"``) or fractions (``0.1``, ``"10%"``) of the
    dataset; ``test=None`` (or ``"rest"`` in YAML / on the command line) takes the remaining frames. ``ema_decay=None`` turns EMA off;
    when on, the averaged weights are validated, checkpointed as best and saved.
    ``time_budget_min`` counts training time over resumes and stops cleanly (validation and
    checkpoints still happen for the epoch in progress).
    """

    architecture: str = "schnet"
    preset: str = "small"
    energy_weight: float = 1.0
    force_weight: float = 100.0
    lr: float = 1e-3
    batch_size: int = 32
    max_epochs: int = 1000
    patience: int = 50  # epochs without validation improvement before stopping
    lr_factor: float = 0.5  # ReduceLROnPlateau
    lr_patience: int = 10
    min_lr: float = 1e-6
    grad_clip: Optional[float] = 10.0  # max gradient norm; None disables clipping
    ema_decay: Optional[float] = None
    seed: int = 0  # split, initial weights and shuffling
    device: str = "auto"  # "cpu", "cuda", "cuda:N" or "auto"
    train: SizeLike = AUTO  # "auto": 1k, or 80 % of a file too small for 1k/100/200
    val: SizeLike = AUTO  # "auto": 100, or 10 %
    test: Optional[SizeLike] = AUTO  # "auto": 200, or the rest
    split_mode: str = "random"  # or "contiguous"
    time_budget_min: Optional[float] = None
    cutoff: Optional[float] = None  # A; overrides the preset's (a periodic box needs it below half the box)
    # On the CPU, keep freed memory in the process (`openmm_stable.allocator`): page faults
    # otherwise take about a fifth of a training step.
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def fail(field: str, message: str):
            raise InputError(f"pretrain config: {field}: {message}")

        if self.architecture not in family_names():
            fail("architecture", f"unknown {self.architecture!r}; known: {', '.join(family_names())}")
        try:
            presets = get_family(self.architecture).presets  # imports the family's module: says what is missing
        except InputError as err:
            fail("architecture", str(err))
        if not presets:
            fail("architecture", f"{self.architecture!r} has no presets to train from: it only reads models "
                                 "trained elsewhere (`openmm-stable import`)")
        if self.preset not in presets:
            fail("preset", f"unknown {self.preset!r} for {self.architecture}; known: {', '.join(presets)}")
        for name in ("energy_weight", "force_weight"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0 or not math.isfinite(value):
                fail(name, f"must be a finite number >= 0, got {value!r}")
        if self.energy_weight == 0 and self.force_weight == 0:
            fail("energy_weight", "energy_weight and force_weight are both 0")
        for name in ("lr", "min_lr"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0 or (name == "lr" and value == 0):
                fail(name, f"must be a number {'> 0' if name == 'lr' else '>= 0'}, got {value!r}")
        for name, low in (("batch_size", 1), ("max_epochs", 1), ("patience", 1), ("lr_patience", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                fail(name, f"must be an integer >= {low}, got {value!r}")
        if not _is_real(self.lr_factor) or not 0 < self.lr_factor < 1:
            fail("lr_factor", f"must be between 0 and 1, got {self.lr_factor!r}")
        if self.grad_clip is not None and (not _is_real(self.grad_clip) or self.grad_clip <= 0):
            fail("grad_clip", f"must be > 0 or None, got {self.grad_clip!r}")
        if self.ema_decay is not None and (not _is_real(self.ema_decay) or not 0 < self.ema_decay < 1):
            fail("ema_decay", f"must be between 0 and 1 or None, got {self.ema_decay!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            fail("seed", f"must be an integer >= 0, got {self.seed!r}")
        device = str(self.device)
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            fail("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            if (value is None and name == "test") or value == AUTO:
                continue
            try:
                parse_size(value, n_total=1)  # syntax only; the dataset size is checked at split time
            except ValueError as err:
                fail(name, str(err))
        if self.cutoff is not None and (not _is_real(self.cutoff) or self.cutoff <= 0):
            fail("cutoff", f"must be > 0 or None, got {self.cutoff!r}")
        if self.split_mode not in ("random", "contiguous"):
            fail("split_mode", f"must be 'random' or 'contiguous', got {self.split_mode!r}")
        if not isinstance(self.keep_freed_memory, bool):
            fail("keep_freed_memory", f"must be true or false, got {self.keep_freed_memory!r}")
        if self.time_budget_min is not None and (not _is_real(self.time_budget_min) or self.time_budget_min <= 0):
            fail("time_budget_min", f"must be > 0 minutes or None, got {self.time_budget_min!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PretrainConfig":
        """Build from plain data (YAML, a checkpoint); unknown keys are an error, not ignored."""
        values = dict(values)
        if isinstance(values.get("test"), str) and values["test"].strip().lower() in ("rest", "remaining"):
            values["test"] = None  # all frames not in train or val
        return config_from_dict(cls, values, "pretrain config")

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike], **overrides) -> "PretrainConfig":
        """Read a YAML mapping of field names; `overrides` that are not None win over the
        file (`openmm_stable.config.load_config`; ``test="rest"`` asks for the rest)."""
        return load_config(cls, path, overrides)



def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- offsets and scale ------------------------------------------------------------------------
def fit_atom_energies(compositions: Sequence[np.ndarray], energies: np.ndarray) -> np.ndarray:
    """Per-element energies (MAX_Z,) in eV with sum over atoms ~ energy, by least squares.

    ``compositions`` holds the atomic numbers of each structure. Element counts are often
    collinear (one composition: rank 1), so we first take the mean energy per atom as a
    common baseline and fit the per-element deviations from it by minimum-norm least
    squares: exact for a linear model whenever the elements are identifiable, and the mean
    energy per atom for every element when the data hold a single composition.
    """
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)
    if len(compositions) != energies.size:
        raise InputError(f"{len(compositions)} compositions but {energies.size} energies")
    counts = np.zeros((energies.size, MAX_Z), dtype=np.float64)
    for row, z in enumerate(compositions):
        np.add.at(counts[row], np.asarray(z, dtype=np.int64), 1.0)
    present = counts.any(axis=0)
    counts = counts[:, present]
    n_atoms = counts.sum(axis=1)
    per_atom = energies.sum() / n_atoms.sum()
    deviation, *_ = np.linalg.lstsq(counts, energies - per_atom * n_atoms, rcond=None)
    out = np.zeros(MAX_Z, dtype=np.float64)
    out[present] = per_atom + deviation
    return out


def fit_energy_scale(dataset: QMDataset, atom_energies: np.ndarray) -> float:
    """RMS of the force components (eV/A); the residual-energy std if there are no forces."""
    if dataset.forces is not None:
        scale = float(np.sqrt(np.mean(dataset.forces**2)))
    else:
        residual = dataset.energies - atom_energies[dataset.atomic_numbers].sum()
        scale = float(np.std(residual))
    return scale if scale > 1e-12 and math.isfinite(scale) else 1.0


# --- the run ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _RunState:
    """What a checkpoint needs besides weights and optimizer: where the run stands."""

    epoch: int = 0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    train_time_s: float = 0.0
    history: list = dataclasses.field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; a clear error if CUDA is asked for but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(device)


def pretrain(
    dataset: Union[QMDataset, str, os.PathLike],
    config: PretrainConfig,
    out_dir: Union[str, os.PathLike],
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> tuple[NNIP, dict]:
    """Pre-train a model on `dataset` and write the run to `out_dir`; returns (best model, metrics).

    ``resume=True`` continues from ``checkpoint_last.pt`` (same data and split required;
    limits such as ``max_epochs``, ``patience`` and ``time_budget_min`` come from `config`,
    so a finished run can be extended). Without it, an existing run in `out_dir` is an error
    unless ``overwrite=True``. Ctrl-C leaves the last completed epoch's checkpoint intact.
    The run itself is a `Pretrainer`.
    """
    if not isinstance(dataset, QMDataset):
        from openmm_stable.data.formats import load_dataset

        dataset = load_dataset(dataset)
    trainer = Pretrainer(dataset, config, out_dir, resume=resume, overwrite=overwrite, progress=progress)
    trainer.fit()
    return trainer.finish()


class Pretrainer:
    """Owns the split, model, optimizer, scheduler, EMA and loop state of one pre-training
    run (the shape of `StableTrainer`). Construction checks the inputs and the output
    folder, splits the data and either starts a new model (`start`) or restores the last
    checkpoint (`load_checkpoint`); `fit` runs epochs (`run_epoch`: `train_epoch`, then
    `validate`) until a stopping rule holds; `finish` writes the best model and the test
    metrics. Checkpoints are written only by `save_checkpoint` and read only by
    `load_checkpoint`."""

    def __init__(self, dataset: QMDataset, config: PretrainConfig, out_dir: Union[str, os.PathLike],
                 resume: bool = False, overwrite: bool = False, progress: bool = True):
        config.validate()
        if dataset.energies is None or (config.force_weight > 0 and dataset.forces is None):
            raise InputError(f"{dataset.source}: pre-training needs energies and forces (forces only if force_weight > 0)")
        self.config, self.dataset, self.progress = config, dataset, progress
        self.out = Path(out_dir)
        self.last_path, self.best_path = self.out / "checkpoint_last.pt", self.out / "checkpoint_best.pt"
        if resume and not self.last_path.exists():
            raise FileNotFoundError(f"{self.last_path}: nothing to resume (no checkpoint_last.pt in {self.out})")
        if not resume and not overwrite and self.last_path.exists():
            raise InputError(
                f"{self.out} already holds a pre-training run; pass resume=True (--resume) to continue it, "
                "overwrite=True (--overwrite) to start over, or use another directory"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(str(config.device))
        if config.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        self.fingerprint = dataset.fingerprint()
        self.parts = split_indices(len(dataset), *split_sizes(config, len(dataset)), mode=config.split_mode,
                                   seed=config.seed)
        if len(self.parts[0]) == 0 or len(self.parts[1]) == 0:
            raise InputError(f"split: train ({len(self.parts[0])}) and val ({len(self.parts[1])}) need at least one "
                             "frame each")
        self.train_set, self.val_set = dataset.subset(self.parts[0]), dataset.subset(self.parts[1])
        self.test_set = dataset.subset(self.parts[2]) if len(self.parts[2]) else None
        self.split = {name: [int(i) for i in idx] for name, idx in zip(("train", "val", "test"), self.parts)}
        self.state = _RunState()
        self.stop_reason: Optional[str] = None
        if resume:
            self.load_checkpoint()
        else:
            self.start()
        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        dtype = next(iter(self.model.parameters())).dtype
        self.scale = float(self.model.energy_scale)
        self._budget_s, self._time_before, self._started, self._last_plot = math.inf, 0.0, time.perf_counter(), 0.0
        self.train_tensors = FrameTensors(self.train_set, device=self.device, dtype=dtype)
        self.val_tensors = FrameTensors(self.val_set, device=self.device, dtype=dtype)

    # --- setup and checkpoints ----------------------------------------------------------------
    def start(self) -> None:
        """A new model with energy offsets and scale fitted to the training frames."""
        config = self.config
        torch.manual_seed(config.seed)
        overrides = {} if config.cutoff is None else {"cutoff": float(config.cutoff)}
        family = get_family(config.architecture)
        if family.hparams_from_data is not None:  # e.g. MACE's element table, from the training frames
            overrides = {**family.hparams_from_data(self.train_set, family.hparams(config.preset, overrides)),
                         **overrides}
        model = create_model(config.architecture, config.preset, **overrides)
        check_cutoff_fits_box(model, self.dataset.box)
        atom_energies = fit_atom_energies([self.dataset.atomic_numbers] * len(self.train_set), self.train_set.energies)
        with torch.no_grad():
            model.atom_energies.copy_(torch.from_numpy(atom_energies))
            model.energy_scale.fill_(fit_energy_scale(self.train_set, atom_energies))
        self.model = model.to(self.device)
        for path in (self.last_path, self.best_path, self.out / "model.pt", self.out / "metrics.json"):
            path.unlink(missing_ok=True)  # stale files from an overwritten run
        self._new_optimizer()

    def _new_optimizer(self) -> None:
        config = self.config
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience, min_lr=config.min_lr
        )
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay else None

    @property
    def _record(self) -> dict:
        """What every file of the run records besides the weights."""
        return dict(config=self.config.to_dict(), dataset_fingerprint=self.fingerprint,
                    dataset_source=str(self.dataset.source), split=self.split,
                    atomic_numbers=self.dataset.atomic_numbers,
                    # the bond graph: "same molecule" checks compare it, not only the formula
                    bonds=find_bonds(self.dataset.atomic_numbers, self.dataset.positions[0], box=self.dataset.box),
                    training_temperature_K=recorded_temperature(self.dataset))

    def save_checkpoint(self, improved: bool, val_loss: float) -> None:
        """checkpoint_best.pt (the averaged weights under EMA) when the epoch improved, then
        checkpoint_last.pt with everything a resume needs."""
        epoch = self.state.epoch
        # Best before last: a crash in between leaves a 'last' whose best_val_loss matches 'best'.
        if improved:
            with self._averaged():
                save_model(self.model, self.best_path, kind="checkpoint_best", epoch=epoch, val_loss=val_loss,
                           **self._record)
        save_model(
            self.model, self.last_path, kind="checkpoint_last", epoch=epoch,
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            ema=None if self.ema is None else self.ema.state_dict(), run_state=dataclasses.asdict(self.state),
            rng=get_rng_state(), **self._record,
        )

    def load_checkpoint(self) -> None:
        """Model, optimizer, scheduler, EMA, loop state and RNG state from checkpoint_last.pt."""
        payload = load_torch_file(self.last_path)
        _check_resumable(payload, self.last_path, self.fingerprint, self.split, self.config)
        self.model = load_model(self.last_path).to(self.device)
        self.state = _RunState(**payload["run_state"])
        self._new_optimizer()
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.ema is not None and payload.get("ema") is not None:
            self.ema.load_state_dict(payload["ema"])
        set_rng_state(payload["rng"])

    def _averaged(self):
        """Context in which the model holds the EMA weights (a no-op without EMA)."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()

    # --- the loop -----------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self._time_before + time.perf_counter() - self._started

    def _stop(self) -> Optional[str]:
        """The stopping rule that holds, if any (checked before every epoch)."""
        config, state = self.config, self.state
        if state.epoch >= config.max_epochs:
            return "max_epochs"
        if state.bad_epochs >= config.patience:
            return "early_stopping"
        if self._elapsed() >= self._budget_s and state.epoch > 0:  # always at least one (partial) epoch
            return "time_budget"
        return None

    def fit(self) -> str:
        """Run epochs until a stopping rule holds; returns its name (also `stop_reason`)."""
        from tqdm.auto import tqdm

        config = self.config
        self._budget_s = math.inf if config.time_budget_min is None else 60.0 * config.time_budget_min
        self._time_before, self._started = self.state.train_time_s, time.perf_counter()
        bar = tqdm(total=config.max_epochs, initial=min(self.state.epoch, config.max_epochs), desc="pretrain",
                   unit="epoch", disable=not self.progress, dynamic_ncols=True)
        self._last_plot = time.perf_counter()
        try:
            while (reason := self._stop()) is None:
                row = self.run_epoch()
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_loss']:.3g}", val_E=f"{row['val_energy_mae_meV']:.1f}meV",
                                val_F=f"{row['val_force_mae_meV_per_A'] or float('nan'):.1f}meV/A",
                                lr=f"{row['lr']:.1e}")
        except KeyboardInterrupt:
            bar.close()
            print(f"\npretrain interrupted after epoch {self.state.epoch}; continue with resume=True (--resume)",
                  file=sys.stderr)
            raise
        bar.close()
        self.stop_reason = reason
        return reason

    def run_epoch(self) -> dict:
        """One epoch: train, validate, step the scheduler, checkpoint, log; returns its log row."""
        config, state = self.config, self.state
        epoch = state.epoch + 1
        train = self.train_epoch(epoch)
        val_loss, val = self.validate()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(val_loss)
        state.epoch = epoch
        improved = val_loss < state.best_val_loss
        if improved:
            state.best_val_loss, state.best_epoch, state.bad_epochs = val_loss, epoch, 0
        else:
            state.bad_epochs += 1
        state.train_time_s = self._elapsed()
        state.history.append({
            "epoch": epoch, "lr": lr,
            "train_loss": train["loss"],
            "train_energy_mae_meV": train["energy_mae_meV"],
            "train_force_mae_meV_per_A": train["force_mae_meV_per_A"] if config.force_weight > 0 else None,
            "val_loss": val_loss,
            "val_energy_mae_meV": val["energy_mae_meV"],
            "val_force_mae_meV_per_A": val["force_mae_meV_per_A"],
            "time_s": state.train_time_s,
        })
        self.save_checkpoint(improved, val_loss)
        write_csv(self.out / "log.csv", state.history, LOG_COLUMNS)
        if time.perf_counter() - self._last_plot > 30.0:
            _plot_learning_curve(state.history, self.out / "learning_curve.png")
            self._last_plot = time.perf_counter()
        return state.history[-1]

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training frames (stops early at the time budget); the mean loss
        and MAEs over the structures seen."""
        config, model = self.config, self.model
        model.train()
        totals = {"loss": 0.0, "energy_mae_meV": 0.0, "force_mae_meV_per_A": 0.0}
        n_seen = 0
        rng = np.random.default_rng([config.seed, epoch])  # per-epoch order: identical after a resume
        for batch in self.train_tensors.batches(config.batch_size, shuffle=True, rng=rng):
            self.optimizer.zero_grad(set_to_none=True)
            loss, batch_metrics = energy_force_loss(model, batch, config.energy_weight, config.force_weight)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"non-finite loss at epoch {epoch}; lower lr (now {self.optimizer.param_groups[0]['lr']:g}) "
                    "or grad_clip"
                )
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(model)
            b = batch.n_structures
            n_seen += b
            for key in totals:
                totals[key] += b * batch_metrics.get(key, 0.0)
            if self._elapsed() >= self._budget_s:
                break
        return {key: value / n_seen for key, value in totals.items()}

    def validate(self) -> tuple[float, dict]:
        """Refit the energy shift, then the validation loss and metrics (EMA weights if on)."""
        config = self.config
        refit_energy_shift(self.model, self.train_tensors)
        with self._averaged():
            val = evaluate(self.model, self.val_tensors, batch_size=max(64, config.batch_size))
        return loss_from_metrics(val, self.scale, config.energy_weight, config.force_weight), val

    # --- the result ---------------------------------------------------------------------------
    def finish(self) -> tuple[NNIP, dict]:
        """Load the best validation epoch (EMA weights if EMA is on), evaluate it on the test
        split and write model.pt, metrics.json, log.csv and learning_curve.png."""
        config, state, model = self.config, self.state, self.model
        if self.best_path.exists():
            model.load_state_dict(load_torch_file(self.best_path, map_location=self.device)["state_dict"])
        model.eval()
        batch_size = max(64, config.batch_size)
        val_metrics = evaluate(model, self.val_tensors, batch_size=batch_size)
        test = evaluate(model, self.test_set, batch_size=batch_size) if self.test_set is not None else None
        metrics = {
            "architecture": config.architecture,
            "preset": config.preset,
            "n_train": len(self.parts[0]), "n_val": len(self.parts[1]), "n_test": len(self.parts[2]),
            "energy_mae_meV": test and test["energy_mae_meV"],
            "energy_rmse_meV": test and test["energy_rmse_meV"],
            "force_mae_meV_per_A": test and test["force_mae_meV_per_A"],
            "force_rmse_meV_per_A": test and test["force_rmse_meV_per_A"],
            "val": val_metrics,
            "train_time_s": state.train_time_s,
            "epochs": state.epoch,
            "best_epoch": state.best_epoch,
            "best_val_loss": state.best_val_loss,
            "stopped_reason": self.stop_reason,
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "energy_scale": self.scale,
            "device": str(self.device),
            "dataset_fingerprint": self.fingerprint,
            "dataset_source": str(self.dataset.source),
        }
        save_model(model, self.out / "model.pt", kind="model", epoch=state.best_epoch, metrics=metrics, **self._record)
        atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        write_csv(self.out / "log.csv", state.history, LOG_COLUMNS)
        _plot_learning_curve(state.history, self.out / "learning_curve.png")
        return model, metrics


def _check_resumable(payload: dict, path: Path, fingerprint: str, split: dict, config: PretrainConfig) -> None:
    """Refuse to resume onto different data, a different split or a different model."""
    if payload.get("kind") != "checkpoint_last" or "run_state" not in payload:
        raise InputError(f"{path}: not a pre-training checkpoint")
    if payload.get("dataset_fingerprint") != fingerprint:
        raise InputError(
            f"{path}: dataset fingerprint {payload.get('dataset_fingerprint')} differs from this dataset's "
            f"{fingerprint}; resume only with the data the run started on"
        )
    spec = payload["spec"]
    if (spec.get("architecture"), spec.get("preset")) != (config.architecture, config.preset):
        raise InputError(
            f"{path}: the run trains {spec.get('architecture')}/{spec.get('preset')}, "
            f"the config asks for {config.architecture}/{config.preset}"
        )
    if payload.get("split") != split:
        raise InputError(f"{path}: the split (sizes, mode or seed) differs from the run being resumed")


def _plot_learning_curve(history: list, path: Path) -> None:
    """Losses and validation MAEs per epoch (Agg canvas: no display, no global backend change)."""
    if not history:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_mae = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_loss.legend()
    ax_mae.plot(epochs, [row["val_energy_mae_meV"] for row in history], label="energy MAE (meV)")
    if history[-1].get("val_force_mae_meV_per_A") is not None:
        ax_mae.plot(epochs, [row["val_force_mae_meV_per_A"] for row in history], label="force MAE (meV/A)")
    ax_mae.set(xlabel="epoch", yscale="log", title="validation")
    ax_mae.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


__all__ = ["EMA", "PretrainConfig", "Pretrainer", "TrainingDivergedError", "fit_atom_energies", "fit_energy_scale", "pretrain",
           "resolve_device"]

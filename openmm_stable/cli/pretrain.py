"""`openmm-stable pretrain`: fit a model to a QM dataset's energies and forces.

    openmm-stable pretrain aspirin_xtb.npz --out runs/aspirin --architecture schnet --preset small \
        --train 1k --val 100 --test 200 --time-budget 30
    openmm-stable pretrain aspirin_xtb.npz --out runs/aspirin --resume      # after an interruption

``--config FILE`` reads a YAML mapping of `PretrainConfig` fields; flags given on the command
line override it.
"""
from __future__ import annotations

import sys

from openmm_stable.training.pretrain import PretrainConfig, TrainingDivergedError, pretrain

# Command-line flag (argparse dest) -> PretrainConfig field.
_FLAG_FIELDS = {
    "architecture": "architecture",
    "preset": "preset",
    "epochs": "max_epochs",
    "train": "train",
    "val": "val",
    "test": "test",
    "split": "split_mode",
    "time_budget": "time_budget_min",
    "cutoff": "cutoff",
    "device": "device",
    "seed": "seed",
    "batch_size": "batch_size",
    "lr": "lr",
    "energy_weight": "energy_weight",
    "force_weight": "force_weight",
    "patience": "patience",
    "ema": "ema_decay",
}


def register(subparsers) -> None:
    from openmm_stable.models.registry import family_names

    d = PretrainConfig()
    p = subparsers.add_parser(
        "pretrain",
        help="train a model on QM energies and forces (step 1 of StABlE)",
        description="Pre-train an NNIP on a QM dataset. Writes model.pt (best validation epoch), checkpoints, "
        "log.csv, learning_curve.png and metrics.json (test-split errors) to --out.",
    )
    p.add_argument("data", metavar="DATA", help="dataset file (any format `openmm-stable data info` reads)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", default=None, help="YAML file of PretrainConfig fields (flags override it)")
    # Names from the architecture registry (entry points; nothing is imported to list them).
    # Presets belong to each family, so they are checked when the config is (a clear error).
    p.add_argument("--architecture", choices=family_names(), default=None, help=f"default {d.architecture}")
    p.add_argument("--preset", default=None,
                   help=f"model size: tiny, small, medium or large for every family (default {d.preset})")
    p.add_argument("--epochs", type=int, default=None, help=f"maximum epochs (default {d.max_epochs}; early stopping usually ends sooner)")
    p.add_argument("--train", default=None, help="training frames: 1k, 200, 0.8 or 80%% (default 1k; 80%% of a file under 1,300 frames)")
    p.add_argument("--val", default=None, help="validation frames (default 100; 10%% of a small file)")
    p.add_argument("--test", default=None, help="test frames, or 'rest' for all remaining (default 200; the rest of a small file)")
    p.add_argument("--split", choices=["random", "contiguous"], default=None, help=f"split mode (default {d.split_mode})")
    p.add_argument("--time-budget", type=float, default=None, metavar="MIN", help="stop cleanly after this many minutes of training")
    p.add_argument("--cutoff", type=float, default=None, help="A, overrides the preset's (5 A; below half the box when periodic)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default auto)")
    p.add_argument("--seed", type=int, default=None, help=f"split, initialisation and shuffling seed (default {d.seed})")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=None, help=f"initial learning rate (default {d.lr:g})")
    p.add_argument("--energy-weight", type=float, default=None, help=f"default {d.energy_weight:g}")
    p.add_argument("--force-weight", type=float, default=None, help=f"default {d.force_weight:g}")
    p.add_argument("--patience", type=int, default=None, help=f"early-stopping patience in epochs (default {d.patience})")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights with this decay (e.g. 0.99)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoint_last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out already holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args) -> PretrainConfig:
    """YAML file (if any), then the flags that were given."""
    from openmm_stable.config import load_config

    return load_config(PretrainConfig, args.config or None, {field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items()})


def run(args) -> int:
    from openmm_stable.data import load_dataset

    config = config_from_args(args)
    dataset = load_dataset(args.data)
    try:
        model, metrics = pretrain(dataset, config, args.out, progress=not args.no_progress,
                                  resume=args.resume, overwrite=args.overwrite)
    except TrainingDivergedError as err:
        print(f"openmm-stable pretrain: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    _print_summary(metrics, args.out)
    return 0


def _fmt(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _print_summary(m: dict, out: str) -> None:
    print(f"{m['architecture']}/{m['preset']} ({m['n_parameters']:,} parameters) on {m['device']}: "
          f"{m['epochs']} epochs in {m['train_time_s']:.0f} s, stopped by {m['stopped_reason']}, best epoch {m['best_epoch']}")
    print(f"frames: train {m['n_train']}, val {m['n_val']}, test {m['n_test']}")
    print(f"test: energy MAE {_fmt(m['energy_mae_meV'])} meV, force MAE {_fmt(m['force_mae_meV_per_A'])} meV/A, "
          f"force RMSE {_fmt(m['force_rmse_meV_per_A'])} meV/A")
    print(f"wrote {out}/model.pt, metrics.json, log.csv, learning_curve.png")

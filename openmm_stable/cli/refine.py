"""`openmm-stable refine MODEL --data DATA --out DIR`: StABlE refinement of a pre-trained model.

    openmm-stable refine pretrain/model.pt --data aspirin_xtb.npz --config refine.yaml --out refined/
    openmm-stable refine pretrain/model.pt --data aspirin_xtb.npz --out refined/ --resume   # after a kill
    openmm-stable refine pre_w/model.pt --data water.npz --target exp_goo.csv --out refined_w/   # target from a g(r) table

Settings come from `StableConfig` defaults, then the YAML file, then command-line flags.
"""
from __future__ import annotations

from openmm_stable.cli.common import add_engine_arguments, check_model_matches, engine_overrides
from openmm_stable.stability import STABILITY_KINDS
from openmm_stable.training.stable_config import LEARNING_MODES


def register(subparsers) -> None:
    p = subparsers.add_parser("refine", help="StABlE-refine a pre-trained model (Boltzmann estimator)")
    p.add_argument("model", help="model file written by pretrain (or refine)")
    p.add_argument("--data", required=True, help="QM dataset: energy/force regulariser, starting frames, bonds")
    p.add_argument("--reference", default=None, help="dataset for the reference observable (default: --data)")
    p.add_argument("--config", default=None, help="YAML file of StableConfig fields (see README)")
    p.add_argument("--out", required=True, help="output folder (model.pt, log.csv, checkpoint.pt, plots)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (same data and settings; "
                                                         "only --epochs may grow)")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT folder that holds an earlier run")
    p.add_argument("--learning", choices=LEARNING_MODES, default=None,
                   help="windows (re-run the windows where replicas failed; default), paper (the same loop with the "
                        "paper code's settings), failure_bank (for starts that fail rarely)")
    p.add_argument("--epochs", type=int, default=None, help="max_epochs")
    p.add_argument("--replicas", type=int, default=None, help="n_replicas")
    p.add_argument("--epoch-ps", type=float, default=None, help="simulated ps per replica per epoch")
    p.add_argument("--equilibration-ps", type=float, default=None,
                   help="learning epochs: ps at the start of a fresh window whose frames are not samples")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stability", choices=STABILITY_KINDS, default=None,
                   help="training stability criterion: bonds, min_distance, or auto (min_distance for periodic data)")
    p.add_argument("--min-distance-threshold", type=float, default=None, help="A, for --stability min_distance")
    p.add_argument("--target", default=None, metavar="FILE",
                   help="observable_target: a table of the target curve (e.g. r_A,g,sigma; for the rdf or hr "
                        "observable) instead of the reference frames' average; format in openmm_stable/targets.py")
    p.add_argument("--no-progress", action="store_true")
    add_engine_arguments(p, defaults_from_config=True)
    p.set_defaults(func=run)


def config_from_args(args):
    """`StableConfig` defaults, then the YAML file (if any), then the flags that were given."""
    import dataclasses

    from openmm_stable.config import config_from_yaml
    from openmm_stable.training.stable import StableConfig

    overrides = {"learning": args.learning, "max_epochs": args.epochs, "n_replicas": args.replicas, "epoch_ps": args.epoch_ps,
                 "equilibration_ps": args.equilibration_ps,
                 "lr": args.lr, "seed": args.seed, "stability": args.stability,
                 "min_distance_threshold": args.min_distance_threshold,
                 "reference_temperature_K": args.reference_temperature, "observable_target": args.target}
    config = (config_from_yaml(StableConfig, args.config, overrides) if args.config
              else StableConfig.from_dict({k: v for k, v in overrides.items() if v is not None}))
    given = {k: v for k, v in engine_overrides(args).items() if v is not None}
    if given:  # flags over the YAML file; an unset temperature means the dataset's (library rule)
        config.engine = dataclasses.replace(config.engine, **given)
    return config


def run(args) -> int:
    from openmm_stable.data import load_dataset
    from openmm_stable.training.stable import refine

    config = config_from_args(args)
    dataset = load_dataset(args.data)
    reference = load_dataset(args.reference) if args.reference else None
    check_model_matches(args.model, dataset, reference)
    _, summary = refine(args.model, dataset, config, args.out, reference=reference, resume=args.resume,
                        progress=not args.no_progress, overwrite=args.overwrite)
    print(summary["qm_frames"]["note"])
    print(f"refined model: {args.out}/model.pt  ({summary['epochs']} epochs, {summary['cycles']} cycles)")
    if summary["first_observable_loss"] is not None:
        print(f"observable loss: {summary['first_observable_loss']:.4g} -> {summary['last_observable_loss']:.4g}")
    print(f"validation force MAE: {summary['val_force_mae_meV_per_A']:.1f} meV/A")
    return 0

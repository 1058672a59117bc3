"""`openmm-stable simulate MODEL --data DATA`: replica stability run with metrics and plots.

    openmm-stable simulate model.pt --data aspirin_xtb.npz --replicas 16 --time 10 --out sim/
    openmm-stable simulate model.pt --data water.npz --reference water_traj.npz --out sim/   # at water.npz's 300 K
    openmm-stable simulate model.pt --data aspirin_xtb.npz --config simulate.yaml --replicas 32 --out sim/
    openmm-stable simulate model.pt --data aspirin_xtb.npz --replicas 16 --time 10 --out sim/ --resume  # after a kill
    openmm-stable simulate model.pt --data ethanol.npz --replicas 64 --time 16 --renewal --reference-b b.npz --out sim/
    openmm-stable simulate model.pt --data water.npz --rdf-target O-O=exp_goo.csv --diffusivity-target 2.3e-5+-0.1e-5cm^2/s --out sim/

``--config FILE`` reads a YAML mapping of `SimulationConfig` fields (``engine:`` a mapping
of `EngineConfig` fields); flags given on the command line override it, as for pretrain
and refine (`openmm_stable.config.load_config`). Frames stream to ``--out`` as they are
produced and progress.json holds the stable times so far: ``--resume`` continues a killed
run, and a folder that already holds a run is refused unless ``--resume`` or ``--overwrite``.
``--renewal`` restarts a failed replica from a fresh frame and counts every failure in
R x time replica-ps (the design that resolves rare failures); ``--reference-b`` is a second
independent reference chain, whose h(r) difference from the reference is the noise band.
"""
from __future__ import annotations

from openmm_stable.cli.common import add_engine_arguments, check_model_matches, engine_overrides
from openmm_stable.stability import STABILITY_KINDS, WATER_MIN_DISTANCE_THRESHOLD


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="run R replicas of a model: stable times, h(r), throughput")
    p.add_argument("model", help="model file written by pretrain/refine")
    p.add_argument("--data", required=True, help="dataset: starting frames, bonds and reference h(r)")
    p.add_argument("--reference", default=None, help="reference dataset for h(r) (default: --data)")
    p.add_argument("--reference-b", default=None,
                   help="a second independent reference chain (same molecule and temperature): the h(r) noise band "
                        "(default: a split-half estimate from the reference, a lower bound)")
    p.add_argument("--test-data", default=None, help="labelled dataset: also report energy/force MAE on it")
    p.add_argument("--config", default=None, help="YAML file of SimulationConfig fields (flags override it)")
    p.add_argument("--replicas", type=int, default=None)
    p.add_argument("--time", type=float, default=None, help="ps per replica (default 10)")
    p.add_argument("--check-interval", type=float, default=None, help="ps between stability checks (default 0.1)")
    p.add_argument("--stability", choices=STABILITY_KINDS, default=None,
                   help="stability criterion: bond-length deviation, minimum intermolecular distance, minimum "
                        "non-bonded distance (also inside molecules), or auto (min_distance for periodic data, "
                        "bonds otherwise; default)")
    p.add_argument("--bond-threshold", type=float, default=None, help="A (default 0.5)")
    p.add_argument("--min-distance-threshold", type=float, default=None,
                   help=f"A (default {WATER_MIN_DISTANCE_THRESHOLD})")
    p.add_argument("--vacf-interval", type=float, default=None,
                   help="ps between saved velocities for the VACF (default 0.0025; 0: no VACF)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--renewal", action="store_true",
                   help="a failed replica restarts from a fresh dataset frame and runs on: failures per replica-ps "
                        "over every segment (Kaplan-Meier on the first segments)")
    p.add_argument("--trajectories", action="store_true", help="write one DCD per replica")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out that was killed (same model, data and settings), from its last "
                        "saved chunk")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out already holds")
    p.add_argument("--rdf-target", action="append", default=None, metavar="PAIR=FILE",
                   help="also compare the RDF of element pair PAIR with the table in FILE (e.g. O-O=exp_goo.csv; "
                        "columns r_A or r_nm, g, optional sigma: openmm_stable/targets.py); repeatable")
    p.add_argument("--diffusivity-target", default=None, metavar="VALUE[+-SIGMA]UNIT",
                   help="also compare the diffusivity with a target, e.g. 2.3e-5+-0.1e-5cm^2/s (units A^2/ps, "
                        "cm^2/s, m^2/s), or a YAML file {value, sigma, unit}")
    p.add_argument("--no-progress", action="store_true")
    add_engine_arguments(p, defaults_from_config=True)
    p.set_defaults(func=run)


# Command-line flag (argparse dest) -> SimulationConfig field.
_FLAG_FIELDS = {
    "replicas": "n_replicas",
    "time": "time_ps",
    "check_interval": "check_interval_ps",
    "stability": "stability",
    "bond_threshold": "bond_threshold",
    "min_distance_threshold": "min_distance_threshold",
    "vacf_interval": "vacf_interval_ps",
    "seed": "seed",
    "reference_temperature": "reference_temperature_K",
}


def config_from_args(args):
    """`SimulationConfig` defaults, then the YAML file (if any), then the flags that were given."""
    from openmm_stable.config import load_config
    from openmm_stable.simulate import SimulationConfig

    overrides = {field: getattr(args, flag) for flag, field in _FLAG_FIELDS.items()}
    overrides["write_trajectories"] = True if args.trajectories else None
    overrides["renewal"] = True if args.renewal else None
    overrides["engine"] = engine_overrides(args)
    return load_config(SimulationConfig, args.config or None, overrides)


def targets_from_args(args) -> tuple[dict, object]:
    """({pair: table path} from the --rdf-target PAIR=FILE flags, the --diffusivity-target)."""
    from openmm_stable.errors import InputError
    from openmm_stable.targets import scalar_target

    tables = {}
    for item in args.rdf_target or []:
        pair, sep, path = item.partition("=")
        if not sep or not pair.strip() or not path.strip():
            raise InputError(f"--rdf-target {item!r}: expected PAIR=FILE, e.g. O-O=exp_goo.csv")
        if pair.strip() in tables:
            raise InputError(f"--rdf-target: pair {pair.strip()} given twice")
        tables[pair.strip()] = path.strip()
    diffusivity = scalar_target(args.diffusivity_target) if args.diffusivity_target else None
    return tables, diffusivity


def run(args) -> int:
    from openmm_stable.data import load_dataset
    from openmm_stable.models import load_model
    from openmm_stable.simulate import simulate, summary

    config = config_from_args(args)  # bad settings fail before anything is loaded
    rdf_targets, diffusivity_target = targets_from_args(args)
    model = load_model(args.model)
    dataset = load_dataset(args.data)
    reference = load_dataset(args.reference) if args.reference else dataset
    check_model_matches(args.model, dataset, reference)
    reference_b = load_dataset(args.reference_b) if args.reference_b else None
    test_set = load_dataset(args.test_data) if args.test_data else None
    metrics = simulate(model, dataset, config, args.out, reference=reference, test_set=test_set,
                       progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite,
                       reference_b=reference_b, rdf_targets=rdf_targets, diffusivity_target=diffusivity_target)
    print(summary(metrics))
    print(f"wrote {args.out}/metrics.json and plots")
    return 0

"""Options and helpers that several commands share, in one place of the CLI layer."""
from __future__ import annotations

from openmm_stable.engine import INTEGRATORS, LAYOUTS, EngineConfig
from openmm_stable.temperature import FALLBACK_TEMPERATURE_K


def add_engine_arguments(parser, defaults_from_config: bool = False) -> None:
    """Engine options of `simulate` and `refine` (where unset flags leave the config
    file's values alone, so their default is None)."""
    d = EngineConfig()

    def default(value):
        return None if defaults_from_config else value

    parser.add_argument("--temperature", type=float, default=None,
                        help="K (default: the temperature the --data frames were sampled at, as recorded in the file; "
                             f"{FALLBACK_TEMPERATURE_K:g} K when it records none)")
    parser.add_argument("--reference-temperature", type=float, default=None, metavar="K",
                        help="K at which the reference frames were sampled, for files that record none (MD17: 500); "
                             "default: as recorded, else the run temperature (no reweighting)")
    parser.add_argument("--timestep", type=float, default=default(d.timestep_fs), help=f"fs (default {d.timestep_fs})")
    parser.add_argument("--integrator", choices=INTEGRATORS, default=default(d.integrator))
    parser.add_argument("--friction", type=float, default=default(d.friction_per_ps),
                        help=f"Langevin friction, 1/ps (default {d.friction_per_ps})")
    parser.add_argument("--platform", default=None, help="OpenMM platform (default: CUDA if present, else CPU)")
    parser.add_argument("--layout", choices=LAYOUTS, default=default(d.layout),
                        help="all replicas in one Context (batched) or one Context each")
    parser.add_argument("--workers", type=int, default=default(d.workers),
                        help="split the replicas over N Ray worker processes (one GPU each on GPU machines, a "
                             "share of the cores otherwise); N > 1 starts a local Ray cluster unless --ray-address "
                             f"is given (default {d.workers}: this process; needs the 'distributed' extra)")
    parser.add_argument("--ray-address", default=None, metavar="ADDRESS",
                        help="join the Ray cluster at ADDRESS (HEAD:6379, after `ray start --head` on the head node "
                             "and `ray start --address=HEAD:6379` on the others) and run the workers there")


def engine_overrides(args) -> dict:
    """The engine settings given on the command line (None: not given)."""
    return {"temperature_K": args.temperature, "timestep_fs": args.timestep, "integrator": args.integrator,
            "friction_per_ps": args.friction, "platform": args.platform, "layout": args.layout,
            "workers": args.workers, "ray_address": args.ray_address}


def check_model_matches(model_path, dataset, reference=None) -> None:
    """Stop before any simulation when the model file records another molecule than the data."""
    from openmm_stable.export import record_bonds
    from openmm_stable.models import read_model_record
    from openmm_stable.simulate import check_molecules

    record = read_model_record(model_path)
    check_molecules(dataset, reference, record.atomic_numbers, record_bonds(record))

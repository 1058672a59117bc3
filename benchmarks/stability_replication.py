"""Benchmark 3: the paper's headline on offline xTB data (StABlE vs more QM data).

One long time-ordered GFN2-xTB trajectory at 500 K gives a small and a 50x larger training
set (drawn from its first block) and a common test set (its last block). Three models of
one architecture are compared: pre-trained on the small set, pre-trained on the large
set, and StABlE-refined from the small model (h(r) of the whole reference trajectory as
the observable, energy/force regulariser on the small set only). With --control a fourth
model separates the method from plain extra training: the small model refined with the
observable's weight at 0 for exactly as many optimizer steps as StABlE took. Each is
simulated with Langevin at 500 K (0.5 fs) from the same test-set frames and seeds for a
fixed horizon; reported: median stable time with a bootstrap interval and stable fraction
(bond-length deviation 0.5 A), log-rank tests between the arms, h(r) MAE, test force MAE,
and the compute spent.

Every stage writes to --workdir and is skipped when its output exists (pretrain and
refine resume from their checkpoints), so a long run can span sessions:

    python benchmarks/stability_replication.py --workdir runs/stability            # full
    python benchmarks/stability_replication.py --workdir runs/stability_q --quick  # minutes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stages import StageTimings, stage  # noqa: E402
import _survival  # noqa: E402


STAGES = ("generate", "pretrain", "refine")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/stability", help="data, models and runs (not committed)")
    p.add_argument("--results", default=None, help="JSON + Markdown results (default benchmarks/results/stability_<mol>_<arch>, next to this script)")
    p.add_argument("--molecule", default="aspirin")
    p.add_argument("--architecture", default="schnet")
    p.add_argument("--preset", default="small")
    p.add_argument("--frames", type=int, default=11000, help="length of the reference trajectory (frames)")
    p.add_argument("--stride", type=int, default=10, help="xTB MD steps between frames")
    p.add_argument("--small", type=int, default=200, help="frames in the small training set")
    p.add_argument("--large", type=int, default=10000, help="frames in the large training set (50x small)")
    p.add_argument("--test", type=int, default=500, help="frames in the common test set (end of trajectory)")
    p.add_argument("--pretrain-min", type=float, nargs="+", default=None, metavar="MIN",
                   help="training-time budget in minutes, counted over resumes: one for both pre-trainings, "
                        "or two (small set, large set); raise it and re-run to extend finished pre-trainings "
                        "(default 12; 0.2 with --quick; none with --pretrain-epochs)")
    p.add_argument("--pretrain-epochs", type=int, nargs="+", default=None, metavar="N",
                   help="epoch budget: one for both pre-trainings, or two (small set, large set); unlike a time "
                        "budget it gives the same run on any machine; raise it and re-run to extend finished "
                        "pre-trainings")
    p.add_argument("--refine-config", default=None, help="YAML of StableConfig fields (default: built in below)")
    p.add_argument("--refine-epochs", type=int, default=30)
    p.add_argument("--replicas", type=int, default=16)
    p.add_argument("--horizon-ps", type=float, default=10.0)
    p.add_argument("--control", action="store_true",
                   help="add the energy/force-only control arm (observable weight 0, StABlE's step count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); set it when two runs share a machine")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every stage")
    p.add_argument("--stop-after", choices=STAGES, default=None,
                   help="stop once this stage is done (run the rest later with the same --workdir)")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.stride, args.small, args.large, args.test = 160, 5, 40, 100, 30
        args.refine_epochs, args.replicas, args.horizon_ps = 3, 4, 0.2
        if args.pretrain_epochs is None:
            args.pretrain_min = args.pretrain_min or [0.2]
        args.preset = "tiny"
    if args.pretrain_epochs is None:
        args.pretrain_min = args.pretrain_min or [12.0]
    for name in ("pretrain_min", "pretrain_epochs"):
        values = getattr(args, name)
        if values is not None and len(values) > 2:
            p.error(f"--{name.replace('_', '-')} takes one or two budgets (small, large), got {len(values)}")
        # {"small": budget, "large": budget}; None: no budget of this kind
        setattr(args, name, dict(zip(("small", "large"), (values or [None]) * (3 - len(values or [None])))))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from openmm_stable.data import load_dataset, save_dataset
    from openmm_stable.data.generate import generate_xtb_dataset
    from openmm_stable.io import atomic_write_json, atomic_write_text
    from openmm_stable.models import load_model
    from openmm_stable.report import compare_runs, load_metrics
    from openmm_stable.simulate import SimulationConfig, simulate
    from openmm_stable.training.pretrain import PretrainConfig
    from openmm_stable.training.stable import StableConfig, refine
    from openmm_stable.config import config_from_yaml

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # Default next to this script, whatever the working directory.
    results_base = Path(args.results or Path(__file__).resolve().parent / "results"
                        / (f"stability_{args.molecule}_{args.architecture}" + ("_quick" if args.quick else "")))
    results_base.parent.mkdir(parents=True, exist_ok=True)
    timed = StageTimings(work)
    timings = timed.seconds

    stage(f"reference trajectory: {args.frames} xTB frames of {args.molecule} at 500 K")
    traj_path = work / "reference_trajectory.npz"

    def make_traj():
        if traj_path.exists():
            return load_dataset(traj_path)
        return generate_xtb_dataset(args.molecule, traj_path, n_frames=args.frames, temperature=500.0,
                                    timestep_fs=0.5, stride=args.stride, seed=args.seed + 7,
                                    resume=Path(str(traj_path) + ".partial.extxyz").exists(), progress=False)
    traj = timed("generate_s", make_traj)
    if args.stop_after == "generate":
        return {"stopped_after": "generate", "timings_s": timings}
    n = len(traj)
    if n < args.large + args.test:
        raise SystemExit(f"trajectory has {n} frames; need large + test = {args.large + args.test}")
    rng = np.random.default_rng(args.seed)
    large_idx = np.arange(args.large)
    small_idx = np.sort(rng.choice(large_idx, size=args.small, replace=False))
    test_idx = np.arange(n - args.test, n)
    sets = {"small": traj.subset(small_idx), "large": traj.subset(large_idx), "test": traj.subset(test_idx)}
    for name, ds in sets.items():
        path = work / f"{name}.npz"
        if not path.exists():
            save_dataset(ds, path)

    models = {}
    for name in ("small", "large"):
        budget, epochs = args.pretrain_min[name], args.pretrain_epochs[name]
        shown = ", ".join(b for b in (budget and f"{budget} min", epochs and f"{epochs} epochs") if b)
        stage(f"pre-train {args.architecture}-{args.preset} on {len(sets[name])} frames ({shown} budget)")
        out = work / f"pretrain_{name}"
        limits = {"time_budget_min": budget} if epochs is None else {"time_budget_min": budget, "max_epochs": epochs}
        config = PretrainConfig(architecture=args.architecture, preset=args.preset, train=0.9, val=0.1, test=0,
                                seed=args.seed, patience=50, **limits)
        models[f"pretrained-{name}"] = timed(f"pretrain_{name}_s",
                                             lambda ds=sets[name], c=config, o=out: run_pretrain(ds, c, o))
    if args.stop_after == "pretrain":
        return {"stopped_after": "pretrain", "timings_s": timings}

    stage("StABlE refinement of the small model")
    refine_out = work / "refine_small"
    if args.refine_config:
        rconfig = config_from_yaml(StableConfig, args.refine_config, {"max_epochs": args.refine_epochs})
    else:
        rconfig = StableConfig(n_replicas=8 if not args.quick else 4, epoch_ps=1.0 if not args.quick else 0.1,
                               frame_interval_ps=0.025 if not args.quick else 0.01,
                               equilibration_ps=0.1 if not args.quick else 0.02,
                               max_epochs=args.refine_epochs, learning_epochs=5, unstable_fraction=0.5,
                               lr=3e-4, seed=args.seed)

    def run_refine():
        if (refine_out / "model.pt").exists() and (refine_out / "metrics.json").exists():
            return load_model(refine_out / "model.pt")
        return refine(models["pretrained-small"], sets["small"], rconfig, refine_out, reference=traj,
                      resume=(refine_out / "checkpoint.pt").exists(), progress=False)[0]
    models["stable-small"] = timed("refine_s", run_refine)
    refine_metrics = json.loads((refine_out / "metrics.json").read_text())
    control_out = work / "refine_small_energy_force_only"
    if args.control:
        import dataclasses

        stage(f"energy/force-only control: {refine_metrics['learning_steps']} optimizer steps, as StABlE took")
        control_config = dataclasses.replace(rconfig, observable_weight=0.0,
                                             max_learning_steps=max(1, refine_metrics["learning_steps"]),
                                             max_epochs=10 * rconfig.max_epochs)

        def run_control():
            if refine_metrics["learning_steps"] == 0:
                return models["pretrained-small"]  # StABlE took no step: nor does its control
            if (control_out / "model.pt").exists() and (control_out / "metrics.json").exists():
                return load_model(control_out / "model.pt")
            return refine(models["pretrained-small"], sets["small"], control_config, control_out, reference=traj,
                          resume=(control_out / "checkpoint.pt").exists(), progress=False)[0]
        models["energy-force-only-small"] = timed("refine_control_s", run_control)
    if args.stop_after == "refine":
        return {"stopped_after": "refine", "timings_s": timings}

    runs = {}
    for label, model in models.items():
        stage(f"simulate {label}: {args.replicas} replicas x {args.horizon_ps} ps")
        if label != "pretrained-small" and same_parameters(model, models["pretrained-small"]):
            # Refinement took no learning step: the same model, seed and start frames give the same run.
            print("refinement left the small model unchanged; its simulation is the small model's")
            runs[label] = runs["pretrained-small"]
            continue
        out = work / f"simulate_{label}"

        def run_sim(out=out, model=model):
            if not (out / "metrics.json").exists():
                config = SimulationConfig(n_replicas=args.replicas, time_ps=args.horizon_ps, seed=args.seed)
                simulate(model, sets["test"], config, out, reference=traj, test_set=sets["test"], progress=False)
        timed(f"simulate_{label}_s", run_sim)
        runs[label] = out

    stage("results")
    table = compare_runs(runs, work / "compare")
    print(table)
    metrics = {label: load_metrics(d) for label, d in runs.items()}  # with each replica's "failed" flag
    train_s = {name: json.loads((work / f"pretrain_{name}" / "metrics.json").read_text())["train_time_s"]
               for name in ("small", "large")}  # summed over resumes, unlike a stage's wall time
    compute = {
        "pretrained-small": {"qm_frames": args.small, "sim_steps": 0, "wall_s": train_s["small"]},
        "pretrained-large": {"qm_frames": args.large, "sim_steps": 0, "wall_s": train_s["large"]},
        # refinement: its epochs' simulation and gradient time, likewise summed over resumes
        "stable-small": {"qm_frames": args.small, "sim_steps": refine_metrics["replica_steps"],
                         "wall_s": train_s["small"] + refine_metrics["sim_time_s"] + refine_metrics["grad_time_s"]},
    }
    if "energy-force-only-small" in metrics:
        control_metrics = (json.loads((control_out / "metrics.json").read_text())
                           if (control_out / "metrics.json").exists() else {"sim_time_s": 0, "grad_time_s": 0})
        compute["energy-force-only-small"] = {
            "qm_frames": args.small, "sim_steps": 0,
            "wall_s": train_s["small"] + control_metrics["sim_time_s"] + control_metrics["grad_time_s"]}
    statistics = survival_statistics(metrics, args.horizon_ps, args.seed)
    s, l, r = (metrics[k] for k in ("pretrained-small", "pretrained-large", "stable-small"))
    # Kaplan-Meier medians; one beyond the horizon counts as the horizon (a lower bound)
    median = {label: _survival.median_or_horizon(st["km_median_ps"], args.horizon_ps)
              for label, st in statistics["arms"].items()}
    targets = {
        "refined median stable time >= 3x small": median["stable-small"] >= 3 * median["pretrained-small"],
        "refined median stable time >= large": median["stable-small"] >= median["pretrained-large"],
        "refined h(r) MAE lower than both": (r.get("hr_mae") is not None and all(
            m.get("hr_mae") is None or r["hr_mae"] < m["hr_mae"] for m in (s, l))),
        "refined force MAE within 1.1x small": r["force_mae_meV_per_A"] <= 1.1 * s["force_mae_meV_per_A"],
    }
    if "energy-force-only-small" in metrics:
        targets["refined beats the energy/force-only control (log-rank p < 0.05)"] = (
            statistics["logrank_p"]["stable-small vs energy-force-only-small"] < 0.05
            and median["stable-small"] >= median["energy-force-only-small"])
    summary = {"settings": vars(args), "metrics": metrics, "statistics": statistics, "compute": compute,
               "refinement": {"learning_steps": refine_metrics["learning_steps"],
                              "restore_steps": refine_metrics.get("restore_steps", 0)},
               "targets_met": targets,
               "timings_s": timings, "machine": f"{os.cpu_count()} CPU cores"}
    atomic_write_json(results_base.with_suffix(".json"), summary)
    for png in ("survival.png", "hr.png"):
        src = work / "compare" / png
        if src.exists():
            (results_base.parent / f"{results_base.name}_{png}").write_bytes(src.read_bytes())
    lines = ["| model | QM frames | KM median stable (ps) | 95 % bootstrap | stable fraction | h(r) MAE | "
             "test force MAE (meV/A) | sim steps | wall (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for label, m in metrics.items():
        c, st = compute[label], statistics["arms"][label]
        hr = f"{m['hr_mae']:.4f}" if m.get("hr_mae") is not None else "-"
        median = f">= {args.horizon_ps:g}" if st["km_median_ps"] is None else f"{st['km_median_ps']:.2f}"
        lo, hi = st["median_interval_ps"]
        lines.append(f"| {label} | {c['qm_frames']} | {median} | [{lo:.2f}, {hi:.2f}] | {m['stable_fraction']:.2f} | "
                     f"{hr} | {m['force_mae_meV_per_A']:.1f} | {c['sim_steps']} | {c['wall_s'] or 0:.0f} |")
    lines.append("")
    lines += [f"- log-rank p, {pair}: {p:.2g}" for pair, p in statistics["logrank_p"].items()]
    lines += [f"- {name}: {'met' if ok else 'missed'}" for name, ok in targets.items()]
    atomic_write_text(results_base.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def survival_statistics(metrics: dict, horizon_ps: float, seed: int) -> dict:
    """Kaplan-Meier medians with bootstrap intervals per arm, and log-rank tests of the
    refined model against every other arm (all arms ran the same starts and seeds). Each
    metrics mapping needs "stable_time_ps" and "failed" (`report.load_metrics`): a replica
    that failed at the last check is an event, not a survivor."""
    arms = {}
    for label, m in metrics.items():
        numbers = _survival.summary(m["stable_time_ps"], m["failed"], horizon_ps, seed=seed)
        arms[label] = {"km_median_ps": numbers["median_stable_time_ps"],
                       "median_interval_ps": numbers["median_interval_ps"]}
    pairs = {f"stable-small vs {label}": _survival.logrank(metrics["stable-small"], m, horizon_ps)
             for label, m in metrics.items() if label != "stable-small"}
    if "energy-force-only-small" in metrics:
        pairs["energy-force-only-small vs pretrained-small"] = _survival.logrank(
            metrics["energy-force-only-small"], metrics["pretrained-small"], horizon_ps)
    return {"arms": arms, "logrank_p": pairs}


def run_pretrain(dataset, config, out: Path):
    """Pre-train into `out`, continuing its checkpoint, unless a run with this budget (or a
    larger one) is done: a finished run is extended when the limit that stopped it (time
    budget or epoch budget) is raised."""
    import yaml

    from openmm_stable.models import load_model
    from openmm_stable.training.pretrain import pretrain
    metrics_path = out / "metrics.json"
    if (out / "model.pt").exists() and metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
        # The budget the finished run had (its config.yaml), not its train_time_s: a run stops
        # at its time budget to within a batch, on either side of it.
        used = yaml.safe_load((out / "config.yaml").read_text())
        key = {"time_budget": "time_budget_min", "max_epochs": "max_epochs"}.get(metrics.get("stopped_reason"))
        new = None if key is None else getattr(config, key)
        extend = key is not None and used.get(key) is not None and (new is None or new > used[key])
        if not extend:
            return load_model(out / "model.pt")
        print(f"extending: {metrics['epochs']} epochs, {metrics['train_time_s'] / 60:.1f} min trained; "
              f"{key} {used[key]} -> {new}")
    resume = (out / "checkpoint_last.pt").exists()
    return pretrain(dataset, config, out, progress=False, resume=resume)[0]


def same_parameters(a, b) -> bool:
    import torch
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)

"""Benchmark 4: periodic water, pre-trained vs StABlE-refined.

Reference: flexible SPC/Fw water in a cubic periodic box, run in OpenMM (PME) at 300 K
(`openmm_stable.data.water`): N labelled frames for pre-training, and a long continuation
of the same run as the reference for the RDFs and the diffusivity (its last frames are
the test set for the force MAE). One model is pre-trained on the N frames; a second is
StABlE-refined from it (stability: by default the minimum non-bonded distance 1.2 A, which
also catches a molecule folding onto itself; `--stability min_distance` is the paper's
intermolecular criterion; observable: O-O, O-H and H-H RDFs of the reference trajectory,
whole-box samples or, with `--local-neighbourhoods`, every atom's environment as a
sample; energy/force regulariser on the N frames). Both are simulated (Langevin, 300 K,
0.5 fs) for a fixed horizon with the same criterion; reported: median stable time and
stable fraction, RDF MAE per element pair, molecular diffusivity (MSD) against the
reference's, VACF error, test force MAE, and the compute spent.

Every stage writes to --workdir and is skipped when its output exists (pretrain and
refine resume from their checkpoints), so a long run can span sessions:

    python benchmarks/water.py --workdir runs/water            # full (about an hour on 2 CPU cores)
    python benchmarks/water.py --workdir runs/water_q --quick  # about a minute
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (one thread per pool, repository on sys.path)
from _stages import StageTimings, stage  # noqa: E402
import _survival  # noqa: E402

import argparse  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/water", help="data, models and runs (not committed)")
    p.add_argument("--results", default=None, help="JSON + Markdown results (default benchmarks/results/water[_quick], next to this script)")
    p.add_argument("--molecules", type=int, default=32, help="waters in the box")
    p.add_argument("--frames", type=int, default=1000, help="labelled training frames")
    p.add_argument("--stride", type=int, default=40, help="MD steps (0.5 fs) between training frames")
    p.add_argument("--trajectory-ps", type=float, default=50.0, help="reference trajectory (RDFs, diffusivity)")
    p.add_argument("--equilibration-ps", type=float, default=10.0, help="reference MD before the first frame")
    p.add_argument("--test", type=int, default=200, help="test frames (end of the reference trajectory)")
    p.add_argument("--architecture", default="schnet")
    p.add_argument("--preset", default="small")
    p.add_argument("--cutoff", type=float, default=4.5, help="A; below half the box")
    p.add_argument("--pretrain-epochs", type=int, default=40, help="pre-training epochs (fixed: not a wall-clock budget, "
                   "which a shared CPU would turn into a different model)")
    p.add_argument("--pretrain-min", type=float, default=None, help="optional time budget of pre-training (minutes)")
    p.add_argument("--refine-epochs", type=int, default=15)
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--horizon-ps", type=float, default=2.0)
    p.add_argument("--stability", default="min_nonbonded_distance",
                   choices=("min_distance", "min_nonbonded_distance"), help="criterion of refine and simulate")
    p.add_argument("--local-neighbourhoods", action="store_true",
                   help="refine with local-neighbourhood samples (each atom's environment within the RDF r_max)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every stage")
    p.add_argument("--plot-only", default=None, metavar="FILE.json", help="re-print the table and re-draw the plots")
    args = p.parse_args(argv)
    if args.quick:
        args.molecules, args.frames, args.stride, args.trajectory_ps, args.test = 8, 60, 10, 1.0, 20
        args.equilibration_ps = 1.0
        args.preset, args.cutoff, args.pretrain_epochs = "tiny", 3.0, 5
        args.refine_epochs, args.replicas, args.horizon_ps = 3, 2, 0.3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        path = Path(args.plot_only)
        summary = json.loads(path.read_text())
        write_outputs(summary, path.with_suffix(""))
        return summary
    _common.single_thread_torch()
    from openmm_stable.data import load_dataset
    from openmm_stable.data.water import box_length, generate_water_dataset
    from openmm_stable import report
    from openmm_stable.engine import EngineConfig
    from openmm_stable.io import atomic_write_json
    from openmm_stable.models import load_model
    from openmm_stable.simulate import SimulationConfig, simulate
    from openmm_stable.training.pretrain import PretrainConfig, pretrain
    from openmm_stable.training.stable import StableConfig, refine

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # Default next to this script, whatever the working directory.
    results_base = Path(args.results or Path(__file__).resolve().parent / "results"
                        / ("water" + ("_quick" if args.quick else "")))
    results_base.parent.mkdir(parents=True, exist_ok=True)
    timed = StageTimings(work)
    timings = timed.seconds

    engine = EngineConfig(temperature_K=300.0, timestep_fs=0.5, friction_per_ps=1.0)
    stage(f"SPC/Fw reference: {args.molecules} waters (box {box_length(args.molecules):.2f} A), {args.frames} "
          f"frames + {args.trajectory_ps} ps trajectory")
    data_path, traj_path = work / "water.npz", work / "water_traj.npz"

    def make_data():
        if data_path.exists() and traj_path.exists():
            return load_dataset(data_path), load_dataset(traj_path)
        return generate_water_dataset(data_path, n_molecules=args.molecules, n_frames=args.frames, stride=args.stride,
                                      temperature=300.0, equilibration_ps=args.equilibration_ps,
                                      trajectory_path=traj_path, trajectory_ps=args.trajectory_ps,
                                      seed=args.seed, progress=False)
    data, traj = timed("generate_s", make_data)
    test = traj.subset(np.arange(len(traj) - min(args.test, len(traj)), len(traj)))

    stage(f"pre-train {args.architecture}-{args.preset} (cutoff {args.cutoff} A) on {len(data)} frames "
          f"({args.pretrain_epochs} epochs)")
    pre_out = work / "pretrain"

    def run_pretrain():
        if (pre_out / "model.pt").exists() and (pre_out / "metrics.json").exists():
            return load_model(pre_out / "model.pt")
        config = PretrainConfig(architecture=args.architecture, preset=args.preset, cutoff=args.cutoff, train=0.9,
                                val=0.1, test=0, max_epochs=args.pretrain_epochs,
                                time_budget_min=args.pretrain_min, seed=args.seed, patience=50)
        return pretrain(data, config, pre_out, progress=False, resume=(pre_out / "checkpoint_last.pt").exists())[0]
    models = {"pretrained": timed("pretrain_s", run_pretrain)}

    samples = "local-neighbourhood" if args.local_neighbourhoods else "whole-box"
    stage(f"StABlE refinement ({args.stability} 1.2 A; O-O/O-H/H-H RDFs of the reference trajectory, {samples} samples)")
    refine_out = work / "refine"
    rconfig = StableConfig(n_replicas=args.replicas, epoch_ps=0.25 if not args.quick else 0.1,
                           frame_interval_ps=0.01, equilibration_ps=0.05 if not args.quick else 0.01,
                           max_epochs=args.refine_epochs, learning_epochs=5, unstable_fraction=0.5,
                           lr=3e-4, seed=args.seed, stability=args.stability,
                           local_neighbourhoods=args.local_neighbourhoods, engine=engine)

    def run_refine():
        if (refine_out / "model.pt").exists() and (refine_out / "metrics.json").exists():
            return load_model(refine_out / "model.pt")
        return refine(models["pretrained"], data, rconfig, refine_out, reference=traj,
                      resume=(refine_out / "checkpoint.pt").exists(), progress=False)[0]  # refine trains a copy: models["pretrained"] stays as it was
    models["refined"] = timed("refine_s", run_refine)

    metrics = {}
    for label, model in models.items():
        stage(f"simulate {label}: {args.replicas} replicas x {args.horizon_ps} ps at 300 K")
        out = work / f"simulate_{label}"

        def run_sim(out=out, model=model):
            if not (out / "metrics.json").exists():
                config = SimulationConfig(n_replicas=args.replicas, time_ps=args.horizon_ps, check_interval_ps=0.05,
                                          stability=args.stability, seed=args.seed, engine=engine)
                simulate(model, data, config, out, reference=traj, test_set=test, progress=False)
        timed(f"simulate_{label}_s", run_sim)
        metrics[label] = report.load_metrics(out)  # with each replica's "failed" flag

    stage("results")
    refine_metrics = json.loads((refine_out / "metrics.json").read_text())
    rdf_curves: dict = {}
    for label in metrics:
        rdf = np.load(work / f"simulate_{label}" / "rdf.npz")
        rdf_curves["r"] = rdf["r"].tolist()
        for pair in ("O-O", "O-H", "H-H"):
            for name, key in (("reference", f"reference_{pair}"), (label, f"model_{pair}")):
                if key in rdf.files:
                    rdf_curves.setdefault(pair, {})[name] = rdf[key].tolist()
    compute = {"pretrained": {"sim_steps": 0, "wall_s": timings.get("pretrain_s")},
               "refined": {"sim_steps": refine_metrics["replica_steps"],
                           "wall_s": (timings.get("pretrain_s") or 0) + (timings.get("refine_s") or 0)}}
    settings = dict(vars(args), workdir=Path(args.workdir).name)  # no machine paths in committed results
    summary = {"settings": settings, "metrics": metrics, "refine": refine_metrics, "compute": compute,
               "timings_s": timings, "reference": data.metadata.get("method"),
               "generation_frames_per_s": data.metadata.get("timing", {}).get("frames_per_second"),
               "rdf_curves": rdf_curves, "machine": _common.machine_info()}
    atomic_write_json(results_base.with_suffix(".json"), summary)
    write_outputs(summary, results_base)
    return summary


def write_outputs(summary: dict, results_base: Path) -> None:
    """Markdown table, survival and RDF plots from a results JSON (also for --plot-only)."""
    from openmm_stable import report
    from openmm_stable.io import atomic_write_text

    metrics, compute = summary["metrics"], summary["compute"]
    horizon = summary["settings"]["horizon_ps"]
    report.plot_survival({k: (m["stable_time_ps"], _survival.arm_flags(m, horizon, k)) for k, m in metrics.items()},
                         horizon, results_base.parent / f"{results_base.name}_survival.png")
    curves = {pair: {k: np.asarray(v) for k, v in lines.items()}
              for pair, lines in summary["rdf_curves"].items() if pair != "r"}
    report.plot_rdfs(np.asarray(summary["rdf_curves"]["r"]), curves, results_base.parent / f"{results_base.name}_rdf.png")
    lines = ["| model | median stable (ps) | stable fraction | RDF MAE O-O | O-H | H-H | D (1e-5 cm^2/s) | "
             "D ref | D Green-Kubo | VACF MAE | test force MAE (meV/A) | sim steps | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cell = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    median = lambda v: f">= {horizon:g}" if v is None else f"{v:.2f}"  # noqa: E731  (None: beyond the horizon)
    for label, m in metrics.items():
        mae = m.get("rdf_mae", {})
        d, d_ref = m.get("diffusivity_cm2_per_s"), m.get("reference_diffusivity_cm2_per_s")
        d_gk = m.get("vacf_diffusivity_cm2_per_s")
        lines.append(
            f"| {label} | {median(m['median_stable_time_ps'])} | {m['stable_fraction']:.2f} | {cell(mae.get('O-O'))} | "
            f"{cell(mae.get('O-H'))} | {cell(mae.get('H-H'))} | {cell(d and d * 1e5, '{:.2f}')} | "
            f"{cell(d_ref and d_ref * 1e5, '{:.2f}')} | {cell(d_gk and d_gk * 1e5, '{:.2f}')} | "
            f"{cell(m.get('vacf_mae'))} | {m['force_mae_meV_per_A']:.1f} | "
            f"{compute[label]['sim_steps']} | {compute[label]['wall_s'] or 0:.0f} |")
    atomic_write_text(results_base.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)

"""Benchmark 5: does StABlE make models more stable? Controlled experiments on xTB ethanol.

One time-ordered GFN2-xTB ethanol trajectory at 700 K (offline, tblite) is cut into a
training pool (its first block) and held-out evaluation starts (its last block). Three
experiments, each measured side by side in one run:

* teacher_student (C1): the loop can reach a known target. Teacher: a pre-trained model.
  Student: the teacher with its last readout layer scaled by 0.8 (U_S = 0.8 U_T + const,
  the teacher at 1.25x the temperature). Target: the teacher's h(r) from its own replicas;
  a second seed of the teacher gives the noise floor. The student is refined on the
  observable alone; reported: h(r) MSE of a fresh fixed-seed run before/after, and the
  least-squares ratio of student to teacher forces on test frames (0.8 at the start).
* fragile (C2): a model pre-trained on very few frames. Arms from the same start with the
  same number of optimizer steps: pre-trained; StABlE; energy/force-only (observable weight
  0: plain extra training on the QM data); a model pre-trained on 50x more frames.
* rare (C3): the same with a start pre-trained on more frames, which fails rarely.

Every arm is evaluated with the same replicas: the same start frames (held out), seeds
and Langevin thermostat, to a fixed horizon; stable times are censored there. Reported:
Kaplan-Meier survival curves, the log-rank test, medians with bootstrap intervals, test
force MAE, and the h(r) MAE of stable frames. Every stage writes to --workdir and is
skipped when its output exists, so a run can span sessions:

    python benchmarks/stability_controlled.py --workdir runs/controlled           # full (about 3 h, 2 cores)
    python benchmarks/stability_controlled.py --workdir runs/controlled_q --quick # a smoke run of every stage

StABlE across architectures (README 5f): the fragile experiment with a MACE start, the
same data, replica groups, seeds and arms, into its own results file:

    python benchmarks/stability_controlled.py --workdir ../mace_runs --experiments fragile \
        --architecture mace --results benchmarks/results/stability_controlled_mace.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, write_json  # noqa: E402
from _stages import StageTimings, stage  # noqa: E402
import _survival  # noqa: E402

EXPERIMENTS = ("teacher_student", "fragile", "rare")
ARMS = ("pretrained", "stable", "energy_force_only", "large_data")
# Extra StABlE arms (settings changed from the recipe), run for the experiments in --variants:
# what each change of the learning phase does to the split-half cosine and to the result.
PAPER_FAILURE_HANDLING = dict(failure_reset="epoch_start", learning_restart="last_window", until_stable=True,
                              learning_epochs=10, new_optimizer_per_phase=True, random_reset_fraction=0.05,
                              qm_batch_size=None)
VARIANTS = {
    # The first recipe (examples/refine_demo.yaml before this benchmark): a failed replica
    # goes back to its last stable frame, learning epochs restart from the initial frames,
    # 5 learning epochs per phase, a 32-frame QM minibatch, lr 1e-4.
    "stable_first_recipe": dict(failure_reset="last_stable", learning_restart="initial", until_stable=False,
                                learning_epochs=5, new_optimizer_per_phase=False, random_reset_fraction=0.0,
                                qm_batch_size=32, lr=1e-4),
    # The regulariser's weight sets the trade between stability and force error: weight 1
    # was more stable in a probe but raised the force MAE 1.33x; the recipe's 10 gives
    # 1.13x (README section 5). Does 30 keep the force MAE within 1.1x, and the gain?
    "stable_energy_force_weight_30": dict(energy_force_weight=30.0),
    # Neither weight meets both criteria, yet two of the four weight-10 refinements did (1.03x
    # and 1.07x force MAE, both stable): the force error drifts in some runs only. A trust
    # region acts on the drift alone: energy/force-only steps whenever the training-set
    # force MAE leaves 1.1x its start.
    "stable_force_budget_1.1": dict(force_mae_budget=1.1),
    # The training-set budget of 1.1 left the test force MAE at 1.02x and halved the gain; a
    # looser budget on the training set (its MAE rose 1.03-1.29x where the test set's rose
    # 1.03-1.22x) may keep both within the criteria.
    "stable_force_budget_1.2": dict(force_mae_budget=1.2),
    # Under the budget the model moves more slowly (1.1: 2.1x the median at 1.02x force MAE;
    # 1.2: 2.3x at 1.08x): does twice the refinement reach 3x within the budget?
    "stable_force_budget_1.1_72_epochs": dict(force_mae_budget=1.1, max_epochs=72),
    # Where failures are rare (C3), 8 replicas reached the 50 % trigger once or twice in 36
    # epochs and the steps were noise: twice the replicas, a trigger at 25 % (4 failures),
    # and the force budget, which undoes the force-MAE cost of Adam's first steps (1.14x).
    "stable_rare_settings": dict(n_replicas=16, unstable_fraction=0.25, force_mae_budget=1.1),
}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/controlled", help="data, models and runs (not committed)")
    p.add_argument("--results", default=None,
                   help="results JSON (default benchmarks/results/stability_controlled.json; with --quick, in --workdir)")
    p.add_argument("--data", default=None, help="an xTB ethanol trajectory to use instead of generating one")
    p.add_argument("--frames", type=int, default=3000, help="frames of the reference trajectory (5 fs apart)")
    p.add_argument("--eval-frames", type=int, default=500, help="held-out frames at the end: starts and test set")
    p.add_argument("--fragile-frames", type=int, default=40)
    p.add_argument("--rare-frames", type=int, default=400)
    p.add_argument("--large-frames", type=int, default=2000, help="50x the fragile set")
    p.add_argument("--pretrain-min", type=float, nargs=3, default=(2.0, 4.0, 6.0), metavar=("FRAGILE", "RARE", "LARGE"),
                   help="pre-training budgets in minutes")
    p.add_argument("--replicas", type=int, default=64, help="evaluation replicas per arm")
    p.add_argument("--horizon-ps", type=float, nargs=2, default=(8.0, 8.0), metavar=("FRAGILE", "RARE"))
    p.add_argument("--temperature", type=float, default=700.0,
                   help="K, of the xTB data and of every simulation (at 500 K ethanol models trained on 10-40 "
                        "frames kept a median stable time above 2 ps; at 700 K the 40-frame model's is about 2 ps)")
    p.add_argument("--refine-epochs", type=int, default=36)
    p.add_argument("--refine-seeds", type=int, default=4,
                   help="independent refinements per refined arm; the evaluation replicas are split among them "
                        "(refinement is chaotic: two runs of one config diverge within a few steps, so one "
                        "refined model is a sample of one)")
    p.add_argument("--teacher-steps", type=int, default=30, help="learning steps of the teacher-student refinement")
    p.add_argument("--optimizers", nargs="+", default=["adam", "sgd"], help="teacher-student optimiser arms")
    p.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    p.add_argument("--variants", nargs="*", choices=["fragile", "rare"], default=[],
                   help=f"experiments that also run the StABlE variants ({', '.join(VARIANTS)})")
    p.add_argument("--variant-names", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="which variants --variants runs")
    p.add_argument("--variant-controls", action="store_true",
                   help="give every variant arm its own energy/force-only control with its step counts")
    p.add_argument("--hr-window-ps", type=float, default=1.0,
                   help="also compare h(r) over stable frames of this first window, the same for every arm (0: off)")
    p.add_argument("--architecture", default="schnet",
                   help="the family every start is pre-trained with (StABlE across architectures: mace)")
    p.add_argument("--preset", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every stage")
    args = p.parse_args(argv)
    if args.refine_seeds < 1 or args.replicas % args.refine_seeds:
        p.error(f"--replicas ({args.replicas}) must be a multiple of --refine-seeds ({args.refine_seeds})")
    if args.architecture != "schnet" and "teacher_student" in args.experiments:
        p.error("teacher_student scales the last readout layer, which is U_S = 0.8 U_T only for SchNet's single "
                "readout: with --architecture, pass --experiments fragile and/or rare")
    args.sample_threshold = 0.5  # A: teacher-student frames come from replicas before this bond deviation
    if args.quick:
        args.frames, args.eval_frames, args.fragile_frames, args.rare_frames, args.large_frames = 120, 30, 20, 40, 80
        args.pretrain_min, args.replicas, args.horizon_ps = (0.05, 0.05, 0.05), 4, (0.1, 0.1)
        args.refine_epochs, args.teacher_steps, args.optimizers, args.refine_seeds = 2, 2, ["adam"], 2
        # Seconds-old models fail within femtoseconds: the smoke run keeps every finite frame.
        args.temperature, args.sample_threshold = 500.0, 1e3
        args.hr_window_ps = 0.05 if args.hr_window_ps else 0.0
    return args


def workdir_and_results(args) -> tuple:
    """(--workdir, the results JSON, stage timings): benchmarks/results/stability_controlled.json,
    or with --quick a file in --workdir (a smoke run never touches the published results)."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results) if args.results else (
        work / "stability_controlled.json" if args.quick
        else Path(__file__).resolve().parent / "results" / "stability_controlled.json")
    return work, results_path, StageTimings(work)


# --- data and models ---------------------------------------------------------------------------
def reference_data(args, work: Path):
    from openmm_stable.data import load_dataset
    from openmm_stable.data.generate import generate_xtb_dataset

    if args.data:
        return load_dataset(args.data)
    path = work / "ethanol_xtb.npz"
    if path.exists():
        return load_dataset(path)
    return generate_xtb_dataset("ethanol", path, n_frames=args.frames, temperature=args.temperature, stride=10,
                                seed=args.seed, progress=True, resume=True)


def pretrained(name: str, train, budget_min: float, work: Path, args):
    """A model of --architecture/--preset (SchNet-small by default) pre-trained on `train`
    (90/10 train/val) for `budget_min` minutes."""
    from openmm_stable.models import load_model
    from openmm_stable.training.pretrain import PretrainConfig, pretrain

    out = work / f"pretrain_{name}"
    if (out / "model.pt").exists():
        return load_model(out / "model.pt")
    n_val = max(2, len(train) // 10)
    config = PretrainConfig(architecture=args.architecture, preset=args.preset, train=len(train) - n_val, val=n_val, test=0,
                            time_budget_min=budget_min, max_epochs=100000, patience=100000, device="cpu",
                            seed=args.seed)
    model, _ = pretrain(train, config, out, resume=(out / "checkpoint_last.pt").exists(), progress=True)
    return model


def eval_config(args, horizon_ps: float):
    from openmm_stable.engine import EngineConfig
    from openmm_stable.simulate import SimulationConfig

    return SimulationConfig(n_replicas=args.replicas, time_ps=horizon_ps, check_interval_ps=0.05,
                            stability="bonds", bond_threshold=0.5, seed=args.seed, vacf_interval_ps=None,
                            engine=EngineConfig(temperature_K=args.temperature, integrator="langevin",
                                                friction_per_ps=1.0))


def evaluation_groups(starts, args) -> list:
    """The evaluation replicas as `--refine-seeds` groups: (start frames, seed) per group.
    Every arm is evaluated on the same groups (the same starts and seeds); a refined arm's
    k-th refinement is evaluated on group k, an unrefined model on all of them."""
    k = args.refine_seeds
    if k == 1:
        return [(starts, args.seed)]
    size = args.replicas // k
    chosen = np.random.default_rng(args.seed).choice(len(starts), size=args.replicas, replace=False)
    return [(starts.subset(np.sort(chosen[g * size:(g + 1) * size])), args.seed + g) for g in range(k)]


def evaluate_arm(models: list, name: str, starts, pool, test, horizon_ps: float, work: Path, args) -> dict:
    """Stable times and event flags (the same replicas for every arm: `evaluation_groups`),
    pooled over the groups, with their stability numbers (`_survival.summary`); h(r) MAE of
    stable frames against the whole pool, test force MAE (means over the groups' models)."""
    import dataclasses

    from openmm_stable.report import load_metrics
    from openmm_stable.simulate import simulate

    groups = evaluation_groups(starts, args)
    per_group = []
    for g, (model, (group_starts, seed)) in enumerate(zip(models, groups)):
        out = work / (f"eval_{name}" if len(groups) == 1 else f"eval_{name}_g{g}of{len(groups)}")
        if not (out / "metrics.json").exists():
            config = eval_config(args, horizon_ps)
            config = dataclasses.replace(config, n_replicas=args.replicas // len(groups), seed=seed)
            simulate(model, group_starts, config, out, reference=pool, test_set=test, progress=True)
        per_group.append(load_metrics(out))
    hr = [m["hr_mae"] for m in per_group if m.get("hr_mae") is not None]
    forces = [m["force_mae_meV_per_A"] for m in per_group]
    return {**_survival.summary(*_survival.pool(per_group), horizon_ps, seed=args.seed),
            "hr_mae": float(np.mean(hr)) if hr else None, "force_mae_meV_per_A": float(np.mean(forces)),
            "force_mae_per_refinement": forces}


# --- refinement arms -------------------------------------------------------------------------
def stable_recipe(args, **overrides):
    """The recipe chosen on the fragile start (evaluated there with another seed, 32 replicas
    x 4 ps, against the first recipe; see benchmarks/README section 5): the paper code's
    failure handling (PAPER_FAILURE_HANDLING), Adam at lr 5e-4, h(r) at 0.05 A up to 6 A
    (ethanol is under 4 A across)."""
    from openmm_stable.engine import EngineConfig
    from openmm_stable.training.stable import StableConfig

    values = dict(n_replicas=8, epoch_ps=0.5, frame_interval_ps=0.025, equilibration_ps=0.1,
                  max_epochs=args.refine_epochs, unstable_fraction=0.5,
                  observable={"name": "hr", "r_max": 6.0, "n_bins": 120}, observable_loss="mse",
                  energy_force_weight=10.0, lr=5e-4, seed=args.seed,
                  engine=EngineConfig(temperature_K=args.temperature, timestep_fs=0.5, integrator="langevin"),
                  **PAPER_FAILURE_HANDLING)
    values.update(overrides)
    return StableConfig(**values)


def refined(start, name: str, train, pool, config, work: Path):
    from openmm_stable.models import load_model
    from openmm_stable.training.stable import refine

    out = work / f"refine_{name}"
    if (out / "model.pt").exists() and (out / "metrics.json").exists():
        return load_model(out / "model.pt"), json.loads((out / "metrics.json").read_text())
    return refine(start, train, config, out, reference=pool, resume=(out / "checkpoint.pt").exists(), progress=True)


def signal_summary(folder: Path) -> dict:
    """Per learning step: the split-half cosine and the gradient norms from log.csv."""
    import csv

    with open(folder / "log.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["phase"] == "learning" and r["grad_norm"]]
    column = lambda key: [float(r[key]) for r in rows if r.get(key)]  # noqa: E731
    return {"split_half_cosine": column("split_half_cosine"), "observable_grad_norm": column("observable_grad_norm"),
            "energy_force_grad_norm": column("energy_force_grad_norm"),
            "predicted_loss_change": column("predicted_loss_change"),
            "realised_loss_change": column("realised_loss_change")}


def refinements(start, name: str, train, pool, config_of_seed, work: Path, args) -> list:
    """`--refine-seeds` independent refinements of `start`: [(model, summary)], the k-th with
    refinement seed args.seed + k (folder refine_NAME, then refine_NAME_seedK)."""
    import dataclasses

    runs = []
    for k in range(args.refine_seeds):
        config = dataclasses.replace(config_of_seed(k), seed=args.seed + k)
        runs.append(refined(start, name if k == 0 else f"{name}_seed{k}", train, pool, config, work))
    return runs


def energy_force_controls(start, name: str, train, pool, steps: list, work: Path, args, **overrides) -> list:
    """Refinements with the observable's weight at 0, the k-th taking `steps[k]` optimizer
    steps: plain extra training on the QM data, which a refined arm must beat."""
    return refinements(start, name, train, pool,
                       lambda k: stable_recipe(args, observable_weight=0.0, max_learning_steps=steps[k], **overrides),
                       work, args)


def run_arms(exp: str, start, large, train, pool, starts, test, horizon_ps: float, work: Path, timings, args) -> dict:
    """The four arms of a stability experiment and their statistics."""
    stage(f"{exp}: StABlE refinement ({args.refine_seeds} seeds)")
    stable_runs = timings(f"{exp}_refine_stable", lambda: refinements(
        start, f"{exp}_stable", train, pool, lambda k: stable_recipe(args), work, args))
    steps = [int(summary["learning_steps"]) for _, summary in stable_runs]
    stage(f"{exp}: energy/force-only control ({steps} optimizer steps, as StABlE took with each seed)")
    ef_runs = timings(f"{exp}_refine_ef", lambda: energy_force_controls(
        start, f"{exp}_energy_force_only", train, pool, steps, work, args, max_epochs=10 * args.refine_epochs))
    K = args.refine_seeds
    models = {"pretrained": [start] * K, "stable": [m for m, _ in stable_runs],
              "energy_force_only": [m for m, _ in ef_runs], "large_data": [large] * K}
    run_steps = {"stable": steps, "energy_force_only": [int(summary["learning_steps"]) for _, summary in ef_runs]}
    restore_steps = {}
    chosen = {name: VARIANTS[name] for name in args.variant_names} if exp in args.variants else {}
    for variant, overrides in chosen.items():
        stage(f"{exp}: StABlE variant {variant}")
        runs = timings(f"{exp}_refine_{variant}", lambda o=overrides, v=variant: refinements(
            start, f"{exp}_{v}", train, pool, lambda k: stable_recipe(args, **o), work, args))
        models[variant] = [m for m, _ in runs]
        run_steps[variant] = [int(summary["learning_steps"]) for _, summary in runs]
        restore_steps[variant] = [int(summary.get("restore_steps", 0)) for _, summary in runs]
        if args.variant_controls:
            # Its own control: energy/force-only runs with as many optimizer steps as the
            # variant's runs took, restore steps included. The learning-rate schedule follows
            # the observable loss, which a control does not train: its stop rule is off, or
            # the control would end early (it took 25-40 of 31-65 steps with it on).
            total = [steps + restores for steps, restores in zip(run_steps[variant], restore_steps[variant])]
            control = f"energy_force_only_{variant}"
            stage(f"{exp}: energy/force-only control for {variant} ({total} optimizer steps)")
            runs = timings(f"{exp}_refine_{control}", lambda t=total, c=control: energy_force_controls(
                start, f"{exp}_{c}", train, pool, [max(1, n) for n in t], work, args,
                max_epochs=20 * args.refine_epochs, max_lr_reductions=10**6))
            models[control] = [m for m, _ in runs]
            run_steps[control] = [int(summary["learning_steps"]) for _, summary in runs]
    arms = {}
    for arm, arm_models in models.items():
        stage(f"{exp}: evaluate {arm}")
        # The large-data model is the same in every experiment: one evaluation per horizon.
        folder = f"large_data_{horizon_ps:g}ps" if arm == "large_data" else f"{exp}_{arm}"
        arms[arm] = timings(f"{exp}_eval_{arm}", lambda m=arm_models, f=folder: evaluate_arm(
            m, f, starts, pool, test, horizon_ps, work, args))
        if args.hr_window_ps:
            # h(r) over one time window for every arm: each arm's own stable frames span
            # different times (a fragile replica's first 1-2 ps, a refined one's 8 ps).
            window = timings(f"{exp}_eval_{arm}_window", lambda m=arm_models, f=folder: evaluate_arm(
                m, f"{f}_window{args.hr_window_ps:g}ps", starts, pool, test, args.hr_window_ps, work, args))
            arms[arm]["hr_mae_window"] = window["hr_mae"]
            arms[arm]["hr_window_ps"] = args.hr_window_ps
    for arm, values in arms.items():
        # evaluate_arm gave the Kaplan-Meier median (None: more than half outlived the
        # horizon) and its bootstrap interval, from the pooled event flags.
        if arm in run_steps:
            values["learning_steps"] = run_steps[arm]
        if arm in restore_steps:
            values["restore_steps"] = restore_steps[arm]
    p = lambda a, b: _survival.logrank(arms[a], arms[b], horizon_ps)  # noqa: E731
    for variant in run_steps.keys() - {"stable", "energy_force_only"}:
        arms[variant]["logrank_p_vs_pretrained"] = p(variant, "pretrained")
        arms[variant]["signal"] = signal_summary(work / f"refine_{exp}_{variant}")
        if f"energy_force_only_{variant}" in arms:
            arms[variant]["logrank_p_vs_matched_control"] = p(variant, f"energy_force_only_{variant}")
    return {"horizon_ps": horizon_ps, "n_train_frames": len(train), "refine_seeds": K, "arms": arms,
            "logrank_p": {"stable_vs_pretrained": p("stable", "pretrained"),
                          "stable_vs_energy_force_only": p("stable", "energy_force_only"),
                          "energy_force_only_vs_pretrained": p("energy_force_only", "pretrained"),
                          "stable_vs_large_data": p("stable", "large_data")},
            "signal": [signal_summary(work / (f"refine_{exp}_stable" + (f"_seed{k}" if k else "")))
                       for k in range(K)]}


# --- teacher-student ---------------------------------------------------------------------------
def scaled_student(teacher, factor: float = 0.8):
    """The teacher with its last readout layer scaled: U_S = factor * U_T + const."""
    student = copy.deepcopy(teacher)
    import torch

    last = [m for m in student.net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(factor)
        if last.bias is not None:
            last.bias.mul_(factor)
    return student


def sampled_frames(model, starts, n_replicas: int, time_ps: float, seed: int, args) -> np.ndarray:
    """Frames every 25 fs after 0.1 ps of a Langevin run, from stable replicas only."""
    import torch

    from openmm_stable.engine import EngineConfig, ReplicaEngine
    from openmm_stable.simulate import initial_frames
    from openmm_stable.stability import BondDeviationCriterion

    engine = ReplicaEngine(model, starts.atomic_numbers, n_replicas,
                           EngineConfig(temperature_K=args.temperature, platform="CPU"), seed=seed)
    engine.set_states(starts.positions[initial_frames(starts, n_replicas, seed)], seed=seed)
    criterion = BondDeviationCriterion.from_dataset(starts, args.sample_threshold)
    alive, frames = np.ones(n_replicas, dtype=bool), []
    for t in range(int(round(time_ps / 0.025))):
        engine.step(50)
        positions, _ = engine.get_states()
        alive &= ~criterion.unstable(criterion(torch.as_tensor(positions))).numpy() & np.isfinite(positions).all(
            axis=(1, 2))
        if (t + 1) * 0.025 > 0.1 + 1e-9:
            frames.append(positions[alive])
    return np.concatenate(frames)


def force_ratio(student, teacher, frames) -> float:
    """Least-squares ratio of student to teacher forces: sum F_S.F_T / sum F_T.F_T."""
    import torch

    from openmm_stable.models import batch_index, energy_and_forces

    k = min(100, len(frames))
    dtype = next(iter(teacher.parameters())).dtype
    x = torch.as_tensor(frames.positions[:k], dtype=dtype).reshape(-1, 3)
    z = torch.as_tensor(frames.atomic_numbers).repeat(k)
    batch = batch_index(k, frames.n_atoms)
    _, f_s = energy_and_forces(student, z, x, batch)
    _, f_t = energy_and_forces(teacher, z, x, batch)
    return float((f_s * f_t).sum() / (f_t * f_t).sum())


def run_teacher_student(teacher, train, starts, test, work: Path, timings, args) -> dict:
    import torch

    from openmm_stable.data import QMDataset
    from openmm_stable.models import load_model
    from openmm_stable.observables import HrObservable

    settings = {"name": "hr", "r_max": 6.0, "n_bins": 120}
    hr = HrObservable(r_max=6.0, n_bins=120)
    def hr_of(frames):
        """Mean h(r) of stable frames; NaN when every replica failed before the first sample."""
        if len(frames) == 0:
            return torch.full((120,), float("nan"), dtype=torch.float64)
        return hr(torch.as_tensor(frames)).mean(0)

    replicas, time_ps = (16, 1.0) if not args.quick else (4, 0.2)
    stage("teacher-student: the teacher's h(r) (target) and a second seed (noise floor)")
    target_path = work / "teacher_frames.npz"
    if not target_path.exists():
        np.savez(target_path, a=sampled_frames(teacher, starts, replicas, time_ps, 101, args),
                 b=sampled_frames(teacher, starts, replicas, time_ps, 202, args))
    saved = np.load(target_path)
    if len(saved["a"]) == 0:
        raise RuntimeError("the teacher is unstable: every replica failed before its first sampled frame")
    target = hr_of(saved["a"])
    noise_floor = float(((hr_of(saved["b"]) - target) ** 2).mean())
    reference = QMDataset(starts.atomic_numbers, saved["a"], temperature=args.temperature, source="teacher replicas")
    student = scaled_student(teacher)
    fresh = lambda model: float(((hr_of(sampled_frames(model, starts, replicas, time_ps, 303, args)) - target) ** 2  # noqa: E731
                                 ).mean())
    out = {"hr_mse": {"start": timings("ts_start_hr", lambda: fresh(student)), "noise_floor": noise_floor},
           "force_ratio": {"start": force_ratio(student, teacher, test)}, "optimizers": {}}
    for optimizer in args.optimizers:
        stage(f"teacher-student: refine the student on h(r) alone ({optimizer})")
        # Learning from the first epoch on: a 0.01 A training threshold flags every replica.
        # Gradient norms are 1e2-1e4 here, so clipping to 1 makes SGD a fixed-length step of
        # lr in parameter space along the estimated gradient; Adam steps each parameter by ~lr.
        lr = 1e-3 if optimizer == "adam" else 1e-2
        config = stable_recipe(args, observable=settings, energy_force_weight=0.0, bond_threshold=0.01,
                               failure_reset="last_stable", learning_restart="initial", until_stable=False,
                               new_optimizer_per_phase=False, random_reset_fraction=0.0,
                               unstable_fraction=0.01, learning_epochs=10 ** 6, max_learning_steps=args.teacher_steps,
                               max_epochs=args.teacher_steps + 2, epoch_ps=0.4, n_replicas=16, optimizer=optimizer,
                               lr=lr, grad_clip=1.0, warmup_steps=2,
                               lr_patience=10 ** 6)
        folder = work / f"refine_teacher_student_{optimizer}"
        if not (folder / "model.pt").exists():
            timings(f"ts_refine_{optimizer}", lambda c=config: refined(student, f"teacher_student_{optimizer}",
                                                                        train, reference, c, work))
        model = load_model(folder / "model.pt")
        out["optimizers"][optimizer] = {
            "lr": lr, "hr_mse_refined": timings(f"ts_refined_hr_{optimizer}", lambda m=model: fresh(m)),
            "force_ratio_refined": force_ratio(model, teacher, test), "signal": signal_summary(folder)}
    best = min(out["optimizers"].values(), key=lambda v: v["hr_mse_refined"])
    out["hr_mse"]["refined"] = best["hr_mse_refined"]
    out["force_ratio"]["refined"] = best["force_ratio_refined"]
    out["passed"] = bool((out["hr_mse"]["refined"] <= out["hr_mse"]["start"] / 5
                          or out["hr_mse"]["refined"] <= 2 * noise_floor) and out["force_ratio"]["refined"] >= 0.95)
    return out


# --- report -------------------------------------------------------------------------------------
def verdict(result: dict, arm: str = "stable") -> dict:
    """The issue's pass criteria for a refined arm of a stability experiment."""
    arms, horizon = result["arms"], result["horizon_ps"]
    median = lambda a: _survival.median_or_horizon(arms[a]["median_stable_time_ps"], horizon)  # noqa: E731
    control = f"energy_force_only_{arm}" if f"energy_force_only_{arm}" in arms else "energy_force_only"
    p_control = _survival.logrank(arms[arm], arms[control], horizon)
    not_worse = lambda key: (arms["pretrained"].get(key) is not None and arms[arm].get(key) is not None  # noqa: E731
                             and arms[arm][key] <= arms["pretrained"][key])
    return {"median_at_least_3x": median(arm) >= 3 * median("pretrained"),
            "median_capped_by_horizon": arms[arm]["median_stable_time_ps"] is None,
            "beats_energy_force_only_p_lt_0.05": p_control < 0.05 and median(arm) >= median(control),
            "force_mae_within_1.1x": arms[arm]["force_mae_meV_per_A"] <= 1.1 * arms["pretrained"]["force_mae_meV_per_A"],
            "hr_mae_not_worse": not_worse("hr_mae"),
            "hr_mae_not_worse_same_window": not_worse("hr_mae_window")}


def print_tables(payload: dict) -> None:
    for exp in ("fragile", "rare"):
        if exp not in payload:
            continue
        result = payload[exp]
        rows = []
        for arm, v in result["arms"].items():
            med = v["median_stable_time_ps"]
            lo, hi = v["median_interval_ps"]
            rows.append([arm, f"{v['stable_fraction']:.2f}",
                         f">= {result['horizon_ps']:g}" if med is None else f"{med:.2f}", f"[{lo:.2f}, {hi:.2f}]",
                         v["hr_mae"] if v["hr_mae"] is not None else float("nan"),
                         v["hr_mae_window"] if v.get("hr_mae_window") is not None else float("nan"),
                         v["force_mae_meV_per_A"]])
        print(f"\n{exp}: {len(result['arms']['pretrained']['stable_time_ps'])} replicas, horizon {result['horizon_ps']:g} ps")
        print(format_table(["arm", f"stable at {result['horizon_ps']:g} ps", "median (ps)", "95% bootstrap",
                            "h(r) MAE", f"h(r) MAE, first {window_label(result)}", "force MAE (meV/A)"], rows))
        print("log-rank p: " + ", ".join(f"{k} {v:.2g}" for k, v in result["logrank_p"].items()))
        print("pass criteria: " + ", ".join(f"{k}={v}" for k, v in result["verdict"].items()))
    if "teacher_student" in payload:
        ts = payload["teacher_student"]
        print(f"\nteacher-student: h(r) MSE start {ts['hr_mse']['start']:.3g}, refined {ts['hr_mse']['refined']:.3g}, "
              f"noise floor {ts['hr_mse']['noise_floor']:.3g}; force ratio {ts['force_ratio']['start']:.3f} -> "
              f"{ts['force_ratio']['refined']:.3f}; passed={ts['passed']}")
        for name, v in ts["optimizers"].items():
            cos = v["signal"]["split_half_cosine"]
            print(f"  {name}: h(r) MSE {v['hr_mse_refined']:.3g}, force ratio {v['force_ratio_refined']:.3f}, "
                  f"median split-half cosine {np.median(cos) if cos else float('nan'):.2f}")


def window_label(result: dict) -> str:
    """The common h(r) window of an experiment's arms, for a column header."""
    windows = {v.get("hr_window_ps") for v in result["arms"].values()} - {None}
    return f"{windows.pop():g} ps" if len(windows) == 1 else "window"


def plot_survival(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from openmm_stable.statistics import kaplan_meier

    exps = [e for e in ("fragile", "rare") if e in payload]
    if not exps:
        return
    fig, axes = plt.subplots(1, len(exps), figsize=(6 * len(exps), 6), squeeze=False)
    for ax, exp in zip(axes[0], exps):
        result = payload[exp]
        for arm, v in result["arms"].items():
            t, s = kaplan_meier(v["stable_time_ps"], _survival.arm_flags(v, result["horizon_ps"], f"{exp}/{arm}"),
                                result["horizon_ps"])
            ax.step(t, s, where="post", label=arm)
        ax.set(title=f"{exp} start (p StABlE vs E/F-only {result['logrank_p']['stable_vs_energy_force_only']:.2g})",
               xlabel="time (ps)", ylabel="fraction stable", ylim=(0, 1.02))
        # Below the axes: with the variant arms the legend would hide the curves.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work, results_path, timings = workdir_and_results(args)

    stage("reference data: GFN2-xTB ethanol trajectory")
    data = timings("generate", lambda: reference_data(args, work))
    n = len(data)
    pool = data.subset(np.arange(n - args.eval_frames))  # training frames are drawn from here; h(r) reference
    held_out = data.subset(np.arange(n - args.eval_frames, n))  # starts of the evaluation replicas, test set
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(pool))
    fragile_train = pool.subset(np.sort(order[:args.fragile_frames]))
    rare_train = pool.subset(np.sort(order[:args.rare_frames]))
    large_train = pool.subset(np.sort(order[:args.large_frames]))

    stage("pre-training: fragile, rare and large-data starts")
    fragile = timings("pretrain_fragile", lambda: pretrained("fragile", fragile_train, args.pretrain_min[0], work, args))
    rare = (timings("pretrain_rare", lambda: pretrained("rare", rare_train, args.pretrain_min[1], work, args))
            if "rare" in args.experiments else None)
    large = timings("pretrain_large", lambda: pretrained("large", large_train, args.pretrain_min[2], work, args))

    payload = json.loads(results_path.read_text()) if results_path.exists() else {}
    payload.update({"benchmark": "stability_controlled", "molecule": "ethanol",
                    "architecture": f"{args.architecture}-{args.preset}",
                    "temperature_K": args.temperature, "n_eval_replicas": args.replicas, "quick": args.quick,
                    "frames": {"pool": len(pool), "held_out": len(held_out), "fragile": len(fragile_train),
                               "rare": len(rare_train), "large": len(large_train)},
                    "machine": machine_info()})
    for exp in args.experiments:
        if exp == "teacher_student":
            payload[exp] = run_teacher_student(large, pool, held_out, held_out, work, timings, args)
        else:
            start, train, horizon = ((fragile, fragile_train, args.horizon_ps[0]) if exp == "fragile"
                                     else (rare, rare_train, args.horizon_ps[1]))
            payload[exp] = run_arms(exp, start, large, train, pool, held_out, held_out, horizon, work, timings, args)
            payload[exp]["verdict"] = verdict(payload[exp])
            for variant in set(payload[exp]["arms"]) - set(ARMS):
                if not variant.startswith("energy_force_only_"):
                    payload[exp]["arms"][variant]["verdict"] = verdict(payload[exp], variant)
        payload["timings_s"] = timings.seconds
        write_json(results_path, payload)
    print_tables(payload)
    plot_survival(payload, results_path.with_name(results_path.stem + "_survival.png"))
    print(f"wrote {results_path}")
    return payload


if __name__ == "__main__":
    main()

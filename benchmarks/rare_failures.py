"""Benchmark 5e: refinement of a start that fails rarely, in a renewal design (issue 23).

The arms, the screen, the confirmation and the pass criteria are pre-registered in
benchmarks/README.md, section 5e, and in `CRITERIA` below: the screen chooses one arm on
its own evaluation seeds, the confirmation measures it on fresh ones. The endpoint is
failures at 0.5 A per replica-ps (`simulate --renewal`: a failed replica restarts from a
fresh held-out frame and the clock runs on), compared by the exact conditional binomial
test (`openmm_stable.statistics.rate_ratio_test`).

The start is C3 of benchmark 5 (SchNet-small on 400 frames of the 700 K xTB ethanol pool),
made by `stability_controlled.py`'s own stages in --workdir. Every stage writes to --workdir
and is skipped when its output exists (refinements and evaluations resume after a kill), so
the experiment can span sessions; results go to `results/stability_controlled.json` under
``"rare_renewal"`` as they come:

    python benchmarks/rare_failures.py --workdir ../rare_runs --phase screen    # outside the checkout: kept
    python benchmarks/rare_failures.py --workdir ../rare_runs --phase confirm
    python benchmarks/rare_failures.py --workdir runs/rare_q --quick      # a smoke run of every stage
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402
from _stages import stage  # noqa: E402
import stability_controlled  # noqa: E402

# Written before any run (benchmarks/README.md 5e): what the confirmation must show.
CRITERIA = {
    "endpoint": "failures at 0.5 A per replica-ps, renewal, 700 K; exact conditional binomial test",
    "rate_ratio_at_most": 0.5, "upper95_below": 0.8,
    "against": ["pretrained", "energy_force_only", "bank_random"],
    "test_force_mae_ratio_at_most": 1.05,
    "hr_mae_occupied": "at most the start's plus the reference noise band (two independent xTB chains)",
    "screen_rule": "the refined arm with the lowest pooled screen failure rate whose rate ratio against pretrained "
                   "is below 0.5 and below bank_random's and bank_hr's",
}
REFINED_ARMS = ("paper", "bank_hot", "bank_random", "bank_hr", "bank")
CONTROL_ARM = "energy_force_only"  # matched to bank_hot refinement k (as many L-BFGS iterations)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/rare", help="data, models and runs (not committed)")
    p.add_argument("--results", default=None, help="results JSON (default benchmarks/results/stability_controlled.json; "
                                                  "with --quick, in --workdir)")
    p.add_argument("--phase", choices=["screen", "confirm", "converged", "all"], default="screen",
                   help="converged: the confirmation repeated from the start trained to convergence (README 5e)")
    p.add_argument("--arms", nargs="+", choices=REFINED_ARMS, default=["paper", "bank_hot", "bank_random", "bank_hr"],
                   help="refined arms of the screen (bank at 700 K costs ~4x bank_hot; see README 5e)")
    p.add_argument("--screen-refinements", type=int, default=2)
    p.add_argument("--confirm-refinements", type=int, default=4)
    p.add_argument("--screen-temperature", type=float, default=900.0)
    p.add_argument("--temperature", type=float, default=700.0, help="K: data, start, confirmation")
    p.add_argument("--hot-temperature", type=float, default=900.0, help="K: bank_hot's training temperature")
    p.add_argument("--group-replicas", type=int, default=32)
    p.add_argument("--screen-ps", type=float, default=4.0)
    p.add_argument("--confirm-ps", type=float, default=8.0)
    p.add_argument("--confirm-groups", type=int, default=4)
    p.add_argument("--bank-epochs", type=int, default=400, help="cap on bank refinement epochs (0.25 ps each)")
    p.add_argument("--paper-epochs", type=int, default=36)
    p.add_argument("--chosen-arm", choices=REFINED_ARMS, default=None,
                   help="confirm this arm instead of the screen rule's choice; recorded as a choice made outside the "
                        "rule (benchmarks/README 5e says which and why, written before the confirmation)")
    p.add_argument("--only-arms", nargs="+", default=None,
                   help="refine and evaluate only these arms of the phase (pretrained, energy_force_only and refined "
                        "arms), so that several processes can share a phase; a run without it combines the results")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: pool the finished evaluations of --phase into the results file (marked partial)")
    p.add_argument("--refine-only", action="store_true",
                   help="only the refinements of --arms (a second process can refine while the first evaluates)")
    p.add_argument("--converged-replicas", type=int, default=48, help="replicas per evaluation group, converged phase")
    p.add_argument("--converge-patience", type=int, default=100, help="L-BFGS iterations without a better validation "
                                                                       "force MAE before the converged start stops")
    p.add_argument("--converge-max-iterations", type=int, default=3000)
    p.add_argument("--refinement-seeds", type=int, nargs="+", default=None,
                   help="with --refine-only: only these refinements (k), so two processes can share a phase's arm")
    p.add_argument("--groups", type=int, nargs="+", default=None,
                   help="with --only-arms: evaluate only these groups (indices), so two processes can share an arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every stage")
    args = p.parse_args(argv)
    if args.refinement_seeds is not None and not args.refine_only:
        p.error("--refinement-seeds needs --refine-only (a combining run evaluates every refinement)")
    if args.groups is not None and args.only_arms is None:
        p.error("--groups needs --only-arms (a combining run evaluates every group)")
    # What stability_controlled's data and pre-training stages read.
    args.frames, args.eval_frames, args.rare_frames, args.pretrain_min, args.data = 3000, 500, 400, 4.0, None
    if args.quick:
        args.frames, args.eval_frames, args.rare_frames, args.pretrain_min = 120, 30, 40, 0.05
        args.temperature = args.screen_temperature = args.hot_temperature = 500.0
        args.group_replicas, args.screen_ps, args.confirm_ps, args.confirm_groups = 4, 0.1, 0.1, 2
        args.screen_refinements, args.confirm_refinements, args.bank_epochs, args.paper_epochs = 1, 2, 2, 2
        args.converged_replicas, args.converge_patience, args.converge_max_iterations = 4, 10, 20
    return args


# --- the arms ------------------------------------------------------------------------------
def engine_config(temperature_K: float):
    from openmm_stable.engine import EngineConfig

    return EngineConfig(temperature_K=temperature_K, timestep_fs=0.5, integrator="langevin", friction_per_ps=1.0)


def arm_config(arm: str, seed: int, args):
    """The StableConfig of a refined arm (README 5e); the bank arms run failure_bank's
    defaults, bank_random / bank_hr change only its direction."""
    from openmm_stable.training.stable import StableConfig

    if arm == "paper":
        return StableConfig.paper(n_replicas=8, epoch_ps=0.5, frame_interval_ps=0.025, max_epochs=args.paper_epochs,
                                  observable={"name": "hr", "r_max": 6.0, "n_bins": 120}, seed=seed,
                                  engine=engine_config(args.temperature))
    bank = {"training_temperature_K": args.hot_temperature} if arm != "bank" else {}
    if arm == "bank_random":
        bank["direction"] = "random"
    if arm == "bank_hr":
        bank["direction"] = "hr"
    if args.quick:
        bank.update(min_failures=1, min_excursion_frames=1, min_failures_with_excursions=1, max_steps=1,
                    constraint_frames=8, background_frames=8, hinge_target=0.0)
    return StableConfig(learning="failure_bank", n_replicas=args.group_replicas, epoch_ps=0.25,
                        frame_interval_ps=0.025, equilibration_ps=0.0, max_epochs=args.bank_epochs, seed=seed,
                        observable={"name": "hr", "r_max": 6.0, "n_bins": 120},
                        bond_threshold=0.02 if args.quick else 0.25, failure_bank=bank,
                        engine=engine_config(args.temperature))


def refined(start_file: Path, arm: str, k: int, train, pool, work: Path, args):
    """Refinement k of `arm` (seed args.seed + k), from the start's model FILE (its record's
    split keeps pre-training's held-out frames out of the regulariser); resumed if killed."""
    from openmm_stable.models import load_model
    from openmm_stable.training.stable import refine

    out = work / f"refine_{arm}_seed{k}"
    if (out / "model.pt").exists() and (out / "metrics.json").exists():
        return load_model(out / "model.pt"), json.loads((out / "metrics.json").read_text())
    return refine(start_file, train, arm_config(arm, args.seed + k, args), out, reference=pool,
                  resume=(out / "checkpoint.pt").exists(), progress=True)


def optimizer_iterations(summary: dict, folder: Path) -> int:
    """Parameter updates a bank refinement made: its steps plus every L-BFGS restore iteration."""
    bank = summary.get("failure_bank", {})
    log = folder / "bank_log.csv"
    restores = 0
    if log.exists():
        with open(log) as handle:
            restores = sum(int(float(r["restore_iterations"] or 0)) for r in csv.DictReader(handle))
    return int(bank.get("steps", 0)) + restores


def lbfgs_energy_force(model, frames, iterations: int, seed: int, after_iteration=None) -> None:
    """`iterations` full-batch L-BFGS iterations on the energy/force loss of pre-training over
    `frames`; `after_iteration(i)` may return True to stop early."""
    import torch

    from openmm_stable.training.batching import FrameTensors
    from openmm_stable.training.learning import EnergyForceRegulariser

    regulariser = EnergyForceRegulariser(FrameTensors(frames), 1.0, 100.0, None, np.random.default_rng(seed))
    lbfgs = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=1, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad(set_to_none=False)
        return regulariser.backward(model, 1.0, whole_training_set=True)

    for i in range(iterations):
        lbfgs.step(closure)
        if after_iteration is not None and after_iteration(i + 1):
            break


def save_like(model, record, out: Path, **extra) -> None:
    from openmm_stable.models import save_model

    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out, atomic_numbers=record.atomic_numbers, kind="refined",
               dataset_fingerprint=record.dataset_fingerprint, split=record.payload["split"],
               bonds=record.payload.get("bonds"), **extra)


def energy_force_only(start_file: Path, matched: str, k: int, iterations: int, work: Path, args):
    """Plain extra training, the control: `iterations` L-BFGS iterations on the energy/force
    loss over the start's own training frames (its record's split), as many as refinement
    k of the `matched` arm updated the weights."""
    from openmm_stable.data import load_dataset
    from openmm_stable.models import load_model, read_model_record

    out = work / f"control_{matched}_seed{k}" / "model.pt"
    if out.exists():
        return load_model(out)
    record = read_model_record(start_file)
    train = load_dataset(args.data_dir / "rare_train.npz").subset(record.payload["split"]["train"])
    model = load_model(start_file)
    lbfgs_energy_force(model, train, iterations, args.seed + k)
    save_like(model, record, out, control={"lbfgs_iterations": iterations})
    return model


def converged_start(start_file: Path, work: Path, args):
    """The C3 start trained to convergence (README 5e, third part): full-batch L-BFGS on its
    own training frames from where the time-budgeted Adam run stopped, the validation frames
    of its record deciding when to stop (no improvement of the validation force MAE in
    `converge_patience` iterations) and which iterate to keep. `curve.csv` is its learning
    curve. The test frames stay unseen."""
    import copy

    from openmm_stable.data import load_dataset
    from openmm_stable.models import load_model, read_model_record
    from openmm_stable.training.batching import FrameTensors, evaluate, refit_energy_shift

    folder = work / "converged_start"
    out = folder / "model.pt"
    if out.exists():
        return load_model(out), out
    record = read_model_record(start_file)
    data = load_dataset(args.data_dir / "rare_train.npz")
    train, val = data.subset(record.payload["split"]["train"]), FrameTensors(data.subset(record.payload["split"]["val"]))
    train_tensors = FrameTensors(train)
    model = load_model(start_file)
    best = {"val": evaluate(model, val)["force_mae_meV_per_A"], "iteration": 0, "state": copy.deepcopy(model.state_dict())}
    rows = [(0, evaluate(model, train_tensors)["force_mae_meV_per_A"], best["val"])]
    every = 10

    def after_iteration(i: int) -> bool:
        if i % every:
            return False
        refit_energy_shift(model, train_tensors)
        val_mae = evaluate(model, val)["force_mae_meV_per_A"]
        rows.append((i, evaluate(model, train_tensors)["force_mae_meV_per_A"], val_mae))
        print(f"converged start: iteration {i}: train force MAE {rows[-1][1]:.2f}, validation {val_mae:.2f} meV/A",
              flush=True)
        if val_mae < best["val"]:
            best.update(val=val_mae, iteration=i, state=copy.deepcopy(model.state_dict()))
        return i - best["iteration"] >= args.converge_patience

    lbfgs_energy_force(model, train, args.converge_max_iterations, args.seed, after_iteration)
    model.load_state_dict(best["state"])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "curve.csv", "w") as handle:
        handle.write("iteration,train_force_mae_meV_per_A,val_force_mae_meV_per_A\n")
        handle.writelines(f"{i},{t:.4f},{v:.4f}\n" for i, t, v in rows)
    save_like(model, record, out, converged={"lbfgs_iterations_kept": best["iteration"],
                                             "lbfgs_iterations_run": rows[-1][0], "val_force_mae": best["val"]})
    return model, out


# --- evaluation --------------------------------------------------------------------------------
def evaluate(model, name: str, group: int, seed: int, held_out, pool, reference_b, temperature_K: float,
             horizon_ps: float, replicas: int, work: Path) -> dict:
    """One renewal evaluation group: `replicas` replicas from held-out frames (seed
    `seed`), failures and exposure, test force MAE, h(r) with the reference noise band."""
    from openmm_stable.report import load_metrics
    from openmm_stable.simulate import SimulationConfig, simulate

    out = work / f"eval_{name}_g{group}"
    if not (out / "metrics.json").exists():
        config = SimulationConfig(n_replicas=replicas, time_ps=horizon_ps, check_interval_ps=0.05,
                                  stability="bonds", bond_threshold=0.5, renewal=True, seed=seed,
                                  vacf_interval_ps=None, engine=engine_config(temperature_K))
        simulate(model, held_out, config, out, reference=pool, test_set=held_out, progress=True,
                 resume=(out / "progress.json").exists(), reference_b=reference_b)
    return load_metrics(out)


def pooled(groups: list) -> dict:
    failures = int(sum(m["failures"] for m in groups))
    exposure = float(sum(m["replica_ps"] for m in groups))
    hr = [m.get("hr_mae_occupied") for m in groups if m.get("hr_mae_occupied") is not None]
    noise = [m.get("hr_noise_mae") for m in groups if m.get("hr_noise_mae") is not None]
    return {"failures": failures, "replica_ps": exposure, "failure_rate_per_ps": failures / exposure,
            "force_mae_meV_per_A": float(np.mean([m["force_mae_meV_per_A"] for m in groups])),
            "force_mae_per_group": [m["force_mae_meV_per_A"] for m in groups],
            "hr_mae": float(np.mean(hr)) if hr else None, "hr_noise_mae": float(np.mean(noise)) if noise else None,
            "groups": len(groups)}


def ratio(a: dict, b: dict) -> dict:
    from openmm_stable.statistics import rate_ratio_test

    test = rate_ratio_test(a["failures"], a["replica_ps"], b["failures"], b["replica_ps"])
    return {"estimate": test["estimate"], "lower95": test["lower95"], "upper95": test["upper95"], "p": test["p"]}


def run_phase(phase: str, start, start_file, train, pool, held_out, reference_b, work: Path, timings, args,
              save=lambda result: None) -> dict:
    """Refine (n refinements per arm), then evaluate every model on its group (pretrained
    on all groups), pooled per arm, with rate ratios against the start and the controls;
    `save(partial result)` after every evaluated arm (a killed run keeps its numbers)."""
    screen = phase == "screen"
    n = args.screen_refinements if screen else args.confirm_refinements
    temperature = args.screen_temperature if screen else args.temperature
    horizon = args.screen_ps if screen else args.confirm_ps
    first_seed = {"screen": 100, "confirm": 200, "converged": 300}[phase]
    seeds = [first_seed + g for g in range(n if screen else args.confirm_groups)]
    replicas = args.converged_replicas if phase == "converged" else args.group_replicas
    arms = list(args.arms) if screen else [args.chosen, "bank_random"]
    wanted = (lambda arm: True) if args.only_arms is None else (lambda arm: arm in args.only_arms)
    models: dict = {"pretrained": [start] * len(seeds)} if wanted("pretrained") else {}
    matched = "bank_hot" if screen else args.chosen  # the control has as many updates as this arm
    steps: dict = {}
    for arm in arms:
        if not (wanted(arm) or (wanted(CONTROL_ARM) and arm == matched)):
            continue
        stage(f"{phase}: refine {arm} ({n} refinements)")
        ks = [k for k in range(n) if args.refinement_seeds is None or k in args.refinement_seeds]
        runs = [timings(f"{phase}_refine_{arm}_{k}", lambda k=k: refined(start_file, arm, k, train, pool, work, args))
                for k in ks]
        if wanted(arm):
            models[arm] = [model for model, _ in runs]
        if arm.startswith("bank"):
            steps[arm] = [optimizer_iterations(s, work / f"refine_{arm}_seed{k}") for k, (_, s) in enumerate(runs)]
    if args.refine_only:
        return {"refined_only": arms}
    if matched in steps and wanted(CONTROL_ARM):
        stage(f"{phase}: energy/force-only control matched to {matched}")
        models[CONTROL_ARM] = [energy_force_only(start_file, matched, k, steps[matched][k], work, args)
                               for k in range(n)]
    result: dict = {"temperature_K": temperature, "horizon_ps": horizon, "seeds": seeds, "arms": {},
                    "optimizer_iterations": steps, "control_matched_to": matched}
    for arm, arm_models in models.items():
        stage(f"{phase}: evaluate {arm}")
        groups = [evaluate(arm_models[g % len(arm_models)], f"{phase}_{arm}", g, seed, held_out, pool, reference_b,
                           temperature, horizon, replicas, work) for g, seed in enumerate(seeds)
                  if args.groups is None or g in args.groups]
        result["arms"][arm] = {**pooled(groups), "refinements": 0 if arm == "pretrained" else len(arm_models)}
        result["rate_ratio"] = rate_ratios(result["arms"])
        if args.only_arms is None:  # a process of a shared phase leaves the results file to the combining run
            save(result)
    return result


def collect(phase: str, work: Path, args) -> dict:
    """The evaluations of `phase` finished so far, pooled per arm (nothing is run): what a
    session that ends mid-phase leaves in the results file, marked partial."""
    from openmm_stable.report import load_metrics

    groups: dict = {}
    for folder in sorted(work.glob(f"eval_{phase}_*_g*")):
        if (folder / "metrics.json").exists():
            arm = folder.name[len(f"eval_{phase}_"):].rsplit("_g", 1)[0]
            groups.setdefault(arm, []).append(load_metrics(folder))
    arms = {arm: {**pooled(runs), "groups_done": len(runs)} for arm, runs in groups.items()}
    return {"arms": arms, "rate_ratio": rate_ratios(arms) if "pretrained" in arms else {}, "partial": True}


def rate_ratios(arms: dict) -> dict:
    return {f"{arm}_vs_{other}": ratio(arms[arm], arms[other]) for arm in arms if arm != "pretrained"
            for other in ("pretrained", CONTROL_ARM, "bank_random", "bank_hr") if other in arms and other != arm}


def choose(screen: dict) -> tuple:
    """The screen's rule (`CRITERIA`): (arm or None, why)."""
    rr = screen["rate_ratio"]
    candidates = []
    for arm in screen["arms"]:
        if arm in ("pretrained", CONTROL_ARM, "bank_random", "bank_hr"):
            continue
        vs = rr[f"{arm}_vs_pretrained"]["estimate"]
        beats = all(screen["arms"][arm]["failure_rate_per_ps"] < screen["arms"][c]["failure_rate_per_ps"]
                    for c in ("bank_random", "bank_hr") if c in screen["arms"])
        if vs < 0.5 and beats:
            candidates.append((screen["arms"][arm]["failure_rate_per_ps"], arm))
    if not candidates:
        return None, "no refined arm had a screen rate ratio below 0.5 against pretrained and below both direction controls"
    return min(candidates)[1], "lowest pooled screen failure rate among the qualifying arms"


def verdict(confirm: dict, chosen: str) -> dict:
    arms, rr = confirm["arms"], confirm["rate_ratio"]
    checks = {f"rate ratio vs {other}": rr[f"{chosen}_vs_{other}"]["estimate"] <= CRITERIA["rate_ratio_at_most"]
              and rr[f"{chosen}_vs_{other}"]["upper95"] < CRITERIA["upper95_below"]
              for other in CRITERIA["against"] if f"{chosen}_vs_{other}" in rr}
    checks["test force MAE <= 1.05x"] = (arms[chosen]["force_mae_meV_per_A"]
                                         <= CRITERIA["test_force_mae_ratio_at_most"]
                                         * arms["pretrained"]["force_mae_meV_per_A"])
    hr, hr0, noise = arms[chosen]["hr_mae"], arms["pretrained"]["hr_mae"], arms["pretrained"]["hr_noise_mae"]
    checks["h(r) within the noise band"] = None if None in (hr, hr0, noise) else hr <= hr0 + noise
    return {"checks": checks, "passed": all(v is True for v in checks.values())}


def plot_rates(section: dict, path: Path) -> None:
    """Failures per replica-ps of every arm with its exact (Garwood) 95 % interval, one
    panel per phase: the endpoint, as people would rather look at it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    phases = [phase for phase in ("screen", "confirm", "converged") if phase in section and "arms" in section[phase]]
    if not phases:
        return
    fig, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 3.6), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        arms = section[phase]["arms"]
        names = list(arms)
        rates = np.array([arms[a]["failure_rate_per_ps"] for a in names])
        low = np.array([stats.chi2.ppf(0.025, 2 * arms[a]["failures"]) / 2 if arms[a]["failures"] else 0.0
                        for a in names]) / np.array([arms[a]["replica_ps"] for a in names])
        high = np.array([stats.chi2.ppf(0.975, 2 * arms[a]["failures"] + 2) / 2 for a in names]) / \
            np.array([arms[a]["replica_ps"] for a in names])
        ax.bar(range(len(names)), rates, yerr=[rates - low, high - rates], capsize=4, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set(ylabel="failures per replica-ps", title=f"{phase}: {section[phase]['temperature_K']:g} K, "
                                                        f"{arms['pretrained']['replica_ps']:g} replica-ps per arm")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from openmm_stable.data import load_dataset, save_dataset
    from openmm_stable.data.generate import generate_xtb_dataset

    work, results_path, timings = stability_controlled.workdir_and_results(args)
    args.data_dir = work  # the data files; a phase's runs may sit in a folder below

    stage("reference data (the C3 pool) and a second independent chain for the h(r) noise band")
    data = timings("generate", lambda: stability_controlled.reference_data(args, work))
    chain_b = work / "ethanol_xtb_b.npz"
    reference_b = load_dataset(chain_b) if chain_b.exists() else timings("generate_b", lambda: generate_xtb_dataset(
        "ethanol", chain_b, n_frames=args.frames - args.eval_frames, temperature=args.temperature, stride=10,
        seed=args.seed + 1, progress=True, resume=(chain_b.parent / (chain_b.name + ".partial.extxyz")).exists()))
    n = len(data)
    pool, held_out = data.subset(np.arange(n - args.eval_frames)), data.subset(np.arange(n - args.eval_frames, n))
    order = np.random.default_rng(args.seed).permutation(len(pool))
    train = pool.subset(np.sort(order[:args.rare_frames]))
    if not (work / "rare_train.npz").exists():
        save_dataset(train, work / "rare_train.npz")

    stage("the C3 start (SchNet-small, 400 frames)")
    train = load_dataset(work / "rare_train.npz")  # the file the start's record fingerprints
    start = timings("pretrain_rare", lambda: stability_controlled.pretrained("rare", train, args.pretrain_min, work,
                                                                             args))
    start_file = work / "pretrain_rare" / "model.pt"

    payload = json.loads(results_path.read_text()) if results_path.exists() else {}
    section = payload.get("rare_renewal", {})
    section.update({"temperature_K": args.temperature, "criteria": CRITERIA, "quick": args.quick,
                    "start": {"frames": len(train), "architecture": "schnet-small"}, "machine": machine_info()})
    if args.collect:
        phases = ["screen", "confirm", "converged"] if args.phase == "all" else [args.phase]
        for phase in phases:
            if phase == "confirm" and args.chosen_arm is not None:
                section["confirmed_arm_chosen_outside_the_rule"] = section["confirmed_arm"] = args.chosen_arm
            section[phase] = {**section.get(phase, {}),
                              **collect(phase, work / "converged" if phase == "converged" else work, args)}
        payload["rare_renewal"] = section
        write_json(results_path, payload)
        print(json.dumps({phase: {a: (v["failures"], v["replica_ps"], v["groups_done"])
                                  for a, v in section[phase]["arms"].items()} for phase in phases}))
        return section

    def save(phase: str):
        def write(result: dict) -> None:
            section[phase] = {**result, "partial": True}
            payload["rare_renewal"] = section
            write_json(results_path, payload)
        return write

    if args.phase in ("screen", "all"):
        section["screen"] = run_phase("screen", start, start_file, train, pool, held_out, reference_b, work,
                                      timings, args, save=save("screen"))
        if args.refine_only or args.only_arms is not None:
            print("done; a run without --refine-only and --only-arms combines the results")
            return section
        section["chosen_arm"], section["chosen_because"] = choose(section["screen"])
        if args.quick and section["chosen_arm"] is None:  # the smoke run exercises the confirmation too
            section["chosen_arm"], section["chosen_because"] = "bank_hot", "quick smoke run: the rule chose none"
        section.setdefault("passed", False)
        section.setdefault("status", "screened; not yet confirmed")
        payload["rare_renewal"] = section
        write_json(results_path, payload)
    if args.phase in ("confirm", "all"):
        args.chosen = section.get("chosen_arm")
        if args.chosen_arm is not None and args.chosen_arm != args.chosen:
            args.chosen = section["confirmed_arm_chosen_outside_the_rule"] = args.chosen_arm
            section["confirmed_arm"] = args.chosen
        if args.chosen is None:
            print("no arm was chosen by the screen: nothing to confirm")
        else:
            confirm = run_phase("confirm", start, start_file, train, pool, held_out, reference_b, work, timings, args,
                                save=save("confirm"))
            if args.refine_only or args.only_arms is not None:
                print(f"done: {confirm.get('refined_only') or list(confirm['arms'])}; a run without --refine-only "
                      "and --only-arms combines the results")
                return section
            section.update({"arms": confirm["arms"], "rate_ratio": confirm["rate_ratio"], "confirm": confirm})
            section.update(verdict(confirm, args.chosen))
            section["status"] = "confirmed" if section["passed"] else "confirmation missed the pre-registered pass"
    if args.phase in ("converged", "all"):
        args.chosen = args.chosen_arm or section.get("confirmed_arm") or section.get("chosen_arm")
        if args.chosen is None:
            print("no arm was chosen or confirmed: nothing to repeat from the converged start")
        else:
            stage("the C3 start trained to convergence (L-BFGS stopped on its validation frames)")
            folder = work / "converged"
            model, model_file = timings("converged_start", lambda: converged_start(start_file, folder, args))
            result = run_phase("converged", model, model_file, train, pool, held_out, reference_b, folder, timings,
                               args, save=save("converged"))
            if args.refine_only or args.only_arms is not None:
                print("done; a run without --refine-only and --only-arms combines the results")
                return section
            from openmm_stable.models import read_model_record

            result["start"] = read_model_record(model_file).payload.get("converged")
            result.update(verdict(result, args.chosen), arm=args.chosen)
            section["converged"] = result
            # The primary result: the confirmation from a start the control cannot improve by itself.
            section.update({"arms": result["arms"], "rate_ratio": result["rate_ratio"], "checks": result["checks"],
                            "passed": result["passed"], "primary": "converged", "confirmed_arm": args.chosen,
                            "status": "confirmed from the converged start" if result["passed"]
                            else "the converged confirmation missed the pre-registered pass"})
    section["timings_s"] = timings.seconds
    payload["rare_renewal"] = section
    write_json(results_path, payload)
    plot_rates(section, results_path.with_name("rare_renewal_rates.png"))
    print(json.dumps({k: section.get(k) for k in ("chosen_arm", "status", "passed")}, indent=1))
    for phase in ("screen", "confirm", "converged"):
        if phase in section and "arms" in section[phase]:
            for arm, values in section[phase]["arms"].items():
                print(f"{phase:8s} {arm:18s} {values['failures']:4d} failures in {values['replica_ps']:7.1f} replica-ps"
                      f"  rate {values['failure_rate_per_ps']:.4f}/ps  force MAE {values['force_mae_meV_per_A']:.1f}")
    return section


if __name__ == "__main__":
    main()

"""xTB reference data from N independent chains on N Ray workers, written as one file.

`generate_xtb_chains` runs `generate_xtb_dataset` N times at once, one Ray task per chain,
each from the same built structure with its own seed (so each chain equilibrates on its own:
N x ``equilibration_steps`` in all). Chain 0 uses the run's seed itself, so its frames are
those of the one-worker run with that seed; chain c > 0 uses a seed derived from (seed, c)
(`chain_seed`), so runs with different seeds share no chain.

How the chains become one file: chain 0's frames, then chain 1's, ... (concatenated, not
interleaved: each chain stays a time-ordered block). ``metadata["chains"]`` records, per
chain, its seed, its number of frames and the index of its first frame in the file. Times
restart in every chain, so the file is not one trajectory: dynamics comparisons that need
one (`openmm_stable.dynamics.regular_time_step`) see the irregular times and skip it;
static observables (h(r), bond lengths) and energy/force training use all frames.

Resuming: each chain writes its own files (``OUT.chainC-of-N.npz`` and that file's
``.partial.*`` files, exactly as a one-worker run does), so after an interruption
``resume=True`` (``data generate ... --resume``) continues every unfinished chain from its
last frame and keeps the finished ones. The chain files are removed once OUT is written.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import numpy as np

from openmm_stable.data.dataset import QMDataset
from openmm_stable.data.formats import load_dataset, save_dataset
from openmm_stable.data.generate import generate_xtb_dataset, partial_paths
from openmm_stable.distributed.cluster import connect
from openmm_stable.errors import InputError


def chain_seed(seed: int, chain: int) -> int:
    """Chain 0: `seed` (the one-worker run); chain c: a seed drawn from (seed, c)."""
    if chain == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(chain)]).generate_state(1)[0])


def chain_path(out_path, chain: int, chains: int) -> Path:
    """Where chain `chain` of `chains` keeps its frames until OUT is written."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.chain{chain}-of-{chains}{out_path.suffix or '.npz'}")


def chain_frames(n_frames: int, chains: int) -> list[int]:
    """Frames per chain: as equal as can be, the first chains one more."""
    return [len(part) for part in np.array_split(np.arange(n_frames), chains)]


def _run_chain(molecule: str, path: str, n_frames: int, seed: int, resume: bool, settings: dict) -> QMDataset:
    """One chain, in a Ray worker: a finished chain file is read back; an interrupted one is
    resumed; otherwise the chain starts."""
    path = Path(path)
    frames_path, _ = partial_paths(path)
    interrupted = frames_path.exists() and frames_path.stat().st_size > 0
    if path.exists() and not interrupted:
        done = load_dataset(path)
        if done.metadata.get("complete") and len(done) == n_frames:
            return done
    return generate_xtb_dataset(molecule, path, n_frames, seed=seed, resume=resume and interrupted,
                                progress=False, **settings)


def generate_xtb_chains(molecule: str, out_path, n_frames: int, workers: int, seed: int = 0, resume: bool = False,
                        ray_address: Optional[str] = None, progress: bool = True, **settings) -> QMDataset:
    """`n_frames` GFN2-xTB frames from `workers` independent chains run in parallel on Ray
    (one core each); written to `out_path` as one dataset (see module doc). `settings`:
    the other arguments of `generate_xtb_dataset` (temperature, stride, ...)."""
    workers = int(workers)
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        return generate_xtb_dataset(molecule, out_path, n_frames, seed=seed, resume=resume, progress=progress,
                                    **settings)
    if n_frames < workers:
        raise InputError(f"{n_frames} frames from {workers} chains: each chain needs at least one frame")
    out_path = Path(out_path)
    paths = [chain_path(out_path, c, workers) for c in range(workers)]
    interrupted = [p for p in paths if partial_paths(p)[0].exists() and partial_paths(p)[0].stat().st_size > 0]
    if interrupted and not resume:
        raise InputError(f"{interrupted[0]} exists (an interrupted run); continue it with --resume or delete "
                         f"the {out_path.stem}.chain*-of-{workers}* files")
    if resume and not any(p.exists() for p in paths) and not interrupted and out_path.exists():
        raise InputError(f"nothing to resume: no chain files of a {workers}-worker run next to {out_path} "
                         "(a finished run, or one with another --workers?)")
    ray = connect(ray_address)
    task = ray.remote(num_cpus=1, max_retries=0)(_run_chain)
    sizes, seeds = chain_frames(n_frames, workers), [chain_seed(seed, c) for c in range(workers)]
    t0 = time.perf_counter()
    refs = [task.remote(molecule, str(p), n, s, resume, settings) for p, n, s in zip(paths, sizes, seeds)]
    chains = _gather(ray, refs, paths, progress)
    ds = combine_chains(chains, seeds, str(out_path), time.perf_counter() - t0)
    save_dataset(ds, out_path)
    for p in paths:
        p.unlink(missing_ok=True)
    return ds


def _gather(ray, refs: list, paths: list[Path], progress: bool) -> list[QMDataset]:
    """Every chain's dataset; if one failed, the others still finish (their files are kept),
    then the first failure is raised with the way to continue."""
    from tqdm.auto import tqdm

    index = {ref: c for c, ref in enumerate(refs)}
    results: dict[int, QMDataset] = {}
    errors: dict[int, Exception] = {}
    pending = list(refs)
    with tqdm(total=len(refs), unit="chain", desc="xTB chains", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            c = index[done[0]]
            try:
                results[c] = ray.get(done[0])
            except Exception as err:  # noqa: BLE001 - reported below, after the other chains
                errors[c] = err
            bar.update(1)
    if errors:
        c, err = min(errors.items())
        raise RuntimeError(f"xTB chain {c} failed ({type(err).__name__}: {str(err).strip().splitlines()[-1]}); "
                           f"finished chains and the frames so far are kept in {paths[0].parent}; rerun the same "
                           "command with --resume to continue") from err
    return [results[c] for c in range(len(refs))]


def combine_chains(chains: list[QMDataset], seeds: list[int], source: str, wall_seconds: float) -> QMDataset:
    """The chains as one dataset: concatenated in chain order, `metadata["chains"]` saying
    which frames came from which chain (see module doc)."""
    first = chains[0]
    metadata = dict(first.metadata)
    metadata.pop("timing", None)
    starts = np.concatenate([[0], np.cumsum([len(c) for c in chains])[:-1]])
    metadata.update({
        "seed": int(seeds[0]),
        "chains": [{"chain": c, "seed": int(s), "frames": len(ds), "first_frame": int(start),
                    "resumed": bool(ds.metadata.get("resumed", False))}
                   for c, (ds, s, start) in enumerate(zip(chains, seeds, starts))],
        "combined": "chains concatenated in chain order; times restart in each chain",
        "complete": all(ds.metadata.get("complete", False) for ds in chains),
        "timing": {"wall_seconds_this_run": wall_seconds,
                   "frames_per_second": sum(len(c) for c in chains) / wall_seconds if wall_seconds > 0 else None},
    })
    return dataclasses.replace(
        first,
        positions=np.concatenate([c.positions for c in chains]),
        energies=np.concatenate([c.energies for c in chains]),
        forces=np.concatenate([c.forces for c in chains]),
        velocities=np.concatenate([c.velocities for c in chains]),
        times=np.concatenate([c.times for c in chains]),
        metadata=metadata,
        source=source,
    )

"""Reaching a Ray cluster and sizing the workers on it.

* No address: a local cluster is started inside this process (``ray.init``) with every core
  of this machine, unless Ray is already initialised (then that cluster is used as it is).
* An address (``--ray-address``, e.g. ``HEAD_IP:6379`` after ``ray start --head`` there and
  ``ray start --address=HEAD_IP:6379`` on the other nodes): this process joins it as the driver.
  Every node needs the same Python environment (this package, torch, OpenMM).

Each worker asks Ray for one GPU when it runs on CUDA (Ray then shows it exactly one device)
and for an equal share of the cluster's CPU cores otherwise. Requests the cluster cannot
meet are refused here, before any worker starts: Ray would otherwise keep such a worker
pending forever.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from openmm_stable.errors import InputError

GPU_PLATFORMS = ("CUDA", "OpenCL", "HIP")


def require_ray():
    """The `ray` module, or a clear error naming the extra that installs it."""
    try:
        import ray
    except ImportError as err:
        raise InputError("distributed runs (workers > 1 or a Ray address) need Ray: "
                         "pip install 'openmm-stable[distributed]'") from err
    return ray


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None):
    """Ray, initialised: the cluster at `address`, or a local one in this process with
    `num_cpus` cores (default: all of this machine's). A process that already initialised
    Ray keeps its cluster (then `address` must not name another one)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise InputError(f"cannot join the Ray cluster at {address!r} ({err}); start it with `ray start --head` "
                             "on the head node and `ray start --address=HEAD:PORT` on the others") from err
        return ray
    ray.init(num_cpus=int(num_cpus or _usable_cores()), include_dashboard=False, log_to_driver=True,
             configure_logging=False)
    return ray


def _usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def replica_shares(n_replicas: int, workers: int) -> list[slice]:
    """Contiguous replica ranges, one per worker, sizes differing by at most one (the
    first workers take the extra replicas): replica k's index is the same everywhere."""
    if workers > n_replicas:
        raise InputError(f"{workers} workers for {n_replicas} replicas: each worker needs at least one replica")
    sizes = [len(part) for part in np.array_split(np.arange(n_replicas), workers)]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def worker_resources(ray, workers: int, platform: Optional[str]) -> tuple[str, dict, int]:
    """(OpenMM platform name, Ray resource request per worker, threads per worker).

    `platform` None: CUDA when the cluster has a GPU for every worker, else CPU. A GPU
    platform asked for on a cluster with too few GPUs is an error, as is a CPU request
    that leaves a worker less than a whole core while the cluster could give more."""
    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if platform is None:
        platform = "CUDA" if gpus >= workers else "CPU"
    if platform in GPU_PLATFORMS:
        if gpus < workers:
            raise InputError(f"platform {platform} with {workers} workers needs {workers} GPUs; the Ray cluster has "
                             f"{gpus:g} (resources: {_describe(resources)}). Use --platform CPU, fewer workers, "
                             "or a cluster whose nodes have GPUs")
        return platform, {"num_gpus": 1, "num_cpus": 1}, 1
    if cpus <= 0:
        raise InputError(f"the Ray cluster has no CPU resources ({_describe(resources)})")
    share = cpus / workers
    threads = max(1, int(share))
    return platform, {"num_cpus": float(threads) if share >= 1 else share}, threads


def _describe(resources: dict) -> str:
    keys = ("CPU", "GPU", "memory")
    return ", ".join(f"{k} {resources[k]:g}" for k in keys if k in resources) or "none"

"""Which replica engine a run gets: the one-process `ReplicaEngine` or the Ray
`DistributedReplicaEngine`, chosen here, above both, so that `openmm_stable.engine` never
imports `openmm_stable.distributed` (which builds on it) and Ray is imported only when a run
asks for workers.

>>> engine = create_engine(model, z, 32, EngineConfig(workers=2))   # doctest: +SKIP
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from torch import nn

from openmm_stable.engine import EngineConfig, ReplicaEngine


def uses_workers(config: Optional[EngineConfig]) -> bool:
    """Whether `config` asks for Ray workers (``workers > 1`` or a cluster address)."""
    config = config or EngineConfig()
    return int(config.workers) > 1 or bool(config.ray_address)


def create_engine(model: nn.Module, atomic_numbers: Sequence[int], n_replicas: int,
                  config: Optional[EngineConfig] = None, box_angstrom: Optional[np.ndarray] = None,
                  seed: int = 0):
    """The engine `simulate` and `refine` run on: a `ReplicaEngine` in this process, or, with
    ``config.workers > 1`` or a ``config.ray_address``, the same interface over Ray workers.

    `seed` is the run's one seed (``SimulationConfig.seed`` / ``StableConfig.seed``): it
    seeds the thermostat's random stream and the velocities drawn when none are given."""
    config = config or EngineConfig()
    if uses_workers(config):
        from openmm_stable.distributed import DistributedReplicaEngine

        return DistributedReplicaEngine(model, atomic_numbers, n_replicas, config, box_angstrom, seed=seed)
    return ReplicaEngine(model, atomic_numbers, n_replicas, config, box_angstrom, seed=seed)


__all__ = ["create_engine", "uses_workers"]

"""Replicas beyond one process: the replica engine and QM data generation on a Ray cluster.

`DistributedReplicaEngine` has `ReplicaEngine`'s interface; `openmm_stable.engines.create_engine`
returns it when ``EngineConfig.workers > 1`` or ``EngineConfig.ray_address`` is set, which is
what ``--workers N`` / ``--ray-address ADDR`` on `simulate` and `refine` do. Ray comes with
the ``distributed`` extra (``pip install 'openmm-stable[distributed]'``); nothing here
imports it before it is needed.
"""
from openmm_stable.distributed.cluster import connect, replica_shares, require_ray
from openmm_stable.distributed.engine import DistributedReplicaEngine, WorkerLostError, WorkerTimeoutError

__all__ = ["DistributedReplicaEngine", "WorkerLostError", "WorkerTimeoutError", "connect", "replica_shares",
           "require_ray"]

"""The Ray actor of the distributed engine: one ordinary `ReplicaEngine` in a worker process.

A worker owns a contiguous share of the replicas (one OpenMM Context) and does exactly
what the driver asks, nothing on its own: every state it holds can be rebuilt from what
the driver kept (the states at the last frame, the Nose-Hoover chain states serialised
with them, the weights then in force, and the calls made since), which is how a worker
that died is brought back (`openmm_stable.distributed.engine`).

The class is plain Python; `remote_worker_class` wraps it for Ray when Ray is there, so
importing this module does not need Ray.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
import torch

from openmm_stable.engine import EngineConfig, ReplicaEngine


class ReplicaWorker:
    """One worker's replicas. States cross in Angstrom and Angstrom/ps, (R_w, N, 3) float64."""

    def __init__(self, model, atomic_numbers, n_replicas: int, config: dict, box_angstrom: Optional[np.ndarray],
                 threads: int):
        """`model`: the model, or a one-element list holding its object-store reference.

        A failure here (a model the worker cannot unpickle or script, a platform it lacks)
        is kept and reported by `ready`, word for word, rather than left to Ray's traceback."""
        self.error: Optional[str] = None
        try:
            self._start(model, atomic_numbers, n_replicas, config, box_angstrom, threads)
        except Exception as err:  # noqa: BLE001 - reported by ready(); the driver raises it
            text = str(err).split("\ntraceback:")[0].strip()  # Ray's own errors append a traceback
            self.error = f"{type(err).__name__}: {text}"
            if "No module named" in text:
                self.error += " (is the model's code installed on every node of the cluster?)"

    def _start(self, model, atomic_numbers, n_replicas, config, box_angstrom, threads) -> None:
        if isinstance(model, list):
            import ray

            model = ray.get(model[0])
        threads = max(1, int(threads))
        # Before any Context exists: a worker uses its share of the cores, not all of them
        # (two workers each running one thread per core slow each other down 10-30x).
        torch.set_num_threads(threads)
        import openmm

        if config.get("platform") in (None, "CPU"):
            openmm.Platform.getPlatformByName("CPU").setPropertyDefaultValue("Threads", str(threads))
        self.model = model
        config = dict(config)
        seed = config.pop("seed")
        self.engine = ReplicaEngine(model, atomic_numbers, n_replicas, EngineConfig(**config), box_angstrom, seed=seed)
        self.nose_hoover = self.engine.config.integrator == "nose-hoover"

    def ready(self) -> dict:
        """Where the worker runs, or {"error": why it could not start}."""
        import socket

        if self.error is not None:
            return {"error": self.error, "pid": os.getpid(), "host": socket.gethostname()}
        return {"pid": os.getpid(), "host": socket.gethostname(), "platform": self.engine.platform_name,
                "replicas": self.engine.n_replicas, "threads": torch.get_num_threads()}

    # --- state -----------------------------------------------------------------------------
    def thermostats(self) -> Optional[list[str]]:
        """The Nose-Hoover chain states of the Contexts (serialised OpenMM States holding only
        integrator parameters, a few kB); None for Langevin, whose state is its random stream."""
        if not self.nose_hoover:
            return None
        import openmm

        return [openmm.XmlSerializer.serialize(ctx.getState(integratorParameters=True))
                for ctx in self.engine._contexts]

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, Optional[list[str]]]:
        positions, velocities = self.engine.get_states()
        return positions, velocities, self.thermostats()

    def set_states(self, positions: np.ndarray, velocities: np.ndarray) -> None:
        self.engine.set_states(positions, velocities)

    def restore(self, positions: np.ndarray, velocities: np.ndarray, thermostats: Optional[list[str]]) -> None:
        """Back to a snapshot: states, and the thermostat chains as they were then (None:
        the fresh chains that `set_states` gives)."""
        import openmm

        self.engine.set_states(positions, velocities)
        for ctx, xml in zip(self.engine._contexts, thermostats or []):
            ctx.setState(openmm.XmlSerializer.deserialize(xml))

    def reset_replicas(self, replicas: np.ndarray, positions: np.ndarray, velocities: np.ndarray) -> None:
        self.engine.reset_replicas(replicas, positions, velocities)

    # --- dynamics and model ----------------------------------------------------------------
    def step(self, n_steps: int) -> None:
        self.engine.step(n_steps)

    def run_frame(self, n_steps: int, velocity_steps: Optional[int]):
        """Step one frame; return its snapshot and, with `velocity_steps`, the velocities
        every `velocity_steps` steps (the last one is the frame's)."""
        series = []
        if velocity_steps:
            for _ in range(n_steps // velocity_steps):
                self.engine.step(velocity_steps)
                if len(series) < n_steps // velocity_steps - 1:
                    series.append(self.engine.get_states()[1])
        else:
            self.engine.step(n_steps)
        positions, velocities, thermostats = self.snapshot()
        if velocity_steps:
            series.append(velocities)
        return positions, velocities, thermostats, series

    def update_weights(self, state: dict) -> None:
        """New weights (a state dict of arrays, the one object the driver put in the store)."""
        self.model.load_state_dict({k: torch.tensor(v) for k, v in state.items()})  # copies: store arrays are read-only
        self.engine.update_model(self.model)

    def replace_model(self, model) -> None:
        """Another model object altogether (`update_model` with a different architecture)."""
        self.model = model
        self.engine.update_model(model)

    def potential_energies(self) -> np.ndarray:
        return self.engine.potential_energies()


def engine_config_dict(config: EngineConfig, platform: str, seed: int) -> dict:
    """The settings a worker's own engine gets: the run's, on one platform, in this process,
    plus the seed of its first replica (popped by the worker: `ReplicaEngine` takes it as
    an argument) (so a per-replica layout seeds Context k with seed + k, as
    one process does)."""
    return {**dataclasses.asdict(config), "platform": platform, "workers": 1, "ray_address": None, "seed": seed}


_REMOTE = None


def remote_worker_class():
    """`ReplicaWorker` as a Ray actor class (made once)."""
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(ReplicaWorker)
    return _REMOTE

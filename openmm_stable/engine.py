"""Replica engine: R copies of one molecule (or box) simulated by OpenMM.

By default all replicas live in ONE Context as non-interacting copies, and one batched
TorchForce evaluates them in a single call (the fast path). ``layout="per-replica"``
gives each replica its own Context: the slow baseline the benchmark compares with.
Positions and velocities cross this boundary in Angstrom and Angstrom/ps as (R, N, 3).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from openmm_stable.allocator import keep_freed_memory
from openmm_stable.errors import InputError
from openmm_stable.export import make_torch_force, script_force_module
from openmm_stable.models.base import check_cutoff_fits_box
from openmm_stable.temperature import FALLBACK_TEMPERATURE_K
from openmm_stable.units import BOLTZMANN_EV_PER_K, EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM

INTEGRATORS = ("langevin", "nose-hoover")
LAYOUTS = ("batched", "per-replica")


@dataclasses.dataclass
class EngineConfig:
    # None: the dataset's sampling temperature, settled by `simulate`/`refine` through
    # `openmm_stable.temperature`; an engine built directly with None runs at 500 K.
    temperature_K: Optional[float] = None
    timestep_fs: float = 0.5
    integrator: str = "langevin"
    friction_per_ps: float = 1.0  # Langevin friction
    collision_frequency_per_ps: float = 10.0  # Nose-Hoover thermostat coupling, 1/tau
    platform: Optional[str] = None  # None: CUDA when present, else CPU
    layout: str = "batched"
    dtype: str = "float32"
    # On CPU platforms, keep freed memory in the process (`openmm_stable.allocator`):
    # page faults otherwise take 30-50 % of a step.
    keep_freed_memory: bool = True
    # Replicas split over this many Ray worker processes (`openmm_stable.distributed`, chosen by
    # `openmm_stable.engines.create_engine`);
    # 1: one engine in this process. `ray_address` joins an existing Ray cluster.
    workers: int = 1
    ray_address: Optional[str] = None

    def __post_init__(self) -> None:
        if int(self.workers) < 1:
            raise InputError(f"engine workers must be >= 1, got {self.workers!r}")
        if self.integrator not in INTEGRATORS:
            raise InputError(f"unknown integrator {self.integrator!r}; known: {', '.join(INTEGRATORS)}")
        if self.layout not in LAYOUTS:
            raise InputError(f"unknown layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
        if (self.temperature_K is not None and not self.temperature_K > 0) or not self.timestep_fs > 0:
            raise InputError("temperature_K and timestep_fs must be positive")
        if not isinstance(self.keep_freed_memory, bool):
            raise InputError(f"keep_freed_memory must be true or false, got {self.keep_freed_memory!r}")

    @property
    def timestep_ps(self) -> float:
        return self.timestep_fs * 1e-3


def default_platform_name() -> str:
    """CUDA when OpenMM has it and a GPU answers, else CPU."""
    import openmm

    names = {openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())}
    if "CUDA" in names and torch.cuda.is_available():
        return "CUDA"
    return "CPU"


def masses_amu(atomic_numbers: Sequence[int]) -> np.ndarray:
    from openmm import app, unit

    return np.array([app.Element.getByAtomicNumber(int(z)).mass.value_in_unit(unit.dalton) for z in atomic_numbers])


def maxwell_boltzmann(masses: np.ndarray, temperature_K: float, n_replicas: int, seed: int) -> np.ndarray:
    """Velocities (R, N, 3) in Angstrom/ps; replica k draws from its own stream (seed, k),
    so its velocities do not depend on how many replicas run beside it."""
    kT_kj = BOLTZMANN_EV_PER_K * temperature_K * EV_IN_KJ_PER_MOL  # kJ/mol
    sigma_nm_ps = np.sqrt(kT_kj / masses)[:, None]
    out = np.empty((n_replicas, masses.size, 3))
    for k in range(n_replicas):
        rng = np.random.default_rng([seed, k])
        v = rng.standard_normal((masses.size, 3)) * sigma_nm_ps
        v -= (masses[:, None] * v).sum(0) / masses.sum()  # no drift of the centre of mass
        out[k] = v * NM_IN_ANGSTROM
    return out


@dataclasses.dataclass
class CheckedFrame:
    """One frame of `ReplicaEngine.run_checked`: states (R, N, 3), the criterion's value per
    replica and which replicas are unstable (threshold crossed or non-finite)."""

    index: int
    positions: np.ndarray
    velocities: np.ndarray
    deviations: np.ndarray
    unstable: np.ndarray


def checked_frame(index: int, positions: np.ndarray, velocities: np.ndarray, criterion) -> CheckedFrame:
    """Frame `index` with the criterion applied (a non-finite position counts as unstable);
    one rule for every engine's `run_checked`."""
    deviations = criterion(torch.as_tensor(positions))
    unstable = criterion.unstable(deviations).numpy() | ~np.isfinite(positions).all(axis=(1, 2))
    return CheckedFrame(index, positions, velocities, deviations.numpy(), unstable)


def kinetic_temperature(masses_amu_: np.ndarray, velocities: np.ndarray) -> np.ndarray:
    """Instantaneous kinetic temperature (K) per replica from (R, N, 3) Angstrom/ps."""
    v_nm = np.asarray(velocities) / NM_IN_ANGSTROM
    ke_kj = 0.5 * (masses_amu_[None, :, None] * v_nm**2).sum(axis=(1, 2))
    return 2 * ke_kj / (3 * masses_amu_.size * BOLTZMANN_EV_PER_K * EV_IN_KJ_PER_MOL)


def set_replica_system(engine, model: nn.Module, atomic_numbers: Sequence[int], n_replicas: int,
                       config: Optional[EngineConfig], box_angstrom: Optional[np.ndarray]) -> None:
    """The settings every engine (this one and the distributed one) checks and keeps the same
    way: config (None temperature -> the fallback), atomic numbers, replica count, box, masses."""
    engine.config = config or EngineConfig()
    if engine.config.temperature_K is None:
        engine.config = dataclasses.replace(engine.config, temperature_K=FALLBACK_TEMPERATURE_K)
    engine.atomic_numbers = np.asarray(atomic_numbers, dtype=np.int64)
    engine.n_atoms = int(engine.atomic_numbers.size)
    engine.n_replicas = int(n_replicas)
    if engine.n_replicas < 1:
        raise InputError("n_replicas must be at least 1")
    engine.box_angstrom = None if box_angstrom is None else np.asarray(box_angstrom, dtype=float)
    check_cutoff_fits_box(model, engine.box_angstrom)
    engine.masses = masses_amu(engine.atomic_numbers)


class ReplicaEngine:
    """Runs R replicas of a model through OpenMM and hands states back as arrays.

    >>> engine = ReplicaEngine(model, atomic_numbers, n_replicas=8, config=EngineConfig())  # doctest: +SKIP
    >>> engine.set_states(start_positions)            # (R, N, 3) Angstrom; velocities drawn at T
    >>> engine.step(200)
    >>> pos, vel = engine.get_states()                 # (R, N, 3) Angstrom, Angstrom/ps
    """

    def __init__(self, model: nn.Module, atomic_numbers: Sequence[int], n_replicas: int,
                 config: Optional[EngineConfig] = None, box_angstrom: Optional[np.ndarray] = None,
                 seed: int = 0):
        import openmm

        set_replica_system(self, model, atomic_numbers, n_replicas, config, box_angstrom)
        self.seed = int(seed)
        self.platform_name = self.config.platform or default_platform_name()
        self.platform = openmm.Platform.getPlatformByName(self.platform_name)
        if self.config.keep_freed_memory and self.platform_name in ("CPU", "Reference"):
            keep_freed_memory()
        per_block = self.n_replicas if self.config.layout == "batched" else 1
        self.block_size = per_block
        self.n_blocks = self.n_replicas // per_block
        self.steps_done = 0
        self._contexts = []
        self._systems = []
        module = self._script(model)
        for block in range(self.n_blocks):
            system = self._build_system(module)
            integrator = self._build_integrator(seed=self.seed + block)
            self._systems.append(system)
            self._contexts.append(openmm.Context(system, integrator, self.platform))
        # Nose-Hoover chain states live in the Context; a fresh Context's (all at rest) is
        # what set_states restores, so a run does not depend on what the engine ran before.
        self._fresh_integrator_states = [ctx.getState(integratorParameters=True) for ctx in self._contexts]

    # --- construction --------------------------------------------------------------------
    def _script(self, model: nn.Module):
        dtype = getattr(torch, self.config.dtype)
        return script_force_module(model, self.atomic_numbers, self.block_size, dtype=dtype, guarded=True)

    def _build_system(self, module):
        import openmm

        system = openmm.System()
        for _ in range(self.block_size):
            for m in self.masses:
                system.addParticle(float(m))
        if self.box_angstrom is not None:
            vectors = [openmm.Vec3(*row) for row in self.box_angstrom / NM_IN_ANGSTROM]
            system.setDefaultPeriodicBoxVectors(*vectors)
        self._model_force_index = system.addForce(self._force(module))
        return system

    def _force(self, module):
        return make_torch_force(module, periodic=self.box_angstrom is not None, outputs_forces=True)

    def _build_integrator(self, seed: int):
        import openmm

        cfg = self.config
        if cfg.integrator == "langevin":
            integrator = openmm.LangevinMiddleIntegrator(cfg.temperature_K, cfg.friction_per_ps, cfg.timestep_ps)
            integrator.setRandomNumberSeed(int(seed) % 2**31 + 1)
            return integrator
        # One thermostat per replica keeps replicas statistically independent.
        integrator = openmm.NoseHooverIntegrator(cfg.timestep_ps)
        for k in range(self.block_size):
            particles = list(range(k * self.n_atoms, (k + 1) * self.n_atoms))
            integrator.addSubsystemThermostat(particles, [], cfg.temperature_K, cfg.collision_frequency_per_ps,
                                              cfg.temperature_K, cfg.collision_frequency_per_ps, 3, 3, 3)
        return integrator

    # --- state ---------------------------------------------------------------------------
    def _blocks(self, array: np.ndarray):
        """Split an (R, N, 3) array into per-Context flat (block*N, 3) arrays in nm."""
        for b in range(self.n_blocks):
            chunk = array[b * self.block_size:(b + 1) * self.block_size]
            yield b, chunk.reshape(-1, 3) / NM_IN_ANGSTROM

    def set_states(self, positions: np.ndarray, velocities: Optional[np.ndarray] = None,
                   seed: Optional[int] = None) -> None:
        """Set every replica: positions (R, N, 3) Angstrom; velocities (R, N, 3) Angstrom/ps,
        or Maxwell-Boltzmann at the target temperature when None."""
        positions = self._check_shape(positions, "positions")
        if velocities is None:
            velocities = maxwell_boltzmann(self.masses, self.config.temperature_K, self.n_replicas,
                                           self.seed if seed is None else seed)
        velocities = self._check_shape(velocities, "velocities")
        for b, pos_nm in self._blocks(positions):
            self._contexts[b].setPositions(pos_nm)
        for b, vel_nm in self._blocks(velocities):
            self._contexts[b].setVelocities(vel_nm)
        self._reset_thermostats()

    def _reset_thermostats(self) -> None:
        if self.config.integrator == "nose-hoover":
            for ctx, fresh in zip(self._contexts, self._fresh_integrator_states):
                ctx.setState(fresh)  # chains only: the State holds no positions or velocities

    def _check_shape(self, array, name: str) -> np.ndarray:
        array = np.asarray(array, dtype=np.float64)
        expected = (self.n_replicas, self.n_atoms, 3)
        if array.shape != expected:
            raise InputError(f"{name}: shape {array.shape}, expected {expected} (replicas, atoms, 3)")
        return array

    def get_states(self) -> tuple[np.ndarray, np.ndarray]:
        """Positions (R, N, 3) Angstrom and velocities (R, N, 3) Angstrom/ps."""
        positions, velocities = [], []
        for ctx in self._contexts:
            state = ctx.getState(getPositions=True, getVelocities=True)
            positions.append(state.getPositions(asNumpy=True)._value)
            velocities.append(state.getVelocities(asNumpy=True)._value)
        shape = (self.n_replicas, self.n_atoms, 3)
        pos = np.concatenate(positions).reshape(shape) * NM_IN_ANGSTROM
        vel = np.concatenate(velocities).reshape(shape) * NM_IN_ANGSTROM
        return pos, vel

    def reset_replicas(self, replicas: Sequence[int], positions: np.ndarray,
                       velocities: Optional[np.ndarray] = None, seed: int = 0) -> None:
        """Put the listed replicas into new states; the others keep theirs exactly.

        positions/velocities: (len(replicas), N, 3). Velocities None: Maxwell-Boltzmann.
        """
        replicas = np.asarray(replicas, dtype=np.int64).reshape(-1)
        if replicas.size == 0:
            return
        pos_all, vel_all = self.get_states()
        positions = np.asarray(positions, dtype=np.float64).reshape(replicas.size, self.n_atoms, 3)
        if velocities is None:
            velocities = maxwell_boltzmann(self.masses, self.config.temperature_K, replicas.size, seed)
        pos_all[replicas] = positions
        vel_all[replicas] = np.asarray(velocities, dtype=np.float64).reshape(replicas.size, self.n_atoms, 3)
        blocks = sorted({int(r) // self.block_size for r in replicas})
        for b in blocks:
            sl = slice(b * self.block_size, (b + 1) * self.block_size)
            self._contexts[b].setPositions(pos_all[sl].reshape(-1, 3) / NM_IN_ANGSTROM)
            self._contexts[b].setVelocities(vel_all[sl].reshape(-1, 3) / NM_IN_ANGSTROM)

    def checkpoint(self) -> list[bytes]:
        """OpenMM's checkpoint of every Context: positions, velocities, thermostat chains and
        the integrator's random state, so a run restored from it continues exactly as the
        uninterrupted one (Langevin included). Only valid on the same platform and machine."""
        return [ctx.createCheckpoint() for ctx in self._contexts]

    def restore_checkpoint(self, checkpoints: Sequence[bytes]) -> None:
        if len(checkpoints) != len(self._contexts):
            raise InputError(f"checkpoint of {len(checkpoints)} OpenMM Contexts for an engine of {len(self._contexts)}")
        for ctx, data in zip(self._contexts, checkpoints):
            ctx.loadCheckpoint(bytes(data))

    # --- dynamics ------------------------------------------------------------------------
    def step(self, n_steps: int) -> None:
        for ctx in self._contexts:
            ctx.getIntegrator().step(int(n_steps))
        self.steps_done += int(n_steps)

    def run_checked(self, n_frames: int, steps_per_frame: int, criterion,
                    on_frame: Callable[["CheckedFrame"], None], velocity_steps: Optional[int] = None,
                    on_velocities: Optional[Callable[[np.ndarray], None]] = None) -> None:
        """The one replica loop of `simulate` and `refine`: step, read the states, check the
        stability criterion (a non-finite position counts as unstable), hand the frame to
        `on_frame`, whose policy may reset replicas (simulate freezes failed ones, refine
        sends them back to an earlier state). With `velocity_steps` (a divisor of
        `steps_per_frame`), velocities are also read that often, for `on_velocities`."""
        if velocity_steps and steps_per_frame % velocity_steps:
            raise InputError(f"velocity_steps {velocity_steps} must divide steps_per_frame {steps_per_frame}")
        for index in range(int(n_frames)):
            if velocity_steps:
                for _ in range(steps_per_frame // velocity_steps):
                    self.step(velocity_steps)
                    positions, velocities = self.get_states()
                    on_velocities(velocities)
            else:
                self.step(steps_per_frame)
                positions, velocities = self.get_states()
            on_frame(checked_frame(index, positions, velocities, criterion))

    @property
    def time_ps(self) -> float:
        return self.steps_done * self.config.timestep_ps

    def update_model(self, model: nn.Module) -> None:
        """Swap in new model weights; every replica keeps its positions and velocities."""
        module = self._script(model)
        for system, ctx in zip(self._systems, self._contexts):
            system.removeForce(self._model_force_index)
            self._model_force_index = system.addForce(self._force(module))
            ctx.reinitialize(preserveState=True)

    def potential_energies(self) -> np.ndarray:
        """Potential energy of each block's Context (kJ/mol); mostly for checks."""
        from openmm import unit

        return np.array([ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                         for ctx in self._contexts])

    def kinetic_temperature(self, velocities: np.ndarray) -> np.ndarray:
        return kinetic_temperature(self.masses, velocities)

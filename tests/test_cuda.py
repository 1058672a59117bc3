"""The engine, `simulate` and a short `refine` on OpenMM's CUDA platform, wherever it is
present (GPU machines with `make install EXTRAS=test,cuda12`); skipped elsewhere. The
same code paths run on the CPU in test_engine, test_simulate and test_refine; here the
assertions are ones that hold on any platform: shapes, finiteness, the replicas' kinetic
temperature near the thermostat's, and a refinement that takes its steps."""
import copy
import json

import numpy as np
import pytest
import torch


def _has_cuda() -> bool:
    import openmm

    names = {openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())}
    return "CUDA" in names and torch.cuda.is_available()


pytestmark = pytest.mark.skipif(not _has_cuda(), reason="OpenMM's CUDA platform or a GPU is not present")


def test_engine_on_cuda(xtb_ethanol, pretrained_ethanol_model):
    from openmm_stable.engine import EngineConfig, ReplicaEngine

    engine = ReplicaEngine(pretrained_ethanol_model, xtb_ethanol.atomic_numbers, 8,
                           EngineConfig(temperature_K=500.0, friction_per_ps=10.0, platform="CUDA"))
    assert engine.platform_name == "CUDA"
    engine.set_states(xtb_ethanol.positions[:8])
    engine.step(400)
    positions, velocities = engine.get_states()
    assert positions.shape == (8, 9, 3) and np.isfinite(positions).all()
    assert 250.0 < engine.kinetic_temperature(velocities).mean() < 750.0


def test_simulate_and_refine_on_cuda(xtb_ethanol, pretrained_ethanol_model, tmp_path):
    from openmm_stable.engine import EngineConfig
    from openmm_stable.simulate import SimulationConfig, simulate
    from openmm_stable.training.stable import StableConfig, refine

    engine = EngineConfig(temperature_K=500.0, friction_per_ps=10.0, platform="CUDA")
    metrics = simulate(pretrained_ethanol_model, xtb_ethanol,
                       SimulationConfig(n_replicas=4, time_ps=0.1, check_interval_ps=0.025, vacf_interval_ps=None,
                                        engine=engine), tmp_path / "sim", reference=xtb_ethanol, progress=False)
    assert metrics["n_replicas"] == 4 and len(metrics["stable_time_ps"]) == 4
    assert json.loads((tmp_path / "sim" / "metrics.json").read_text())["temperature_K"] == 500.0
    config = StableConfig(n_replicas=4, epoch_ps=0.1, frame_interval_ps=0.01, equilibration_ps=0.0, max_epochs=3,
                          bond_threshold=1e-6, unstable_fraction=0.1, observable={"name": "bond_lengths"},
                          engine=engine)
    _, summary = refine(copy.deepcopy(pretrained_ethanol_model), xtb_ethanol, config, tmp_path / "refine",
                        progress=False)
    assert summary["epochs"] == 3 and summary["learning_steps"] == 2

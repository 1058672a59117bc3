"""One config rule for every stage: flags over the YAML file over the defaults; a flag that
was not given (None) never wins."""
import pytest

from openmm_stable.cli import build_parser
from openmm_stable.config import config_from_yaml, load_config, merge_settings
from openmm_stable.errors import InputError
from openmm_stable.simulate import SimulationConfig
from openmm_stable.training.pretrain import PretrainConfig
from openmm_stable.training.stable import StableConfig


def test_merge_settings_none_never_wins_and_mappings_merge():
    base = {"lr": 1e-3, "engine": {"timestep_fs": 0.25, "seed": 4}}
    merged = merge_settings(base, {"lr": None, "seed": 2, "engine": {"timestep_fs": None, "integrator": "nose-hoover"}})
    assert merged == {"lr": 1e-3, "seed": 2, "engine": {"timestep_fs": 0.25, "seed": 4, "integrator": "nose-hoover"}}
    assert merge_settings({}, {"engine": {"seed": None}}) == {}
    assert base == {"lr": 1e-3, "engine": {"timestep_fs": 0.25, "seed": 4}}  # not modified


def test_pretrain_stable_and_simulate_configs_follow_the_same_rule(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\n")
    for cls in (PretrainConfig, StableConfig, SimulationConfig):
        assert load_config(cls, path, {"seed": None}).seed == 3
        assert load_config(cls, path, {"seed": 7}).seed == 7
        assert load_config(cls, None, {"seed": None}).seed == cls().seed
    path.write_text("lr: 2e-3\nseed: 3\n")  # YAML reads "2e-3" as a string: read as a float
    pretrain = PretrainConfig.from_yaml(path, lr=None, max_epochs=4)
    assert pretrain.lr == pytest.approx(2e-3) and pretrain.max_epochs == 4 and pretrain.seed == 3
    assert config_from_yaml(StableConfig, path, {"lr": None}).lr == pytest.approx(2e-3)
    path.write_text("n_replica: 4\n")
    for cls in (PretrainConfig, StableConfig, SimulationConfig):
        with pytest.raises(InputError, match="n_replica"):
            load_config(cls, path)


def _simulate_config(argv):
    from openmm_stable.cli.simulate import config_from_args

    args = build_parser().parse_args(["simulate", "model.pt", "--data", "d.npz", "--out", "o", *argv])
    return config_from_args(args)


def test_simulate_config_file_and_flags(tmp_path):
    # No file: the flags as before, on SimulationConfig's defaults (`seed` is the run's one seed).
    assert _simulate_config([]) == SimulationConfig()
    plain = _simulate_config(["--replicas", "4", "--seed", "5", "--vacf-interval", "0", "--timestep", "0.25"])
    assert (plain.n_replicas, plain.seed, plain.vacf_interval_ps) == (4, 5, None)
    assert not hasattr(plain.engine, "seed")  # one seed, not three
    assert plain.engine.timestep_fs == 0.25 and plain.time_ps == 10.0

    path = tmp_path / "simulate.yaml"
    path.write_text("n_replicas: 8\ntime_ps: 2.5\nseed: 3\nvacf_interval_ps: null\nwrite_trajectories: true\n"
                    "engine:\n  timestep_fs: 0.25\n  integrator: nose-hoover\n")
    config = _simulate_config(["--config", str(path)])
    assert (config.n_replicas, config.time_ps, config.seed, config.vacf_interval_ps) == (8, 2.5, 3, None)
    assert config.write_trajectories
    assert (config.engine.timestep_fs, config.engine.integrator) == (0.25, "nose-hoover")
    # Flags given on the command line override the file; the others leave it alone.
    config = _simulate_config(["--config", str(path), "--replicas", "2", "--timestep", "1.0", "--seed", "9",
                               "--vacf-interval", "0.005", "--temperature", "350"])
    assert (config.n_replicas, config.time_ps, config.seed) == (2, 2.5, 9)
    assert (config.engine.timestep_fs, config.engine.integrator, config.engine.temperature_K) == (1.0, "nose-hoover", 350.0)
    assert config.vacf_interval_ps == 0.005 and config.write_trajectories
    path.write_text("n_replicas: 8\nengine:\n  seed: 11\n")
    with pytest.raises(InputError, match="seed"):  # the engine has no seed of its own
        _simulate_config(["--config", str(path)])
    path.write_text("replicas: 8\n")
    with pytest.raises(InputError, match="replicas"):
        _simulate_config(["--config", str(path)])

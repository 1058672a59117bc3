"""Model files and checkpoints are opened without pickle: a file that would run code when
loaded is refused, unopened; our own files (numpy arrays, RNG states included) round-trip."""
from __future__ import annotations

import pathlib
import random

import numpy as np
import pytest
import torch

from openmm_stable.errors import InputError
from openmm_stable.io import get_rng_state, load_torch_file, save_torch_file, set_rng_state
from openmm_stable.models import create_model, load_model, read_model_record, save_model


class _Payload:
    """Pickles to a call that creates a file: what a malicious model file would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _malicious_model_file(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    marker = tmp_path / "payload_ran"
    path = tmp_path / "model.pt"
    torch.save({"spec": {"architecture": "schnet"}, "state_dict": {}, "extra": _Payload(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_pickle_payload_is_refused_without_running(tmp_path):
    path, marker = _malicious_model_file(tmp_path)
    with pytest.raises(InputError, match="refused to open"):
        read_model_record(path)
    with pytest.raises(InputError, match="refused to open"):
        load_torch_file(path)  # the checkpoint reader of pretrain and refine
    assert not marker.exists()
    # The same payload through plain torch.load(weights_only=False) does run: the test's
    # file really is dangerous, so the refusal above is what protected us.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_export_cli_refuses_pickle_payload(tmp_path, capsys):
    from openmm_stable.cli import main

    path, marker = _malicious_model_file(tmp_path)
    code = main(["export", str(path), "--out", str(tmp_path / "force.pt")])
    assert code != 0 and not marker.exists() and not (tmp_path / "force.pt").exists()
    assert "refused to open" in capsys.readouterr().err


def test_model_file_round_trips_through_the_safe_reader(tmp_path):
    torch.manual_seed(0)
    model = create_model("schnet", "tiny")
    z = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])
    save_model(model, tmp_path / "m.pt", atomic_numbers=z, training_temperature_K=500.0, dataset_fingerprint="abc",
               split={"train": [0, 2], "val": [1], "test": [3]}, metrics={"mae": np.float64(1.5)})
    record = read_model_record(tmp_path / "m.pt")
    assert record.atomic_numbers.dtype == np.int64 and record.atomic_numbers.tolist() == z.tolist()
    assert record.payload["split"]["test"] == [3] and record.payload["metrics"]["mae"] == 1.5
    loaded = load_model(tmp_path / "m.pt")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_checkpoint_values_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    rng.random(5)
    payload = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([True, False]),
               "u32": np.arange(4, dtype=np.uint32), "scalar": np.int64(7), "nested": [(1, np.zeros(2)), None],
               "np_rng": rng.bit_generator.state, "rng": get_rng_state(), "context": b"\x00\x01openmm"}
    save_torch_file(payload, tmp_path / "c.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no .tmp left behind
    back = load_torch_file(tmp_path / "c.pt")
    np.testing.assert_array_equal(back["f32"], payload["f32"])
    assert back["f32"].dtype == np.float32 and back["u32"].dtype == np.uint32 and back["b"].dtype == bool
    assert back["scalar"] == 7 and isinstance(back["nested"][0], tuple) and back["nested"][1] is None
    assert back["context"] == payload["context"]
    restored = np.random.default_rng(0)
    restored.bit_generator.state = back["np_rng"]
    assert restored.random() == rng.random()
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    set_rng_state(back["rng"])
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected


def test_files_of_earlier_versions_with_plain_numpy_arrays_still_open(tmp_path):
    # Model files before the safe format stored atomic numbers as a numpy array (pickled).
    torch.save({"spec": {}, "state_dict": {}, "atomic_numbers": np.array([8, 1, 1])}, tmp_path / "old.pt")
    assert load_torch_file(tmp_path / "old.pt")["atomic_numbers"].tolist() == [8, 1, 1]


def test_unstorable_values_fail_at_write_time(tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_torch_file({"x": np.array([object()])}, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="set"):
        save_torch_file({"x": {1, 2}}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())

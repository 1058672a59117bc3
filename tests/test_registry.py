"""The architecture registry and the engine factory.

A toy family is installed FROM OUTSIDE the package the way a third-party package would be:
a module plus a ``*.dist-info`` with an ``entry_points.txt`` of the group
``openmm_stable.architectures``, on sys.path. Nothing of ours is edited or registered by
hand; `create_model("toy", ...)` must find it, train it, save, reload and export it.
"""
from __future__ import annotations

import ast
import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import openmm_stable
from openmm_stable.errors import InputError
from openmm_stable.models import (ArchitectureFamily, batch_index, create_model, energy_and_forces, family_names,
                                  get_family, load_model, read_model_record, register_family, save_model)
from openmm_stable.models.registry import BUILTIN_FAMILIES, FamilyUnavailable, unregister_family
from openmm_stable.training.batching import Batch, energy_force_loss

# A third-party family: a Gaussian pair repulsion with one learnable strength per element,
# E = sum_{i<j, same structure} c_zi c_zj exp(-r^2 / width). Its forces have a closed form,
# so the test can check them against the formula, not only against autograd.
TOY_MODULE = '''
from typing import Optional

import torch
from torch import Tensor, nn

from openmm_stable.models.registry import ArchitectureFamily


class GaussianPairs(nn.Module):
    def __init__(self, width: float, init: float):
        super().__init__()
        self.width = float(width)
        self.strength = nn.Parameter(torch.full((119,), float(init)))

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        n = pos.shape[0]
        pairs = torch.triu_indices(n, n, 1, device=pos.device)
        i, j = pairs[0], pairs[1]
        same = batch[i] == batch[j]
        i, j = i[same], j[same]
        r2 = ((pos[j] - pos[i]) ** 2).sum(-1)
        c = self.strength.to(pos.dtype)
        pair = c[z[i]] * c[z[j]] * torch.exp(-r2 / self.width)
        n_structures = int(batch[-1].item()) + 1
        return torch.zeros(n_structures, dtype=pos.dtype, device=pos.device).index_add(0, batch[i], pair)


def build(width: float, init: float) -> nn.Module:
    return GaussianPairs(width, init)


FAMILY = ArchitectureFamily(
    name="toy",
    presets={"tiny": {"width": 2.0, "init": 0.5}, "large": {"width": 4.0, "init": 0.5}},
    build=build,
    extension_imports=("toyfamily_ops",),
)
'''

# Stands for a custom-op library: importing it is what an exported file of the family needs.
TOY_OPS_MODULE = "LOADED = True\n"

# A family whose optional dependency is not installed.
BROKEN_MODULE = "import openmm_stable_no_such_dependency  # noqa: F401\nFAMILY = None\n"


def _distribution(root: Path) -> Path:
    """Install the toy distribution under `root`: modules + toyfamily-0.1.dist-info."""
    (root / "toyfamily.py").write_text(textwrap.dedent(TOY_MODULE))
    (root / "toyfamily_ops.py").write_text(TOY_OPS_MODULE)
    (root / "brokenfamily.py").write_text(BROKEN_MODULE)
    info = root / "toyfamily-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyfamily\nVersion: 0.1\nProvides-Extra: broken\n")
    (info / "entry_points.txt").write_text(
        "[openmm_stable.architectures]\ntoy = toyfamily:FAMILY\nbroken = brokenfamily:FAMILY\n"
        "schnet = toyfamily:FAMILY\n")  # tries to take over a built-in name
    return root


@pytest.fixture
def toy_installed(tmp_path, monkeypatch):
    """The toy distribution on sys.path for this test only (and forgotten afterwards)."""
    (tmp_path / "site").mkdir()
    root = _distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in ("toy", "broken"):
        unregister_family(name)
    for module in ("toyfamily", "toyfamily_ops", "brokenfamily"):
        sys.modules.pop(module, None)


def _toy_forces(model, z, pos):
    """Closed-form forces of the toy (eV/A) for one structure, float64 NumPy."""
    c = model.net.strength.detach().double().numpy()[z] * float(model.energy_scale)
    width = model.net.width
    forces = np.zeros_like(pos)
    for i in range(len(z)):
        for j in range(i + 1, len(z)):
            d = pos[j] - pos[i]
            # dE/dr_j = c_i c_j exp(-r^2/w) (-2 d / w); F = -dE/dr
            g = c[i] * c[j] * np.exp(-d @ d / width) * (-2.0 * d / width)
            forces[j] -= g
            forces[i] += g
    return forces


def test_toy_family_from_an_entry_point_trains_saves_and_reloads(toy_installed, ethanol, tmp_path):
    z, pos = ethanol
    assert "toy" in family_names() and "toy" not in BUILTIN_FAMILIES
    unregister_family("schnet")  # forget the loaded one: read the entry points again
    assert type(create_model("schnet", "tiny").net).__module__ == "openmm_stable.models.schnet"  # ours wins
    model = create_model("toy", "tiny")
    assert model.spec == {"architecture": "toy", "preset": "tiny", "hparams": {"width": 2.0, "init": 0.5}}
    assert type(model.net).__module__ == "toyfamily"

    # Its forces: autograd through NNIP equals the closed form (float64 copy).
    zt, batch = torch.as_tensor(z, dtype=torch.long), batch_index(1, len(z))
    exact = copy.deepcopy(model).double()
    _, forces = energy_and_forces(exact, zt, torch.as_tensor(pos, dtype=torch.float64), batch)
    np.testing.assert_allclose(forces.numpy(), _toy_forces(exact, z, pos), rtol=1e-10, atol=1e-12)

    # One energy/force training step on labels of another toy lowers the loss.
    target = create_model("toy", "tiny", init=0.8)
    frames = pos[None] + 0.1 * np.random.default_rng(0).standard_normal((4,) + pos.shape)
    zb, pb, bb = zt.repeat(4), torch.as_tensor(frames.reshape(-1, 3), dtype=torch.float32), batch_index(4, len(z))
    e_ref, f_ref = energy_and_forces(target, zb, pb, bb)
    labels = Batch(z=zb, pos=pb, batch=bb, energies=e_ref.detach(), forces=f_ref.detach())
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-4)
    loss, _ = energy_force_loss(model, labels)
    optimiser.zero_grad()
    loss.backward()
    assert model.net.strength.grad[[1, 6, 8]].abs().min() > 0  # the elements of ethanol learn
    optimiser.step()
    loss_after, _ = energy_force_loss(model, labels)
    assert loss_after.item() < loss.item()

    # Saved and reloaded through the ordinary model file: same spec, same energies.
    model.atom_energies[zt] = torch.as_tensor([-10.0 * k for k in z], dtype=torch.float64)
    path = tmp_path / "toy.ckpt"
    save_model(model, path, atomic_numbers=z.tolist())
    assert read_model_record(path).architecture == "toy"
    loaded = load_model(path)
    assert loaded.spec == model.spec
    torch.testing.assert_close(loaded(zb, pb, bb), model(zb, pb, bb), rtol=0, atol=0)


def test_toy_export_imports_its_extension_modules(toy_installed, ethanol, tmp_path):
    """An exported file records its family's extension imports; loading it imports them."""
    from openmm_stable.export import export_model, exported_record, load_exported
    from openmm_stable.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM

    z, pos = ethanol
    model = create_model("toy", "tiny")
    path = export_model(model, tmp_path / "toy_openmm.pt", z.tolist(), dtype=torch.float64)
    assert exported_record(path) == {"architecture": "toy", "extension_imports": ["toyfamily_ops"]}
    sys.modules.pop("toyfamily_ops", None)
    module = load_exported(path)
    assert "toyfamily_ops" in sys.modules
    e = float(module(torch.as_tensor(pos / NM_IN_ANGSTROM)))
    with torch.no_grad():
        expected = model.double()(torch.as_tensor(z), torch.as_tensor(pos), batch_index(1, len(z))).item() * EV_IN_KJ_PER_MOL
    assert abs(e - expected) <= 1e-10 * abs(expected)


def test_cli_export_prints_the_family_imports(toy_installed, ethanol, tmp_path, capsys):
    from openmm_stable.cli import main

    z, _ = ethanol
    ckpt = tmp_path / "toy.ckpt"
    save_model(create_model("toy", "tiny"), ckpt, atomic_numbers=z.tolist())
    assert main(["export", str(ckpt), "--out", str(tmp_path / "toy.pt")]) == 0
    printed = capsys.readouterr().out
    assert "import toyfamily_ops" in printed and "torchmdnet" not in printed


def test_missing_optional_dependency_is_a_clear_error_on_use(toy_installed):
    from openmm_stable.training.pretrain import PretrainConfig

    assert "broken" in family_names()  # listed without importing it
    with pytest.raises(FamilyUnavailable, match=r"'broken' is not available.*openmm_stable_no_such_dependency.*"
                                                r"install the `broken` extra: pip install 'toyfamily\[broken\]'"):
        get_family("broken")
    with pytest.raises(InputError, match="not available"):
        create_model("broken", "tiny")
    with pytest.raises(InputError, match="pretrain config: architecture:.*install the `broken` extra"):
        PretrainConfig(architecture="broken", preset="tiny")
    assert get_family("toy").name == "toy"  # the others are unaffected


def test_mace_entry_point_is_listed_without_importing_mace():
    """Our own optional family: named by the registry, imported only on use."""
    code = ("import sys\nfrom openmm_stable.models import family_names, create_model\n"
            "names = family_names()\nprint('mace listed:', 'mace' in names)\n"
            "create_model('schnet', 'tiny')\n"
            "print('mace imported:', any(m == 'mace' or m.startswith('mace.') for m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mace listed: True" in proc.stdout and "mace imported: False" in proc.stdout


def test_unknown_names_list_the_known_ones(toy_installed):
    with pytest.raises(InputError, match=r"unknown architecture 'painn'; known: schnet, graph-network, "
                                         r"equivariant-transformer, tensornet, .*toy"):
        create_model("painn", "tiny")
    with pytest.raises(InputError, match=r"unknown preset 'small' for architecture 'toy'; known: tiny, large"):
        create_model("toy", "small")
    with pytest.raises(InputError, match=r"'toy' has no hyper-parameter 'features'; known: init, width"):
        create_model("toy", "tiny", features=8)
    importer = ArchitectureFamily(name="import-only", presets={}, build=lambda: None)
    register_family(importer)
    try:
        with pytest.raises(InputError, match="'import-only' has no presets: it only reads models trained elsewhere"):
            create_model("import-only", "small")
    finally:
        unregister_family("import-only")


def test_register_family_in_process(ethanol):
    """Notebook use: a family object registered by hand, no distribution needed."""
    from openmm_stable.models.schnet import FAMILY as SCHNET

    family = ArchitectureFamily(name="wide-schnet", presets={"tiny": {**SCHNET.presets["tiny"], "features": 24}},
                                build=SCHNET.build)
    register_family(family)
    try:
        with pytest.raises(ValueError, match="registered already"):
            register_family(family)
        model = create_model("wide-schnet", "tiny")
        assert model.net.embedding.embedding_dim == 24 and "wide-schnet" in family_names()
    finally:
        unregister_family("wide-schnet")
    assert "wide-schnet" not in family_names()


# --------------------------------------------------------------------------- old model files


def _old_file(path: Path, spec: dict, seed: int = 0) -> torch.nn.Module:
    """A model file as the code before the registry wrote it (its spec layout and keys),
    built from the same network classes, which did not change."""
    from openmm_stable.models.schnet import SchNet
    from openmm_stable.models.torchmdnet import build_torchmdnet
    from openmm_stable.models.base import NNIP

    torch.manual_seed(seed)
    h = spec["hparams"]
    if spec["architecture"] == "schnet":
        net = SchNet(features=h["features"], layers=h["layers"], n_rbf=h["n_rbf"], cutoff=h["cutoff"])
    else:
        net = build_torchmdnet(spec["architecture"], h["features"], h["layers"], h["n_rbf"], h["cutoff"],
                               num_heads=8 if h["features"] % 8 == 0 else 1)
    model = NNIP(net, spec=spec)
    model.energy_scale.fill_(0.7)
    payload = {"format": "openmm-stable-model", "version": 2, "spec": spec, "state_dict": model.state_dict(),
               "kind": "model", "units": {"length": "Angstrom", "energy": "eV"}, "versions": {},
               "atomic_numbers": None, "training_temperature_K": None, "dataset_fingerprint": None}
    if "preset" not in spec:  # the oldest files: no record fields at all
        payload = {"spec": spec, "state_dict": model.state_dict()}
    torch.save(payload, path)
    return model


@pytest.mark.parametrize("spec", [
    {"architecture": "schnet", "preset": "small", "hparams": {"features": 64, "layers": 3, "n_rbf": 32, "cutoff": 5.0}},
    {"architecture": "schnet", "preset": "tiny", "hparams": {"features": 16, "layers": 1, "n_rbf": 16, "cutoff": 3.0}},
    {"architecture": "schnet", "hparams": {"features": 16, "layers": 2, "n_rbf": 16, "cutoff": 4.0}},
    {"architecture": "graph-network", "preset": "tiny",
     "hparams": {"features": 16, "layers": 1, "n_rbf": 16, "cutoff": 5.0}},
], ids=["schnet-small", "schnet-tiny-cutoff", "schnet-no-preset", "graph-network"])
def test_old_model_files_still_load(spec, ethanol, tmp_path):
    z, pos = ethanol
    old = _old_file(tmp_path / "old.ckpt", spec)
    loaded = load_model(tmp_path / "old.ckpt")
    assert loaded.spec["hparams"] == spec["hparams"] and loaded.spec["architecture"] == spec["architecture"]
    args = (torch.as_tensor(z), torch.as_tensor(pos, dtype=torch.float32), batch_index(1, len(z)))
    torch.testing.assert_close(loaded(*args), old(*args), rtol=0, atol=0)


# --------------------------------------------------------------------------- engines


def test_engine_module_does_not_import_distributed():
    """engine.py neither names openmm_stable.distributed (nor the factory above it) in its
    source, nor pulls it in when imported: the factory is `openmm_stable.engines`."""
    source = Path(openmm_stable.__file__).with_name("engine.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {m for m in imported if m.startswith(("openmm_stable.distributed", "openmm_stable.engines"))}
    code = ("import sys, openmm_stable.engine, openmm_stable.engines\n"
            "print(sorted(m for m in sys.modules if m.startswith('openmm_stable.distributed') or m == 'ray'))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_create_engine_picks_the_engine(ethanol):
    from openmm_stable.engine import EngineConfig, ReplicaEngine
    from openmm_stable.engines import create_engine, uses_workers

    z, pos = ethanol
    assert not uses_workers(None) and not uses_workers(EngineConfig())
    assert uses_workers(EngineConfig(workers=2)) and uses_workers(EngineConfig(ray_address="auto"))
    from openmm_stable.units import EV_IN_KJ_PER_MOL

    torch.manual_seed(0)
    model = create_model("schnet", "tiny")
    engine = create_engine(model, z, 2, EngineConfig())
    assert type(engine) is ReplicaEngine
    shifted = pos + np.array([0.05, 0.0, 0.0]) * (np.arange(len(z)) % 2)[:, None]
    engine.set_states(np.stack([pos, shifted]))
    expected = model(torch.as_tensor(np.tile(z, 2)), torch.as_tensor(np.concatenate([pos, shifted]), dtype=torch.float32),
                     batch_index(2, len(z))).detach().numpy() * EV_IN_KJ_PER_MOL
    np.testing.assert_allclose(engine.potential_energies().sum(), expected.sum(), rtol=1e-5)


def test_exported_file_without_record_still_loads(ethanol, tmp_path):
    """A graph-network file exported before files carried their record: a fresh process
    loads it (the failed load for want of torchmd-net's ops is retried after importing
    every family's extension modules) and gets the model's energy."""
    from openmm_stable.export import exported_record, script_force_module
    from openmm_stable.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM

    z, pos = ethanol
    torch.manual_seed(0)
    model = create_model("graph-network", "tiny")
    path = tmp_path / "old_openmm.pt"
    script_force_module(model, z.tolist(), dtype=torch.float64).save(str(path))  # no extra files
    assert exported_record(path) is None
    with torch.no_grad():
        expected = model.double()(torch.as_tensor(z), torch.as_tensor(pos), batch_index(1, len(z))).item()
    code = ("import sys, torch\nfrom openmm_stable.export import load_exported\n"
            f"module = load_exported({str(path)!r})\n"
            f"print('energy', repr(float(module(torch.tensor({(pos / NM_IN_ANGSTROM).tolist()!r}, dtype=torch.float64)))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    energy = float(proc.stdout.split("energy")[-1])
    assert abs(energy - expected * EV_IN_KJ_PER_MOL) <= 1e-9 * abs(expected * EV_IN_KJ_PER_MOL)

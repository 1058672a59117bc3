"""Export a model as an OpenMM force (openmm-torch), and the openmm-ml plugin.

The exported TorchScript module takes OpenMM's positions (nm, float64 on the CPU
platform) and optional box vectors (nm), casts them to the model's dtype, and returns the
energy in kJ/mol; OpenMM gets forces by autograd. In replica form it evaluates R copies of
the molecule, given as one particle array of R * N atoms, in one batched call: the copies
do not interact, which is what the replica engine relies on.

>>> from openmm_stable.export import export_model, create_system
>>> export_model(model, "model.pt", atomic_numbers)              # doctest: +SKIP
>>> system = create_system(topology, "model.pt")                  # doctest: +SKIP

In a production script, through openmm-ml (plugin in `openmm_stable.openmmml_plugin`)::

    from openmmml import MLPotential
    potential = MLPotential("openmm-stable", modelPath="model.ckpt")
    system = potential.createSystem(pdb.topology)
"""
from __future__ import annotations

import json
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from openmm_stable.data.dataset import molecule_difference
from openmm_stable.errors import InputError
from openmm_stable.models import NNIP, model_from_record, read_model_record
from openmm_stable.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM

# Masses (amu) per atomic number come from OpenMM's element table when a System is built.


class OpenMMForceModule(nn.Module):
    """positions (n_particles, 3) nm [, box (3, 3) nm] -> total energy (kJ/mol).

    ``atom_indices`` selects the particles the model sees (openmm-ml's ``atoms``
    argument); ``n_replicas`` copies of the molecule follow one another in the array.
    """

    def __init__(self, model: nn.Module, atomic_numbers: Sequence[int], n_replicas: int = 1,
                 atom_indices: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        z = torch.as_tensor(np.asarray(atomic_numbers), dtype=torch.long)
        # Only the network changes dtype: NNIP keeps its energy offsets in float64.
        (model.net if isinstance(model, NNIP) else model).to(dtype)
        self.model = model
        self.n_atoms = int(z.numel())
        self.n_replicas = int(n_replicas)
        self.register_buffer("z", z.repeat(n_replicas))
        self.register_buffer("batch", torch.arange(n_replicas).repeat_interleave(self.n_atoms))
        self.use_subset = atom_indices is not None
        indices = torch.as_tensor(list(atom_indices) if atom_indices is not None else [], dtype=torch.long)
        self.register_buffer("atom_indices", indices)
        # Carries the model dtype and the nm -> Angstrom factor in one buffer.
        self.register_buffer("nm_to_angstrom", torch.tensor(NM_IN_ANGSTROM, dtype=dtype))
        self.ev_to_kj_per_mol = EV_IN_KJ_PER_MOL

    @torch.jit.export
    def replica_energies(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Energy of each replica (kJ/mol), shape (n_replicas,)."""
        if self.use_subset:
            positions = positions[self.atom_indices]
        pos = positions.to(self.nm_to_angstrom.dtype) * self.nm_to_angstrom
        box_angstrom: Optional[Tensor] = None
        if box is not None:
            box_angstrom = box.to(self.nm_to_angstrom.dtype) * self.nm_to_angstrom
        return self.model(self.z, pos, self.batch, box_angstrom) * self.ev_to_kj_per_mol

    def forward(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        return self.replica_energies(positions, box).sum()


class GuardedForceModule(OpenMMForceModule):
    """Replica form that returns (energy, forces) and zeroes a replica whose energy or
    forces are not finite, so one broken replica cannot stop the others (OpenMM aborts
    the whole Context on a NaN coordinate). Used with ``TorchForce.setOutputsForces``."""

    def forward(self, positions: Tensor, box: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        positions = positions.detach().requires_grad_(True)
        energies = self.replica_energies(positions, box)
        grads = torch.autograd.grad([energies.sum()], [positions], allow_unused=True)
        grad = grads[0]
        if grad is None:
            grad = torch.zeros_like(positions)
        forces = -grad.reshape(self.n_replicas, self.n_atoms, 3)
        ok = torch.isfinite(energies) & torch.isfinite(forces).all(dim=2).all(dim=1)
        forces = torch.where(ok[:, None, None], forces, torch.zeros_like(forces))
        energies = torch.where(ok, energies, torch.zeros_like(energies))
        return energies.sum().detach(), forces.reshape(-1, 3).detach()


def script_force_module(model: nn.Module, atomic_numbers: Sequence[int], n_replicas: int = 1,
                        atom_indices: Optional[Sequence[int]] = None,
                        dtype: torch.dtype = torch.float32, guarded: bool = False) -> torch.jit.ScriptModule:
    """TorchScript form of `OpenMMForceModule` (or `GuardedForceModule`) around a copy of
    `model` (on the CPU)."""
    import copy

    model = copy.deepcopy(model).cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cls = GuardedForceModule if guarded else OpenMMForceModule
    return torch.jit.script(cls(model, atomic_numbers, n_replicas, atom_indices, dtype))


EXPORT_RECORD = "openmm_stable.json"  # extra file of the TorchScript archive: what loading it needs


def export_model(model: nn.Module, path, atomic_numbers: Sequence[int], n_replicas: int = 1,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write a TorchScript file that ``openmmtorch.TorchForce(path)`` loads. The archive
    also records the architecture and the modules to import before loading it
    (`EXPORT_RECORD`), so `load_exported` / `make_torch_force` import exactly those."""
    path = Path(path)
    architecture = (getattr(model, "spec", None) or {}).get("architecture")
    record = {"architecture": architecture, "extension_imports": list(extension_imports_of(architecture))}
    script_force_module(model, atomic_numbers, n_replicas, dtype=dtype).save(
        str(path), _extra_files={EXPORT_RECORD: json.dumps(record)})
    return path


def extension_imports_of(architecture: Optional[str]) -> tuple[str, ...]:
    """The modules a TorchScript file of `architecture` needs imported before it loads
    (its family's ``extension_imports``); () for an unknown or unnamed architecture."""
    if architecture is None:
        return ()
    from openmm_stable.models.registry import get_family

    try:
        return tuple(get_family(architecture).extension_imports)
    except InputError:  # not a family here (a foreign module): nothing known to import
        return ()


def exported_record(path) -> Optional[dict]:
    """The record `export_model` wrote into an exported file, read from the archive without
    loading the module; None for files of older versions or of other programs."""
    try:
        with zipfile.ZipFile(str(path)) as archive:
            for name in archive.namelist():
                if name.endswith("/extra/" + EXPORT_RECORD):
                    record = json.loads(archive.read(name))
                    return record if isinstance(record, dict) else None
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    return None


def load_exported(path) -> torch.jit.ScriptModule:
    """Load an exported file, importing first what its architecture's custom ops need."""
    return _with_extension_ops(lambda: torch.jit.load(str(path)), path)


def _with_extension_ops(load, path=None):
    """`load()` after importing the extension modules the file's record names. A file
    without a record (exported by an older version) is loaded as it is and, if that fails
    for want of a custom op, once more after importing every family's extension modules.
    Files of plain-PyTorch models (schnet) import nothing: torchmd-net and warp take seconds
    and print a banner about the CUDA driver."""
    record = exported_record(path) if path is not None else None
    if record is not None:
        _import_extensions(record, path)
        return load()
    try:
        return load()
    except Exception as err:  # torch raises RuntimeError; OpenMM wraps it in its own exception
        if "Unknown builtin op" not in str(err) or not _import_all_extensions():
            raise
    return load()


def _import_extensions(record: dict, path) -> None:
    """Import the extension modules for a file's recorded architecture (the family's list
    when it is registered here, else the list recorded at export), with a clear error."""
    import importlib

    architecture = record.get("architecture")
    modules = extension_imports_of(architecture) or tuple(record.get("extension_imports") or ())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise InputError(f"{path} holds a {architecture} model: loading it needs `import {module}`, which "
                             f"failed ({err}); install the package that provides the {architecture} family") from err


def _import_all_extensions() -> bool:
    """Import every available family's extension modules; True if any was newly imported."""
    import importlib

    from openmm_stable.models.registry import available_families

    imported = False
    for family in available_families():
        for module in family.extension_imports:
            if module in sys.modules:
                continue
            try:
                importlib.import_module(module)
            except ImportError:
                continue
            imported = True
    return imported


_TORCH_PLUGINS_RETRIED: set = set()


def _load_torch_kernels() -> None:
    """Load openmm-torch's platform plugins if OpenMM failed to load them at its import.

    ``import openmm`` loads every plugin in OpenMM's plugin folder; openmm-torch's
    (libOpenMMTorchReference.so, ...) link libnvrtc.so.12, which only torch's import makes
    loadable. A script that imports openmm before torch (the usual order in an OpenMM script,
    e.g. ``import openmm; from openmmml import MLPotential``) therefore gets a TorchForce
    with no kernels: "Specified a Platform for a Context which does not support all
    required kernels". Now that torch is imported, load those plugins again (each once).
    """
    import re

    import openmm

    for failure in openmm.Platform.getPluginLoadFailures():
        match = re.search(r"library (.*OpenMMTorch\w*\.(?:so|dylib|dll))", failure)
        if match is None or match.group(1) in _TORCH_PLUGINS_RETRIED:
            continue
        _TORCH_PLUGINS_RETRIED.add(match.group(1))
        try:
            openmm.Platform.loadPluginLibrary(match.group(1))
        except Exception:  # e.g. the OpenCL plugin without an OpenCL driver: that platform stays off
            pass


def make_torch_force(module_or_path, periodic: bool = False, outputs_forces: bool = False):
    """An ``openmmtorch.TorchForce`` from a scripted module or an exported file."""
    import torch  # noqa: F401  (must precede openmmtorch: it preloads libnvrtc)
    from openmmtorch import TorchForce

    _load_torch_kernels()
    if isinstance(module_or_path, (str, Path)):
        force = _with_extension_ops(lambda: TorchForce(str(module_or_path)), module_or_path)
    else:  # a module built in this process: any ops it calls are registered already
        force = TorchForce(module_or_path)
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setOutputsForces(bool(outputs_forces))
    return force


def atomic_numbers_of(topology, atoms: Optional[Iterable[int]] = None) -> list[int]:
    """Atomic numbers of a topology's atoms (or the `atoms` subset), with a clear error."""
    all_atoms = list(topology.atoms())
    chosen = all_atoms if atoms is None else [all_atoms[i] for i in atoms]
    numbers = []
    for atom in chosen:
        if atom.element is None:
            raise InputError(f"atom {atom.index} ({atom.name}) has no element; the model needs atomic numbers")
        numbers.append(atom.element.atomic_number)
    return numbers


def record_bonds(record) -> Optional[np.ndarray]:
    """The bonds (B, 2) of the structure a model file says it was trained on, when it
    records them (``bonds`` in the file); None: only its atomic numbers are known, and
    "same molecule" falls back to the formula (`molecule_difference`)."""
    bonds = record.payload.get("bonds")
    return None if bonds is None else np.asarray(bonds, dtype=np.int64).reshape(-1, 2)


def topology_bonds(topology, atoms: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
    """A topology's bonds as (B, 2) indices into `atoms` (or all atoms); None when it has none."""
    index = {a: k for k, a in enumerate(atoms)} if atoms is not None else None
    pairs = []
    for bond in topology.bonds():
        a, b = bond[0].index, bond[1].index
        if index is None:
            pairs.append((a, b))
        elif a in index and b in index:
            pairs.append((index[a], index[b]))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2) if pairs else None


def _as_model(model_or_path, atomic_numbers: Optional[Sequence[int]] = None, bonds=None) -> nn.Module:
    """The model itself, or the one a file holds; for a file, warn when its record names
    another molecule than `atomic_numbers` (and `bonds`, when both sides know them): a
    force applied outside its training data."""
    if not isinstance(model_or_path, (str, Path)):
        return model_or_path
    record = read_model_record(model_or_path)
    if atomic_numbers is not None and record.atomic_numbers is not None:
        difference = molecule_difference(record.atomic_numbers, atomic_numbers, record_bonds(record), bonds)
        if difference:
            warnings.warn(f"{model_or_path} was trained on another molecule than it is applied to here "
                          f"({difference}, trained vs here)", stacklevel=3)
    return model_from_record(record)


def add_model_force(system, topology, model_or_path, atoms: Optional[Iterable[int]] = None,
                    force_group: int = 0, dtype: torch.dtype = torch.float32):
    """Add the model (an `NNIP` or a saved model file) as a TorchForce to `system`."""
    atoms = None if atoms is None else list(atoms)
    z = atomic_numbers_of(topology, atoms)
    module = script_force_module(_as_model(model_or_path, z, topology_bonds(topology, atoms)), z, 1,
                                 atom_indices=atoms, dtype=dtype)
    force = make_torch_force(module, periodic=topology.getPeriodicBoxVectors() is not None)
    force.setForceGroup(force_group)
    system.addForce(force)
    return force


def create_system(topology, model_or_path, remove_cm_motion: bool = True, dtype: torch.dtype = torch.float32):
    """A System with the topology's masses and the model as its only force."""
    import openmm

    system = openmm.System()
    if topology.getPeriodicBoxVectors() is not None:
        system.setDefaultPeriodicBoxVectors(*topology.getPeriodicBoxVectors())
    for atom in topology.atoms():
        system.addParticle(atom.element.mass if atom.element is not None else 0.0)
    add_model_force(system, topology, model_or_path, dtype=dtype)
    if remove_cm_motion:
        system.addForce(openmm.CMMotionRemover())
    return system


def topology_from_atomic_numbers(atomic_numbers: Sequence[int], n_copies: int = 1, box_angstrom=None):
    """An OpenMM Topology of `n_copies` molecules (one residue each) from atomic numbers."""
    from openmm import Vec3, app, unit

    topology = app.Topology()
    for copy_index in range(n_copies):
        chain = topology.addChain()
        residue = topology.addResidue("MOL", chain)
        for k, number in enumerate(atomic_numbers):
            element = app.Element.getByAtomicNumber(int(number))
            topology.addAtom(f"{element.symbol}{k + 1}", element, residue)
    if box_angstrom is not None:
        box = np.asarray(box_angstrom, dtype=float) / NM_IN_ANGSTROM
        topology.setPeriodicBoxVectors([Vec3(*row) for row in box] * unit.nanometer)
    return topology

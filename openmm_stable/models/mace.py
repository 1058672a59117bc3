"""MACE (mace-torch's own model classes) as an architecture family: build, import, export.

The network is mace-torch's ``ScaleShiftMACE``; `MACENetwork` adapts it to our model
protocol (energies of a batch from ``z, pos, batch, box``): it builds the neighbour list
inside the graph (all pairs of the same structure within the cutoff, minimum image in a
box), so R replicas are one batched call and the TorchScript form needs no host-side
neighbour list. A user's trained ``.model`` comes in with `import_mace_model` (its weights
become a state dict plus the hyper-parameters that rebuild it: our file then opens without
pickle) and goes back out with `export_mace_model` (a ``.model`` that mace's
``MACECalculator`` and openmm-ml's ``MLPotential('mace')`` load).

>>> from openmm_stable.models import create_model
>>> from openmm_stable.models.mace import import_mace_model, export_mace_model
>>> model = create_model("mace", "small", atomic_numbers=[1, 6, 8])  # doctest: +SKIP
>>> model = import_mace_model("mine.model", allow_pickle=True)  # a pickle: trusted files only  # doctest: +SKIP
>>> export_mace_model(model, "refined.model")  # doctest: +SKIP

mace-torch is imported lazily (inside functions): ``import mace`` sets
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process (and e3nn 0.4.4 cannot be
imported before it), which our own loaders withstand because they always pass
``weights_only=True``. Energies in eV, lengths in Angstrom: MACE's units too.
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from openmm_stable.errors import InputError
from openmm_stable.models.base import MAX_Z, NNIP
from openmm_stable.models.registry import ArchitectureFamily
from openmm_stable.models.schnet import structure_pairs

NAME = "mace"

# Elements of organic molecules and water; `pretrain` should pass the dataset's own.
DEFAULT_ATOMIC_NUMBERS = [1, 6, 7, 8, 9, 15, 16, 17]

_COMMON = {"atomic_numbers": DEFAULT_ATOMIC_NUMBERS, "num_bessel": 8, "num_polynomial_cutoff": 5,
           "avg_num_neighbors": 8.0, "gate": "silu"}
# Measured on this machine (one thread, a batch of 32 aspirin frames, a force-loss training
# step, float32): tiny 0.19 s, small 0.33 s (schnet small: 0.10 s); medium (max_ell 2,
# correlation 3) and large (MACE's own "large" widths) are for GPUs.
PRESETS = {
    "tiny": {**_COMMON, "cutoff": 5.0, "hidden_irreps": "8x0e + 8x1o", "MLP_irreps": "8x0e", "max_ell": 1,
             "num_interactions": 2, "correlation": 2, "radial_MLP": [16, 16]},
    "small": {**_COMMON, "cutoff": 5.0, "hidden_irreps": "32x0e + 32x1o", "MLP_irreps": "16x0e", "max_ell": 1,
              "num_interactions": 2, "correlation": 2, "radial_MLP": [32, 32]},
    "medium": {**_COMMON, "cutoff": 5.0, "hidden_irreps": "64x0e + 64x1o", "MLP_irreps": "16x0e", "max_ell": 2,
               "num_interactions": 2, "correlation": 3, "radial_MLP": [64, 64, 64]},
    "large": {**_COMMON, "cutoff": 6.0, "hidden_irreps": "128x0e + 128x1o + 128x2e", "MLP_irreps": "16x0e",
              "max_ell": 3, "num_interactions": 2, "correlation": 3, "radial_MLP": [64, 64, 64]},
}

# Hyper-parameters beyond the presets' keys, with the values `build` assumes; an imported
# model records every one of them, so its file rebuilds exactly that model.
EXTRA_DEFAULTS: Dict[str, Any] = {
    "interaction": "RealAgnosticResidualInteractionBlock",
    "interaction_first": "RealAgnosticResidualInteractionBlock",
    "readout": "NonLinearReadoutBlock",
    "radial_type": "bessel",
    "distance_transform": "None",
    "pair_repulsion": False,
    "apply_cutoff": True,
    "use_reduced_cg": True,
    "use_so3": False,
    "use_agnostic_product": False,
    "use_last_readout_only": False,
    "use_edge_irreps_first": False,
    "edge_irreps": None,
    "keep_last_layer_irreps": False,
    "atomic_inter_scale": 1.0,
    "atomic_inter_shift": 0.0,
    "heads": ["Default"],
    "dtype": "float32",
}

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _mace():
    """mace-torch's modules (lazily: see the module docstring), with a clear error without it."""
    try:
        import mace  # noqa: F401  (first: it must precede e3nn's import)
        from mace import modules
    except ImportError as err:
        raise InputError(f"the 'mace' architecture needs mace-torch ({err}); "
                         "install the mace extra: pip install 'openmm-stable[mace]'") from err
    return modules


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """mace creates its buffers in torch's default dtype; build in the requested one."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def mace_config(hparams: dict) -> dict:
    """Our plain hyper-parameters -> the keyword arguments of ``ScaleShiftMACE``. The
    element energies (E0s) are zero in the network: `NNIP` carries them in float64."""
    modules = _mace()
    from e3nn import o3

    h = {**EXTRA_DEFAULTS, **hparams}
    zs = [int(z) for z in h["atomic_numbers"]]
    if not zs or sorted(set(zs)) != zs or zs[0] < 1 or zs[-1] >= MAX_Z:
        raise InputError(f"mace atomic_numbers must be distinct, ascending, in 1..{MAX_Z - 1}; got {zs}")
    for key, table in (("interaction", modules.interaction_classes), ("interaction_first", modules.interaction_classes),
                       ("readout", modules.readout_classes), ("gate", modules.gate_dict)):
        if str(h[key]) not in table:
            raise InputError(f"mace {key} {h[key]!r} is not one of {', '.join(table)}")
    if len(h["heads"]) != 1:
        raise InputError(f"mace models here have one head (an energy per structure), got heads {h['heads']}")
    return dict(
        r_max=float(h["cutoff"]), num_bessel=int(h["num_bessel"]),
        num_polynomial_cutoff=int(h["num_polynomial_cutoff"]),
        max_ell=int(h["max_ell"]), interaction_cls=modules.interaction_classes[h["interaction"]],
        interaction_cls_first=modules.interaction_classes[h["interaction_first"]],
        num_interactions=int(h["num_interactions"]), num_elements=len(zs), hidden_irreps=o3.Irreps(h["hidden_irreps"]),
        MLP_irreps=o3.Irreps(h["MLP_irreps"]), gate=modules.gate_dict[str(h["gate"])],
        atomic_energies=torch.zeros(len(zs), dtype=torch.float64).numpy(),
        avg_num_neighbors=float(h["avg_num_neighbors"]), atomic_numbers=zs, correlation=h["correlation"],
        radial_MLP=[int(x) for x in h["radial_MLP"]], radial_type=h["radial_type"],
        distance_transform=h["distance_transform"], pair_repulsion=bool(h["pair_repulsion"]),
        apply_cutoff=bool(h["apply_cutoff"]), use_reduced_cg=bool(h["use_reduced_cg"]), use_so3=bool(h["use_so3"]),
        use_agnostic_product=bool(h["use_agnostic_product"]), use_last_readout_only=bool(h["use_last_readout_only"]),
        use_edge_irreps_first=bool(h["use_edge_irreps_first"]),
        edge_irreps=None if h["edge_irreps"] is None else o3.Irreps(h["edge_irreps"]),
        keep_last_layer_irreps=bool(h["keep_last_layer_irreps"]),
        readout_cls=modules.readout_classes[h["readout"]], heads=list(h["heads"]),
        atomic_inter_scale=float(h["atomic_inter_scale"]), atomic_inter_shift=float(h["atomic_inter_shift"]),
    )


class MACENetwork(nn.Module):
    """A ``ScaleShiftMACE`` behind our protocol: ``forward(z, pos, batch, box)`` -> energies
    (n_structures,) eV; ``atom_energies`` gives MACE's per-atom energies (StABlE's local
    samples). The graph is built here, in TorchScript-able torch ops: every ordered pair of
    atoms of the same structure closer than the cutoff, with the minimum-image shift
    (``shifts``, MACE's convention: vector = pos[receiver] - pos[sender] + shift) in a box."""

    def __init__(self, mace_model: nn.Module):
        super().__init__()
        self.mace = mace_model
        # MACE's own element table (its one-hot order) and cutoff, read from the module
        self.cutoff = float(mace_model.r_max)
        zs = [int(z) for z in mace_model.atomic_numbers]
        self.atomic_numbers: List[int] = zs
        self.n_elements = len(zs)
        table = torch.full((MAX_Z,), -1, dtype=torch.long)
        table[torch.tensor(zs, dtype=torch.long)] = torch.arange(len(zs))
        self.register_buffer("element_index", table, persistent=False)

    # The Python module beside a compiled one (see __prepare_scriptable__); not TorchScript's business.
    __jit_ignored_attributes__ = ["python_mace"]

    def __prepare_scriptable__(self):
        """torch.jit.script calls this: mace's modules script only through e3nn's
        ``compile`` (some e3nn modules must be traced), so TorchScript gets a copy of this
        module holding a compiled copy of the MACE module that shares its parameters and
        buffers. torch puts that copy in the parent's place: scripting a live model (rather
        than a deep copy, as `openmm_stable.export` does) leaves it computing with the same
        weights through the compiled module, and `python_mace` keeps the Python one."""
        from e3nn.util import jit as e3nn_jit

        if isinstance(self.mace, torch.jit.ScriptModule):
            return self
        tensors = list(self.mace.parameters()) + list(self.mace.buffers())
        compiled = e3nn_jit.compile(copy.deepcopy(self.mace, {id(t): t for t in tensors}))
        clone = copy.copy(self)
        clone._modules = OrderedDict(self._modules)
        clone._modules["mace"] = compiled
        object.__setattr__(clone, "python_mace", self.mace)
        return clone

    def _graph(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor]) -> Dict[str, Tensor]:
        i, j = structure_pairs(batch)
        vec = pos[j] - pos[i]
        shifts = torch.zeros_like(vec)
        if box is not None:
            cell = box.to(pos.dtype)
            frac = torch.linalg.solve(cell.transpose(0, 1), vec.detach().transpose(0, 1)).transpose(0, 1)
            shifts = -torch.round(frac) @ cell
            off_diagonal = cell - torch.diag(torch.diagonal(cell))
            if bool((off_diagonal != 0).any()):  # triclinic: the nearest of the 27 neighbouring images
                steps = torch.arange(-1, 2, device=pos.device)
                grid = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
                images = grid.to(pos.dtype) @ cell
                candidates = (vec.detach() + shifts).unsqueeze(1) + images.unsqueeze(0)
                best = (candidates * candidates).sum(-1).argmin(1)
                shifts = shifts + images[best]
            vec = vec + shifts
        inside = (vec * vec).sum(-1) < self.cutoff * self.cutoff
        i, j, shifts = i[inside], j[inside], shifts[inside]
        n_structures = int(batch[-1].item()) + 1
        counts = torch.bincount(batch, minlength=n_structures)
        ptr = torch.cat([torch.zeros(1, dtype=torch.long, device=batch.device), torch.cumsum(counts, 0)])
        index = self.element_index[z]
        if bool((index < 0).any()):
            if torch.jit.is_scripting():
                raise ValueError("an atomic number outside the MACE model's element table")
            self._refuse_elements(z)
        node_attrs = nn.functional.one_hot(index, self.n_elements).to(pos.dtype)
        cell_rows = torch.zeros(3 * n_structures, 3, dtype=pos.dtype, device=pos.device)
        if box is not None:
            cell_rows = box.to(pos.dtype).repeat(n_structures, 1)
        # mace marks its positions as requiring grad: hand it a fresh leaf when ours is not
        # part of a graph, so the caller's tensor is never changed.
        positions = pos if pos.requires_grad else pos.detach()
        return {"positions": positions, "node_attrs": node_attrs, "edge_index": torch.stack([i, j]),
                "shifts": shifts, "unit_shifts": torch.zeros_like(shifts), "batch": batch, "ptr": ptr,
                "cell": cell_rows}

    @torch.jit.unused
    def _refuse_elements(self, z: Tensor) -> None:
        from ase.data import chemical_symbols

        outside = sorted(set(int(a) for a in z.tolist()) - set(self.atomic_numbers))
        raise InputError(f"element(s) {[chemical_symbols[a] for a in outside]} are outside this MACE model's "
                         f"element table {[chemical_symbols[a] for a in self.atomic_numbers]} "
                         "(pretrain: give the model the dataset's elements, hparam atomic_numbers)")

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        out = self.mace(self._graph(z, pos, batch, box), training=True, compute_force=False)
        energy = out["energy"]
        assert energy is not None
        return energy.to(pos.dtype)

    def atom_energies(self, z: Tensor, pos: Tensor, batch: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Per-atom energies (N,) summing to `forward` per structure."""
        out = self.mace(self._graph(z, pos, batch, box), training=True, compute_force=False)
        energy = out["node_energy"]
        assert energy is not None
        return energy.to(pos.dtype)


def build(**hparams) -> MACENetwork:
    """A fresh `MACENetwork` from our hyper-parameters (a preset with overrides)."""
    h = {**EXTRA_DEFAULTS, **hparams}
    if h["dtype"] not in _DTYPES:
        raise InputError(f"mace dtype must be one of {', '.join(_DTYPES)}, got {h['dtype']!r}")
    config = mace_config(h)
    modules = _mace()
    with _default_dtype(_DTYPES[h["dtype"]]):
        model = modules.ScaleShiftMACE(**config)
    return MACENetwork(model)


# --- bring your own: a trained MACE .model file ------------------------------------------------
def _name_of(value, table: dict, what: str) -> str:
    for name, candidate in table.items():
        if candidate is value or candidate == value:
            return name
    raise InputError(f"this MACE model's {what} ({value!r}) is not one this importer knows")


def hparams_of(mace_model: nn.Module) -> dict:
    """Our plain hyper-parameters of a ``ScaleShiftMACE``, read with mace's own
    ``extract_config_mace_model`` (what mace's fine-tuning tools rebuild models from)."""
    modules = _mace()
    from mace.tools.scripts_utils import extract_config_mace_model

    if type(mace_model).__name__ != "ScaleShiftMACE":
        raise InputError(f"only ScaleShiftMACE models (what mace_run_train writes) can be imported, "
                         f"not {type(mace_model).__name__}")
    if getattr(mace_model, "embedding_specs", None) is not None or getattr(mace_model, "cueq_config", None) is not None:
        raise InputError("MACE models with extra embeddings or cuEquivariance layers cannot be imported; "
                         "convert a cuEq model back to e3nn first (mace's cueq_to_e3nn)")
    c = extract_config_mace_model(mace_model)
    if "error" in c:
        raise InputError(f"cannot read this MACE model's configuration: {c['error']}")
    scale = torch.as_tensor(c["atomic_inter_scale"]).reshape(-1)
    shift = torch.as_tensor(c["atomic_inter_shift"]).reshape(-1)
    if len(c["heads"]) != 1 or scale.numel() != 1:
        raise InputError(f"this MACE model has several heads {c['heads']}; pass head=<name> to keep one")
    dtype = next(iter(mace_model.parameters())).dtype
    return {
        "atomic_numbers": [int(z) for z in c["atomic_numbers"]], "cutoff": float(c["r_max"]),
        "num_bessel": int(c["num_bessel"]), "num_polynomial_cutoff": int(c["num_polynomial_cutoff"]),
        "max_ell": int(c["max_ell"]), "num_interactions": int(c["num_interactions"]),
        "hidden_irreps": str(c["hidden_irreps"]), "MLP_irreps": str(c["MLP_irreps"]),
        "correlation": int(c["correlation"]), "avg_num_neighbors": float(c["avg_num_neighbors"]),
        "radial_MLP": [int(x) for x in c["radial_MLP"]], "gate": _name_of(c["gate"], modules.gate_dict, "gate"),
        "interaction": _name_of(c["interaction_cls"], modules.interaction_classes, "interaction block"),
        "interaction_first": _name_of(c["interaction_cls_first"], modules.interaction_classes,
                                      "first interaction block"),
        "readout": _name_of(c["readout_cls"], modules.readout_classes, "readout block"),
        "radial_type": str(c["radial_type"]), "distance_transform": str(c["distance_transform"] or "None"),
        "pair_repulsion": bool(c["pair_repulsion"]), "apply_cutoff": bool(c["apply_cutoff"]),
        "use_reduced_cg": bool(c["use_reduced_cg"]), "use_so3": bool(c["use_so3"]),
        "use_agnostic_product": bool(c["use_agnostic_product"]),
        "use_last_readout_only": bool(c["use_last_readout_only"]),
        "use_edge_irreps_first": bool(c["use_edge_irreps_first"]),
        "edge_irreps": None if c["edge_irreps"] is None else str(c["edge_irreps"]),
        "keep_last_layer_irreps": bool(getattr(mace_model, "keep_last_layer_irreps", False)),
        "atomic_inter_scale": float(scale[0]), "atomic_inter_shift": float(shift[0]),
        "heads": list(c["heads"]), "dtype": "float64" if dtype == torch.float64 else "float32",
    }


def wrap_mace_model(mace_model: nn.Module, head: Optional[str] = None) -> NNIP:
    """Our `NNIP` holding a copy of a ``ScaleShiftMACE``: the network is rebuilt from the
    recorded hyper-parameters and given the model's weights (so a saved file rebuilds it
    exactly), its element energies (E0s) move into the NNIP's float64 offsets."""
    _mace()
    if head is not None or len(getattr(mace_model, "heads", ["Default"])) > 1:
        from mace.tools.scripts_utils import remove_pt_head

        try:
            mace_model = remove_pt_head(mace_model, head)
        except ValueError as err:
            raise InputError(f"cannot keep head {head!r} of this MACE model: {err}") from None
    hparams = hparams_of(mace_model)
    net = build(**hparams)
    source = {k: v.detach() for k, v in mace_model.state_dict().items()}
    target = net.mace.state_dict()
    e0_key = "atomic_energies_fn.atomic_energies"
    e0 = source.pop(e0_key).to(torch.float64).reshape(-1)
    missing = sorted(set(target) - set(source) - {e0_key})
    unexpected = sorted(set(source) - set(target))
    if missing or unexpected:
        raise InputError(f"this MACE model's weights do not fit the model its configuration rebuilds "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    fitted = {}
    for key, value in source.items():
        if value.numel() != target[key].numel():
            raise InputError(f"this MACE model's weight {key} has shape {tuple(value.shape)}, "
                             f"the rebuilt model {tuple(target[key].shape)}")
        fitted[key] = value.reshape(target[key].shape)
    fitted[e0_key] = torch.zeros_like(target[e0_key])
    net.mace.load_state_dict(fitted)
    model = NNIP(net, spec={"architecture": NAME, "preset": None, "hparams": hparams})
    with torch.no_grad():
        model.atom_energies[torch.tensor(hparams["atomic_numbers"])] = e0
    return model


def import_mace_model(path, allow_pickle: bool = False, head: Optional[str] = None,
                      map_location: str = "cpu") -> NNIP:
    """A user's trained MACE ``.model`` file (``torch.save`` of the module, as mace writes
    it) as our `NNIP`; ``save_model(model, out)`` then writes it as our model file (weights
    and hyper-parameters, opened without pickle). A ``.model`` file is a pickle, which can
    run any code when it is opened: refused unless ``allow_pickle=True`` (trusted files)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"MACE model file {path} does not exist")
    if not allow_pickle:
        raise InputError(f"{path}: a MACE .model file is a pickled Python object, and opening it runs code from the "
                         "file; pass allow_pickle=True (CLI: --allow-pickle) only for a file you trust")
    _mace()
    try:
        mace_model = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many kinds; the message is what matters
        first = str(err).splitlines()[0] if str(err) else repr(err)
        raise InputError(f"{path}: not a readable MACE model file ({first})") from None
    if isinstance(mace_model, torch.jit.ScriptModule) or not isinstance(mace_model, nn.Module):
        raise InputError(f"{path}: holds a {type(mace_model).__name__}, not a MACE model module "
                         "(TorchScript-compiled MACE files cannot be imported: use the .model file that "
                         "mace_run_train wrote)")
    return wrap_mace_model(mace_model, head=head)


def load_foreign(path, allow_pickle: bool = False) -> NNIP:
    """`ArchitectureFamily.load_foreign`: `import_mace_model` with its defaults."""
    return import_mace_model(path, allow_pickle=allow_pickle)


# --- back out: a MACE .model file ---------------------------------------------------------------
def to_mace_module(model: NNIP, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A standalone ``ScaleShiftMACE`` giving `model`'s energies: our float64 element offsets
    become its E0s and our energy scale is folded into its scale and shift."""
    net = getattr(model, "net", None)
    if not isinstance(model, NNIP) or not isinstance(net, MACENetwork):
        arch = (getattr(model, "spec", None) or {}).get("architecture", type(model).__name__)
        raise InputError(f"only models of the 'mace' architecture can be written as MACE files (this one is {arch!r})")
    python = net.__dict__.get("python_mace", net.mace)  # a scripted live model keeps the Python module here
    mace_model = copy.deepcopy(python).cpu()
    mace_model.load_state_dict(net.mace.state_dict())  # the weights the model computes with
    if dtype is not None:
        mace_model = mace_model.to(dtype)
    zs = torch.tensor(model.spec["hparams"]["atomic_numbers"], dtype=torch.long)
    scale = model.energy_scale.detach().to(torch.float64).cpu()
    with torch.no_grad():
        e0 = mace_model.atomic_energies_fn.atomic_energies
        e0.copy_((model.atom_energies.detach().cpu()[zs] + e0.reshape(-1).to(torch.float64) * scale).reshape(e0.shape))
        for buffer in (mace_model.scale_shift.scale, mace_model.scale_shift.shift):
            buffer.mul_(scale.to(buffer.dtype))
    for p in mace_model.parameters():
        p.requires_grad_(True)
    return mace_model.eval()


def load_mace_file(path) -> NNIP:
    """Our model file of the mace architecture (written by `save_model`), opened without pickle."""
    from openmm_stable.models import model_from_record, read_model_record

    record = read_model_record(path)
    if record.architecture != NAME:
        raise InputError(f"{path}: a {record.architecture!r} model; only 'mace' models can be written as MACE files")
    return model_from_record(record)


def export_mace_model(model_or_file, out_path, dtype: Optional[torch.dtype] = torch.float64) -> Path:
    """Write a (refined) mace-architecture model, an `NNIP` or our model file, as a MACE
    ``.model`` file (``torch.save`` of the module, as mace does; float64 by default, as
    mace_run_train writes them) for ``MACECalculator`` and openmm-ml's ``MLPotential('mace')``."""
    model = load_mace_file(model_or_file) if isinstance(model_or_file, (str, Path)) else model_or_file
    mace_model = to_mace_module(model, dtype)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        torch.save(mace_model, tmp)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def hparams_from_data(dataset, hparams: dict, max_frames: int = 100) -> dict:
    """What MACE takes from its training frames: the element table (the one-hot covers the
    dataset's elements, no more) and the mean number of neighbours within the cutoff (MACE
    divides its messages by it), over up to `max_frames` frames."""
    from openmm_stable.geometry import pair_distances

    frames = dataset.positions[:: max(1, len(dataset) // max_frames)][:max_frames]
    d = pair_distances(frames, dataset.box)  # (F, pairs), each unordered pair once
    neighbours = 2.0 * float((d < float(hparams["cutoff"])).sum()) / (len(frames) * dataset.n_atoms)
    return {"atomic_numbers": sorted({int(z) for z in dataset.atomic_numbers}),
            "avg_num_neighbors": max(neighbours, 1.0)}


FAMILY = ArchitectureFamily(
    name=NAME, presets=PRESETS, build=build, extension_imports=(), load_foreign=load_foreign,
    extra_hparams=tuple(EXTRA_DEFAULTS), hparams_from_data=hparams_from_data,
    description="MACE (mace-torch ScaleShiftMACE), neighbour list in the graph; imports and exports .model files",
)

__all__ = ["FAMILY", "MACENetwork", "PRESETS", "build", "export_mace_model", "hparams_of", "import_mace_model",
           "hparams_from_data", "load_mace_file", "to_mace_module", "wrap_mace_model"]

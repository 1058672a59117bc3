"""Models trained by other programs, read into our model record: torchmd-net checkpoints.

A user who trained with ``torchmd-train`` has a PyTorch Lightning checkpoint (``.ckpt``):
the Lightning module's ``state_dict`` (the network's weights under ``model.``), its
``hyper_parameters`` (torchmd-train's arguments, ``prior_args`` included) and trainer state.
`import_torchmdnet_checkpoint` rebuilds the network with torchmd-net's own
``create_model`` from those arguments, loads the weights and wraps it as our `NNIP` with
the spec of the ``torchmd-net`` family (`FAMILY`, below): `save_model` then writes our
record (weights + the arguments as plain data), which `load_model` reopens without pickle,
so `simulate`, `refine`, `export` and `openmm_stable.ase` take it like any of our files.

>>> from openmm_stable.models import save_model
>>> from openmm_stable.models.foreign import import_torchmdnet_checkpoint
>>> model = import_torchmdnet_checkpoint("epoch=99-val_loss=0.01.ckpt", allow_pickle=True)
>>> save_model(model, "model.pt", atomic_numbers=z)

Reading: with torch's weights-only reader first (a checkpoint of plain tensors, numbers and
text needs nothing more); a checkpoint that holds other Python objects is a pickle, which
can run code when it is opened, so it is refused unless ``allow_pickle=True``.

Units: torchmd-net does not record them. Positions are taken as Angstrom (as openmm-ml's
``MLPotential('torchmdnet')`` assumes); the energy unit of the training data is
``energy_unit`` (default eV), converted to our eV by the `NNIP` energy scale.
"""
from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from openmm_stable.errors import InputError
from openmm_stable.models.base import NNIP
from openmm_stable.models.registry import ArchitectureFamily

NAME = "torchmd-net"
# Priors that need nothing but z, positions, batch and box (Coulomb needs partial charges).
SUPPORTED_PRIORS = ("Atomref", "LearnableAtomref", "ZBL", "D2")
_STATE_PREFIX = "model."  # the Lightning module (LNNP) holds the network as `self.model`


def read_checkpoint(path, allow_pickle: bool = False) -> dict:
    """The checkpoint's contents: weights-only reader first; the pickle reader only with
    ``allow_pickle=True`` (it runs code from the file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), None)
        if found is None:  # not a refusal of a Python object: a damaged or foreign file
            raise InputError(f"{path}: not a readable checkpoint ({_first_line(err)})") from None
        if not allow_pickle:
            raise InputError(f"{path}: this checkpoint holds Python objects ({found}), so opening it runs code from "
                             "the file (pickle); pass allow_pickle=True (CLI: --allow-pickle) only for a file you "
                             "trust") from None
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:  # torch and pickle raise many kinds; the message is what matters
            raise InputError(f"{path}: not a readable checkpoint ({_first_line(err2)})") from None
    except Exception as err:
        raise InputError(f"{path}: not a readable checkpoint ({_first_line(err)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        keys = ", ".join(map(str, list(checkpoint)[:8])) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise InputError(f"{path}: not a torchmd-train checkpoint (no 'state_dict' and 'hyper_parameters'; has {keys})")
    return checkpoint


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _plain(value) -> tuple[bool, Any]:
    """(ok, value as plain data): what our record can store without pickle."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True, value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if isinstance(value, dict):
        items = {str(k): _plain(v) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    return False, None


def checkpoint_args(hyper_parameters, total_energy: bool = False) -> dict:
    """torchmd-train's arguments as plain data that rebuild the network, with clear errors
    for models our protocol (z, positions, batch, box -> energies) cannot run."""
    if not isinstance(hyper_parameters, dict):
        hyper_parameters = vars(hyper_parameters) if hasattr(hyper_parameters, "__dict__") else None
    if not isinstance(hyper_parameters, dict):
        raise InputError("the checkpoint's hyper_parameters are not a mapping of torchmd-train arguments")
    args = {}
    for key, value in dict(hyper_parameters).items():
        ok, plain = _plain(value)
        if ok:  # anything else (e.g. a stray object) is trainer state, not needed by create_model
            args[str(key)] = plain
    missing = [k for k in ("model", "embedding_dimension", "num_layers", "cutoff_upper", "precision") if k not in args]
    if missing:
        raise InputError(f"not torchmd-train hyper-parameters (missing {', '.join(missing)})")
    if args.get("charge") or args.get("spin"):
        raise InputError("this torchmd-net model takes the total charge or spin as input (charge/spin=True); "
                         "openmm-stable's model protocol passes atomic numbers, positions and box only")
    if args.get("coulomb_cutoff") is not None or "Coul" in str(args.get("output_model", "")):
        raise InputError(f"output model {args.get('output_model')!r} needs partial charges; not supported")
    if args.get("model") == "tensornet" and "check_errors" in args:
        raise InputError("an old-layout TensorNet checkpoint (it records 'check_errors'); load it once with "
                         "torchmdnet.models.model.load_model and save a checkpoint with torchmd-net 3.1 first")
    for name in _prior_names(args):
        if name not in SUPPORTED_PRIORS:
            raise InputError(f"prior model {name!r} is not supported (it needs inputs beyond z, positions and box); "
                             f"supported: {', '.join(SUPPORTED_PRIORS)}")
    args["derivative"] = False  # our wrapper takes forces by autograd from the energies
    if total_energy and args.get("remove_ref_energy"):
        # torchmd-train's delta learning: the last prior is Atomref(enable=False); switching it
        # on predicts total energies, as torchmd-net's load_model(remove_ref_energy=False) does.
        prior_args = args.get("prior_args")
        if not (isinstance(prior_args, list) and prior_args and isinstance(prior_args[-1], dict)):
            raise InputError("remove_ref_energy is set but the checkpoint records no Atomref prior arguments")
        prior_args[-1]["enable"] = True
    return args


def _prior_names(args: dict) -> list[str]:
    prior = args.get("prior_model")
    if not prior:
        return []
    names = []
    for item in prior if isinstance(prior, list) else [prior]:
        names.extend(item.keys() if isinstance(item, dict) else [item])
    return [str(n) for n in names]


def build(args: dict, cutoff: float, mean_shape=(), std_shape=()) -> nn.Module:
    """The network of a torchmd-net model from torchmd-train's arguments (`checkpoint_args`):
    `FAMILY.build`, which `load_model` calls before loading the recorded weights."""
    from openmm_stable.models.torchmdnet import TorchMDNetEnergy  # also quiets warp's banner
    from torchmdnet.models.model import create_model

    args = copy.deepcopy(dict(args))
    if float(args["cutoff_upper"]) != float(cutoff):
        raise InputError(f"recorded cutoff {cutoff} differs from the model's cutoff_upper {args['cutoff_upper']}")
    # mean/std are buffers whose shape the checkpoint fixes; their values come with the weights
    network = create_model(args, mean=torch.zeros(tuple(mean_shape)), std=torch.ones(tuple(std_shape)))
    _float_cutoffs(network)
    return TorchMDNetEnergy(network)


def _float_cutoffs(network: nn.Module) -> None:
    """torchmd-net 3.1's ZBL prior gives its neighbour list an integer lower cutoff (0),
    which TorchScript refuses (export, simulate); the same value as a float."""
    for module in network.modules():
        for name in ("cutoff_lower", "cutoff_upper"):
            value = getattr(module, name, None)
            if type(value) is int:
                setattr(module, name, float(value))


def _network_state(state_dict: dict) -> dict:
    """The network's weights from the Lightning module's: the `model.` prefix removed."""
    prefixed = {k[len(_STATE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_STATE_PREFIX)}
    return prefixed or dict(state_dict)


def import_torchmdnet_checkpoint(path, allow_pickle: bool = False, energy_unit: str = "eV",
                                 total_energy: bool = False) -> NNIP:
    """A torchmd-train checkpoint (``.ckpt``) as our `NNIP` (spec of the ``torchmd-net``
    family), giving torchmd-net's own energies times the `energy_unit` -> eV factor.

    ``total_energy``: for a model trained with ``--remove-ref-energy``, add back the
    reference (Atomref) energies; by default the model predicts what torchmd-net's
    ``load_model`` predicts for the file."""
    from openmm_stable.units import energy_factor

    scale = energy_factor(energy_unit)  # InputError for an unknown unit, before the file is read
    checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
    args = checkpoint_args(checkpoint["hyper_parameters"], total_energy=total_energy)
    state = _network_state(checkpoint["state_dict"])
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: the checkpoint's state_dict holds something other than tensors")
    state.setdefault("representation_model.distance.box", torch.zeros(3, 3))  # older checkpoints lack it
    hparams = {"args": args, "cutoff": float(args["cutoff_upper"]),
               "mean_shape": list(state["mean"].shape) if "mean" in state else [],
               "std_shape": list(state["std"].shape) if "std" in state else []}
    try:
        net = build(**hparams)
    except (KeyError, ValueError, TypeError, AssertionError) as err:
        raise InputError(f"{path}: torchmd-net cannot build the model its hyper-parameters describe "
                         f"({_first_line(err)})") from None
    try:
        net.model.load_state_dict(state)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise InputError(f"{path}: the checkpoint's weights do not fit the model its hyper-parameters describe "
                         f"({'; '.join(lines[1:3]) or lines[0]}); a checkpoint of an older torchmd-net may need "
                         "torchmd-net's load_model and a re-save") from None
    model = NNIP(net, spec={"architecture": NAME, "preset": None, "hparams": hparams})
    with torch.no_grad():
        model.energy_scale.fill_(scale)
    return model.eval()


def load_foreign(path, allow_pickle: bool = False) -> NNIP:
    """`ArchitectureFamily.load_foreign`: `import_torchmdnet_checkpoint` with its defaults."""
    return import_torchmdnet_checkpoint(path, allow_pickle=allow_pickle)


# Imported torchmd-net models of any of its architectures; no presets: `pretrain` builds
# torchmd-net networks through the graph-network / equivariant-transformer / tensornet families.
FAMILY = ArchitectureFamily(
    name=NAME, presets={}, build=build, extension_imports=("torchmdnet.models.model",),
    load_foreign=load_foreign, extra_hparams=("args", "cutoff", "mean_shape", "std_shape"),
    description="a torchmd-net model trained by torchmd-train, imported from its .ckpt")

__all__ = ["FAMILY", "NAME", "SUPPORTED_PRIORS", "build", "checkpoint_args", "import_torchmdnet_checkpoint",
           "load_foreign", "read_checkpoint"]

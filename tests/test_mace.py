"""MACE as a family: our adapter against mace-torch's own MACECalculator, in PyTorch, in
TorchScript and in OpenMM; the Boltzmann estimator through it; a user's .model file in
(pickle only on request), through our record (no pickle), and back out as a .model.

The "user's" model is made the way mace makes one: mace's own ScaleShiftMACE class with
E0s, a scale and a shift, trained here for a few steps on ethanol frames whose energies
come from an analytic bond potential, and written with torch.save as mace_run_train does.
Tolerances are float64 ones (1e-6 relative to the largest force component); a wrong shift,
unit, element order or E0 shows at the size of the values.
"""
from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("mace")

from openmm_stable.errors import InputError  # noqa: E402
from openmm_stable.models import (create_model, import_foreign_model, load_model, read_model_record,  # noqa: E402
                                  save_model)
from openmm_stable.models.base import NNIP, batch_index, check_cutoff_fits_box, energy_and_forces  # noqa: E402
from openmm_stable.models.mace import FAMILY, MACENetwork, build, export_mace_model, import_mace_model  # noqa: E402
from openmm_stable.units import EV_IN_KJ_PER_MOL, NM_IN_ANGSTROM  # noqa: E402

from _structures import ETHANOL_BONDS, ETHANOL_POSITIONS, ETHANOL_Z  # noqa: E402

RTOL = 1e-6
E0S = {1: -13.6, 6: -1029.8, 8: -2042.6}  # eV, per element: MACE's E0s of the user's model


def _rel_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _user_mace(zs, cutoff, e0s, scale=0.7, shift=0.05, seed=0):
    """A ScaleShiftMACE made with mace's own constructor, float64 (as mace trains)."""
    import mace  # noqa: F401
    from e3nn import o3
    from mace import modules

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        return modules.ScaleShiftMACE(
            r_max=cutoff, num_bessel=6, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block,
            interaction_cls_first=block, num_interactions=2, num_elements=len(zs),
            hidden_irreps=o3.Irreps("8x0e + 8x1o"), MLP_irreps=o3.Irreps("8x0e"), gate=torch.nn.functional.silu,
            atomic_energies=np.array(e0s), avg_num_neighbors=6.0, atomic_numbers=list(zs), correlation=2,
            radial_MLP=[16, 16], atomic_inter_scale=scale, atomic_inter_shift=shift)
    finally:
        torch.set_default_dtype(previous)


def _bond_energy(frames: torch.Tensor) -> torch.Tensor:
    """Analytic reference: harmonic bonds about the reference lengths (eV, Angstrom)."""
    ref = torch.as_tensor(ETHANOL_POSITIONS)
    b = torch.tensor(ETHANOL_BONDS)
    r0 = (ref[b[:, 1]] - ref[b[:, 0]]).norm(dim=-1)
    r = (frames[:, b[:, 1]] - frames[:, b[:, 0]]).norm(dim=-1)
    return 5.0 * ((r - r0) ** 2).sum(-1)


def _ethanol_frames(n: int, seed: int, sigma: float = 0.08) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.as_tensor(ETHANOL_POSITIONS[None] + sigma * rng.standard_normal((n, 9, 3)))


@pytest.fixture(scope="module")
def user_model_file(tmp_path_factory) -> pathlib.Path:
    """The user's trained ethanol MACE, as a .model file (a pickle of the module)."""
    zs = [1, 6, 8]
    mace_model = _user_mace(zs, 4.0, [E0S[z] for z in zs])
    net = MACENetwork(mace_model)  # only to train it: the file holds mace's module alone
    frames = _ethanol_frames(8, seed=1).requires_grad_(True)
    energies = _bond_energy(frames)
    (forces,) = torch.autograd.grad(-energies.sum(), frames)
    energies = energies.detach() + sum(E0S[int(z)] for z in ETHANOL_Z)
    z, batch = torch.as_tensor(ETHANOL_Z).repeat(8), batch_index(8, 9)
    optimiser = torch.optim.Adam(mace_model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        pos = frames.detach().reshape(-1, 3).requires_grad_(True)
        e = net(z, pos, batch, None)
        (g,) = torch.autograd.grad(e.sum(), pos, create_graph=True)
        loss = ((e - energies) ** 2).mean() + ((-g - forces.reshape(-1, 3)) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]  # it did train
    path = tmp_path_factory.mktemp("user") / "ethanol.model"
    torch.save(mace_model.eval(), path)
    return path


@pytest.fixture(scope="module")
def imported(user_model_file) -> NNIP:
    return import_foreign_model("mace", user_model_file, allow_pickle=True)  # the registry's way in


def _calculator(model_or_path):
    from mace.calculators import MACECalculator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(model_or_path, (str, pathlib.Path)):
            return MACECalculator(model_paths=str(model_or_path), device="cpu", default_dtype="float64")
        return MACECalculator(models=model_or_path, device="cpu", default_dtype="float64")


def _mace_energy_forces(calc, z, pos, box=None):
    from ase import Atoms

    atoms = Atoms(numbers=z, positions=pos, cell=box, pbc=box is not None)
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


def _ours(model, z, pos, box=None):
    e, f = energy_and_forces(model, torch.as_tensor(z), torch.as_tensor(pos), batch_index(1, len(z)),
                             None if box is None else torch.as_tensor(box))
    return float(e[0]), f.detach().numpy()


# --- bring your own: refusal, pickle safety -------------------------------------------------------
def test_import_refuses_a_pickle_without_opt_in(user_model_file, tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    hostile = tmp_path / "hostile.model"
    torch.save(Payload(), hostile)
    for path in (user_model_file, hostile):
        with pytest.raises(InputError, match="allow_pickle=True"):
            import_mace_model(path)
        with pytest.raises(InputError, match="allow_pickle=True"):
            import_foreign_model("mace", path)
    assert not marker.exists()
    with pytest.raises(InputError, match="not a MACE model module"):
        import_mace_model(hostile, allow_pickle=True)  # opened on request: it ran, and is not a model
    assert marker.exists()
    with pytest.raises(InputError, match="does not exist"):
        import_mace_model(tmp_path / "missing.model", allow_pickle=True)


def test_pickle_payload_is_still_refused_after_importing_mace(tmp_path):
    import mace  # noqa: F401  (sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD for the process)

    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "model.pt"
    torch.save({"spec": {"architecture": "mace"}, "state_dict": {}, "extra": Payload()}, path)
    with pytest.raises(InputError, match="refused to open"):
        read_model_record(path)
    assert not marker.exists()


# --- the adapter against MACECalculator ---------------------------------------------------------
def test_import_matches_mace_calculator_on_a_molecule(imported, user_model_file):
    assert imported.spec["architecture"] == "mace" and imported.spec["hparams"]["atomic_numbers"] == [1, 6, 8]
    assert imported.spec["hparams"]["cutoff"] == 4.0 and imported.spec["hparams"]["dtype"] == "float64"
    assert float(imported.atom_energies[8]) == E0S[8]  # E0s carried by our float64 offsets
    calc = _calculator(user_model_file)
    for seed in (2, 3):
        pos = _ethanol_frames(1, seed, sigma=0.1)[0].numpy()
        e_ref, f_ref = _mace_energy_forces(calc, ETHANOL_Z, pos)
        e, f = _ours(imported, ETHANOL_Z, pos)
        assert np.abs(f_ref).max() > 0.05
        assert _rel_error(f, f_ref) < RTOL
        assert abs(e - e_ref) < RTOL * abs(e_ref)


def _water(n_molecules=16, triclinic=False):
    from openmm_stable.data.water import build_water_box

    z, pos, box = build_water_box(n_molecules, seed=3)
    if triclinic:  # a reduced triclinic box (as OpenMM takes them)
        box = box.copy()
        box[1, 0], box[2, 1] = 0.2 * box[0, 0], -0.15 * box[0, 0]
    rng = np.random.default_rng(4)
    pos = pos + 0.05 * rng.standard_normal(pos.shape)
    pos[:6] += box[0] - box[2]  # two molecules outside the box: images must not matter
    return z, pos, box


@pytest.mark.parametrize("triclinic", [False, True], ids=["cubic", "triclinic"])
def test_adapter_matches_mace_calculator_in_a_periodic_water_box(triclinic):
    zs, cutoff = [1, 8], 3.5
    mace_model = _user_mace(zs, cutoff, [-13.6, -2042.6], seed=5)
    model = NNIP(MACENetwork(mace_model), spec={"architecture": "mace", "hparams": {"cutoff": cutoff}})
    z, pos, box = _water(triclinic=triclinic)
    check_cutoff_fits_box(model, box)
    # Our offsets are zero here: MACE's E0s stay inside the network, as in mace's own file.
    e_ref, f_ref = _mace_energy_forces(_calculator(mace_model), z, pos, box)
    e, f = _ours(model, z, pos, box)
    assert np.abs(f_ref).max() > 0.05
    assert _rel_error(f, f_ref) < RTOL
    assert abs(e - e_ref) < RTOL * abs(e_ref)
    # the same structure in vacuum differs: the periodic images did count
    _, f_vacuum = _ours(model, z, pos)
    assert _rel_error(f_vacuum, f_ref) > 1e-2


def test_batched_replicas_equal_one_by_one(imported):
    frames = _ethanol_frames(3, seed=6, sigma=0.1)
    z = torch.as_tensor(ETHANOL_Z)
    e, f = energy_and_forces(imported, z.repeat(3), frames.reshape(-1, 3), batch_index(3, 9))
    f = f.reshape(3, 9, 3)
    for k in range(3):
        e1, f1 = energy_and_forces(imported, z, frames[k], batch_index(1, 9))
        assert abs(float(e[k] - e1[0])) < 1e-9 * abs(float(e1[0]))
        assert _rel_error(f[k], f1) < 1e-10
    assert _rel_error(f[0], f[1]) > 1e-2  # the replicas differ, so a swap would show
    # per-atom energies sum to the structure energies (StABlE's local samples need them)
    atoms = imported.atom_energies_of(z.repeat(3), frames.reshape(-1, 3), batch_index(3, 9)).reshape(3, 9)
    assert torch.allclose(atoms.sum(1), e.detach(), rtol=1e-12, atol=0)


# --- TorchScript and OpenMM ----------------------------------------------------------------------
def _openmm_energy_forces(force, frames_angstrom, box=None):
    import openmm
    from openmm import unit

    system = openmm.System()
    for _ in range(frames_angstrom.reshape(-1, 3).shape[0]):
        system.addParticle(1.0)
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*[openmm.Vec3(*row) for row in np.asarray(box) / NM_IN_ANGSTROM])
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(1e-4), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(frames_angstrom.reshape(-1, 3) / NM_IN_ANGSTROM)
    state = context.getState(getEnergy=True, getForces=True)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole), np.asarray(forces)


def test_scripted_adapter_and_replica_torchforce_give_the_pytorch_forces(imported, tmp_path):
    import torch  # noqa: F401  (before openmmtorch)
    from openmm_stable.export import export_model, make_torch_force, script_force_module

    frames = _ethanol_frames(2, seed=7, sigma=0.1)
    z = torch.as_tensor(ETHANOL_Z)
    e, f = energy_and_forces(imported, z.repeat(2), frames.reshape(-1, 3), batch_index(2, 9))
    live = copy.deepcopy(imported)
    parameters = [id(p) for p in live.parameters()]
    scripted = torch.jit.script(live)
    e_s, f_s = energy_and_forces(scripted, z.repeat(2), frames.reshape(-1, 3), batch_index(2, 9))
    assert _rel_error(f_s, f) < 1e-12 and torch.allclose(e_s, e, rtol=1e-14)
    # torch swaps the compiled module into the scripted live model: same weights, same results
    assert isinstance(live.net.mace, torch.jit.ScriptModule) and [id(p) for p in live.parameters()] == parameters
    assert _rel_error(energy_and_forces(live, z.repeat(2), frames.reshape(-1, 3), batch_index(2, 9))[1], f) < 1e-12
    assert not isinstance(imported.net.mace, torch.jit.ScriptModule)

    expected_f = f.detach().numpy() * EV_IN_KJ_PER_MOL * NM_IN_ANGSTROM
    expected_e = float(e.sum()) * EV_IN_KJ_PER_MOL
    path = export_model(imported, tmp_path / "replicas.pt", ETHANOL_Z, n_replicas=2, dtype=torch.float64)
    forms = {"file": make_torch_force(str(path)),
             "engine": make_torch_force(script_force_module(imported, ETHANOL_Z, 2, dtype=torch.float64, guarded=True),
                                        outputs_forces=True)}
    for form, force in forms.items():
        energy, forces = _openmm_energy_forces(force, frames.numpy())
        assert abs(energy - expected_e) < RTOL * abs(expected_e), form
        assert _rel_error(forces, expected_f) < RTOL, form
    # float32, the engine's default: the network is cast, the float64 offsets are not
    force = make_torch_force(script_force_module(imported, ETHANOL_Z, 2, dtype=torch.float32, guarded=True),
                             outputs_forces=True)
    energy, forces = _openmm_energy_forces(force, frames.numpy())
    assert abs(energy - expected_e) < 1e-6 * abs(expected_e) and _rel_error(forces, expected_f) < 1e-4

    # The exported file runs in a process that never imports mace (no extension ops).
    code = ("import sys, torch; m = torch.jit.load(sys.argv[1]); "
            "p = torch.tensor(__import__('numpy').load(sys.argv[2])); print(float(m(p)), 'mace' in sys.modules)")
    np.save(tmp_path / "p.npy", frames.numpy().reshape(-1, 3) / NM_IN_ANGSTROM)
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "p.npy")], capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out[1] == "False" and abs(float(out[0]) - expected_e) < RTOL * abs(expected_e)


def test_periodic_torchforce_matches_pytorch():
    from openmm_stable.export import make_torch_force, script_force_module

    zs, cutoff = [1, 8], 3.5
    model = NNIP(MACENetwork(_user_mace(zs, cutoff, [0.0, 0.0], seed=8)),
                 spec={"architecture": "mace", "hparams": {"cutoff": cutoff}})
    z, pos, box = _water()
    e, f = _ours(model, z, pos, box)
    force = make_torch_force(script_force_module(model, z, 1, dtype=torch.float64), periodic=True)
    energy, forces = _openmm_energy_forces(force, pos, box)
    assert abs(energy - e * EV_IN_KJ_PER_MOL) < RTOL * abs(e * EV_IN_KJ_PER_MOL)
    assert _rel_error(forces, f * EV_IN_KJ_PER_MOL * NM_IN_ANGSTROM) < RTOL


# --- the Boltzmann estimator through MACE ----------------------------------------------------------
def test_boltzmann_gradient_matches_finite_difference(imported):
    """Same pattern as test_estimator: reweighting the samples to theta + eps*v gives L(<O>)(eps);
    its central difference equals the estimator's directional derivative (one backward pass)."""
    from openmm_stable.training.estimator import ObservableLoss, boltzmann_gradient, model_energy_fn
    from openmm_stable.units import kT_eV

    model = copy.deepcopy(imported)
    torch.manual_seed(9)
    frames = _ethanol_frames(12, seed=10, sigma=0.05)
    values = torch.cdist(frames, frames).reshape(12, -1)[:, 1:4]
    loss = ObservableLoss(values.mean(0) - 0.05, "mse")
    energy = model_energy_fn(model, torch.as_tensor(ETHANOL_Z))
    T = 500.0
    beta = 1 / kT_eV(T)
    model.zero_grad()
    boltzmann_gradient(energy, frames, values, loss, T)
    params = [p for p in model.parameters() if p.grad is not None]
    direction = [torch.randn_like(p) for p in params]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
    with torch.no_grad():
        u0 = energy(frames)

    def reweighted_loss(eps):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(eps * d)
            u = energy(frames)
            for p, d in zip(params, direction):
                p.sub_(eps * d)
            w = torch.softmax(-beta * (u - u0), 0)
            return float(loss((w[:, None] * values).sum(0)))

    eps = 1e-6
    numeric = (reweighted_loss(eps) - reweighted_loss(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-8
    assert numeric == pytest.approx(analytic, rel=1e-4, abs=1e-10)
    assert not frames.requires_grad  # the adapter never marks the caller's positions


# --- our record (no pickle) and back out to MACE ----------------------------------------------------
def test_import_to_record_loads_without_pickle_with_the_same_forces(imported, tmp_path):
    path = tmp_path / "ethanol.pt"
    save_model(imported, path, atomic_numbers=ETHANOL_Z)
    record = read_model_record(path)  # torch.load(weights_only=True)
    assert record.architecture == "mace" and record.cutoff == 4.0
    loaded = load_model(path)  # through the registry: FAMILY.build(**recorded hparams) + state dict
    pos = _ethanol_frames(1, seed=11, sigma=0.1)[0].numpy()
    e0, f0 = _ours(imported, ETHANOL_Z, pos)
    e1, f1 = _ours(loaded, ETHANOL_Z, pos)
    assert e1 == e0 and np.array_equal(f1, f0)


def test_export_to_mace_gives_our_forces(imported, tmp_path):
    """A "refined" model (weights moved, energy scale and offsets changed) written as a
    .model: MACECalculator and openmm-ml's MLPotential('mace') give our energies/forces."""
    refined = copy.deepcopy(imported)
    torch.manual_seed(12)
    with torch.no_grad():
        for p in refined.parameters():
            p.add_(0.05 * torch.randn_like(p))
        refined.energy_scale.fill_(1.3)
        refined.atom_energies[1] += 0.2
    record = tmp_path / "refined.pt"
    save_model(refined, record, atomic_numbers=ETHANOL_Z)
    out = export_mace_model(record, tmp_path / "refined.model")
    pos = _ethanol_frames(1, seed=13, sigma=0.1)[0].numpy()
    e, f = _ours(refined, ETHANOL_Z, pos)
    e_ref, f_ref = _mace_energy_forces(_calculator(out), ETHANOL_Z, pos)
    assert _rel_error(f_ref, f) < RTOL and abs(e_ref - e) < RTOL * abs(e)
    _, f_before = _ours(imported, ETHANOL_Z, pos)
    assert _rel_error(f_before, f) > 1e-2  # the refinement did change the forces

    import openmm
    from openmm import app, unit
    from openmmml import MLPotential

    topology = app.Topology()
    residue = topology.addResidue("ETH", topology.addChain())
    for k, number in enumerate(ETHANOL_Z):
        topology.addAtom(f"A{k}", app.Element.getByAtomicNumber(int(number)), residue)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        system = MLPotential("mace", modelPath=str(out)).createSystem(topology, precision="double")
    context = openmm.Context(system, openmm.VerletIntegrator(1e-4), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pos / NM_IN_ANGSTROM)
    forces = context.getState(getForces=True).getForces(asNumpy=True)
    forces = forces.value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    assert _rel_error(np.asarray(forces), f * EV_IN_KJ_PER_MOL * NM_IN_ANGSTROM) < RTOL

    with pytest.raises(InputError, match="only models of the 'mace' architecture"):
        export_mace_model(create_model("schnet", "tiny"), tmp_path / "schnet.model")


# --- the family ---------------------------------------------------------------------------------
def test_presets_build_and_rebuild_from_their_hparams():
    z = torch.as_tensor(ETHANOL_Z)
    pos = torch.as_tensor(ETHANOL_POSITIONS, dtype=torch.float32)
    for preset in ("tiny", "small"):
        torch.manual_seed(0)
        model = create_model("mace", preset, atomic_numbers=[1, 6, 8])
        e = model(z, pos, batch_index(1, 9), None)
        assert e.shape == (1,) and bool(torch.isfinite(e).all()) and next(model.parameters()).dtype == torch.float32
        again = build(**model.spec["hparams"])
        again.load_state_dict(model.net.state_dict())
        assert torch.equal(again(z, pos, batch_index(1, 9), None), model.net(z, pos, batch_index(1, 9), None))
    assert set(FAMILY.presets) == {"tiny", "small", "medium", "large"}
    with pytest.raises(InputError, match="no hyper-parameter"):
        FAMILY.hparams("tiny", {"chanels": 3})
    with pytest.raises(InputError, match="atomic_numbers"):
        build(**FAMILY.hparams("tiny", {"atomic_numbers": [8, 1]}))
    water = create_model("mace", "tiny", atomic_numbers=[1, 8])
    with pytest.raises(InputError, match=r"\['C'\] are outside this MACE model's element table \['H', 'O'\]"):
        water(z, pos, batch_index(1, 9), None)
    scripted = torch.jit.script(copy.deepcopy(water))
    with pytest.raises(Exception, match="outside the MACE model's element table"):
        scripted(z, pos, batch_index(1, 9), None)


@pytest.mark.slow
def test_a_file_written_by_mace_run_train_imports_exactly(tmp_path):
    """The real tool's output (its own defaults: another first interaction block, an
    unreduced CG basis, E0s averaged from the data): imported, saved as our record and
    written back, MACECalculator gives the same forces at every step."""
    from ase import Atoms
    from ase.io import write

    frames = _ethanol_frames(20, seed=14).requires_grad_(True)
    energies = _bond_energy(frames)
    (forces,) = torch.autograd.grad(-energies.sum(), frames)
    atoms = []
    for k in range(20):
        a = Atoms(numbers=ETHANOL_Z, positions=frames[k].detach().numpy())
        a.info["REF_energy"], a.arrays["REF_forces"] = float(energies[k]) - 100.0, forces[k].numpy()
        atoms.append(a)
    write(tmp_path / "train.xyz", atoms)
    command = [os.path.join(os.path.dirname(sys.executable), "mace_run_train"), "--name", "eth",
               "--train_file", "train.xyz", "--valid_fraction", "0.2", "--E0s", "average", "--model", "MACE",
               "--hidden_irreps", "8x0e+8x1o", "--r_max", "4.0", "--batch_size", "4", "--max_num_epochs", "2",
               "--device", "cpu", "--energy_key", "REF_energy", "--forces_key", "REF_forces",
               "--default_dtype", "float64", "--seed", "1"]
    subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=600, check=True)
    model = import_mace_model(tmp_path / "eth.model", allow_pickle=True)
    save_model(model, tmp_path / "ours.pt", atomic_numbers=ETHANOL_Z)
    export_mace_model(tmp_path / "ours.pt", tmp_path / "back.model")
    pos = _ethanol_frames(1, seed=15, sigma=0.1)[0].numpy()
    e, f = _ours(load_model(tmp_path / "ours.pt"), ETHANOL_Z, pos)
    for path in ("eth.model", "back.model"):
        e_ref, f_ref = _mace_energy_forces(_calculator(tmp_path / path), ETHANOL_Z, pos)
        assert _rel_error(f, f_ref) < RTOL and abs(e - e_ref) < RTOL * abs(e_ref), path
    with pytest.raises(InputError, match="TorchScript-compiled"):
        import_mace_model(tmp_path / "eth_compiled.model", allow_pickle=True)

"""Starting structures for reference-data generation: built-in names, SMILES, or structure files.

Built-in molecules are stored as SMILES and embedded with RDKit (ETKDG with a fixed seed,
then an MMFF relaxation), so the same name always gives the same geometry without
shipping coordinate files. Their atom order is RDKit's (heavy atoms in SMILES order,
then hydrogens), not the order of the MD17/MD22 files.

Usage::

    from openmm_stable.data.molecules import build_molecule
    z, pos = build_molecule("aspirin")     # or "CCO", or "start.xyz"
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from openmm_stable.errors import InputError

# Name -> SMILES. Names match case-insensitively. The alanine residues are given as
# L-alanine (the residue in the NequIP/StABlE Ac-Ala3-NHMe data); without stereo marks
# the embedding would pick chiralities at random.
BUILTIN_SMILES = {
    "aspirin": "CC(=O)OC1=CC=CC=C1C(=O)O",
    "ethanol": "CCO",
    "Ac-Ala3-NHMe": "CC(=O)N[C@@H](C)C(=O)N[C@@H](C)C(=O)N[C@@H](C)C(=O)NC",
    "water": "O",
    "benzene": "c1ccccc1",
    "malonaldehyde": "OC=CC=O",
    "uracil": "O=C1NC=CC(=O)N1",
    "toluene": "Cc1ccccc1",
    "naphthalene": "c1ccc2ccccc2c1",
    "salicylic-acid": "OC(=O)c1ccccc1O",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
}
_BY_LOWER = {name.lower(): name for name in BUILTIN_SMILES}

EMBED_SEED = 0xF00D  # fixed so a name or SMILES always embeds to the same geometry


def resolve_molecule(spec: str) -> dict:
    """Classify `spec` as a built-in name, a structure file or a SMILES string.

    Returns a dict for provenance: ``{"spec", "kind", "name"?, "smiles"?, "path"?}``.
    Raises ValueError (listing the built-in names) if it is none of these.
    """
    spec = str(spec).strip()
    if not spec:
        raise InputError(_unknown_message(spec))
    if spec.lower() in _BY_LOWER:
        name = _BY_LOWER[spec.lower()]
        return {"spec": spec, "kind": "builtin", "name": name, "smiles": BUILTIN_SMILES[name]}
    if os.path.isfile(spec):
        return {"spec": spec, "kind": "file", "path": str(Path(spec))}
    if _parse_smiles(spec) is not None:
        return {"spec": spec, "kind": "smiles", "smiles": spec}
    raise InputError(_unknown_message(spec))


def build_molecule(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """(atomic numbers, positions in Angstrom) for a built-in name, SMILES or structure file.

    A structure file is read with ASE (its first frame). SMILES get explicit hydrogens,
    an ETKDG embedding with a fixed seed and an MMFF (or UFF) relaxation.
    """
    info = resolve_molecule(spec)
    if info["kind"] == "file":
        import ase.io

        try:
            atoms = ase.io.read(info["path"], index=0)
        except Exception as err:  # ASE raises many types for unparseable files
            raise InputError(f"{info['path']}: cannot read a structure ({type(err).__name__}: {err})") from None
        if len(atoms) == 0:
            raise InputError(f"{info['path']}: structure has no atoms")
        return atoms.get_atomic_numbers().astype(np.int64), atoms.get_positions().astype(np.float64)
    return _embed_smiles(info["smiles"])


def _unknown_message(spec: str) -> str:
    return (
        f"unknown molecule {spec!r}: not a built-in name, an existing structure file, or a valid "
        f"SMILES string; built-in names: {', '.join(BUILTIN_SMILES)}"
    )


def _parse_smiles(smiles: str):
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # a failed parse is an expected outcome here, not noise
    try:
        return Chem.MolFromSmiles(smiles)
    finally:
        RDLogger.EnableLog("rdApp.*")


def _embed_smiles(smiles: str) -> tuple[np.ndarray, np.ndarray]:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = _parse_smiles(smiles)
    if mol is None:
        raise InputError(_unknown_message(smiles))
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = EMBED_SEED
    if AllChem.EmbedMolecule(mol, params) != 0:
        params.useRandomCoords = True  # rescue for awkward ring systems
        if AllChem.EmbedMolecule(mol, params) != 0:
            raise InputError(f"RDKit could not embed SMILES {smiles!r} in 3D")
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    else:
        AllChem.UFFOptimizeMolecule(mol, maxIters=2000)
    z = np.array([atom.GetAtomicNum() for atom in mol.GetAtoms()], dtype=np.int64)
    positions = np.array(mol.GetConformer().GetPositions(), dtype=np.float64)
    return z, positions

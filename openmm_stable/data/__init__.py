"""Datasets: the `QMDataset` container, file formats, splits and offline xTB reference data.

Usage::

    from openmm_stable.data import load_dataset, split_dataset
    ds = load_dataset("rmd17_aspirin.npz")                 # any supported format, eV/Angstrom
    train, val, test = split_dataset(ds, "1k", "100", "200", mode="random", seed=0)

Generation (`generate_xtb_dataset`; `generate_water_dataset` for a periodic SPC/Fw water
box run in OpenMM) and built-in molecules (`build_molecule`) import ASE, RDKit, tblite and
OpenMM only when called, so importing this package stays cheap.
"""
from openmm_stable.data.dataset import DatasetError, QMDataset
from openmm_stable.data.formats import FORMATS, load_dataset, save_dataset
from openmm_stable.data.generate import generate_xtb_dataset
from openmm_stable.data.molecules import BUILTIN_SMILES, build_molecule
from openmm_stable.data.splits import Split, parse_size, split_dataset, split_indices
from openmm_stable.data.water import generate_water_dataset

__all__ = [
    "BUILTIN_SMILES",
    "DatasetError",
    "FORMATS",
    "QMDataset",
    "Split",
    "build_molecule",
    "generate_water_dataset",
    "generate_xtb_dataset",
    "load_dataset",
    "parse_size",
    "save_dataset",
    "split_dataset",
    "split_indices",
]

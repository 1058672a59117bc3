"""Unit conventions, in one place.

Internally openmm-stable works in Angstrom, eV, ps, K and amu (ASE's convention and
openmm-ml's default for torchmd-net models). OpenMM works in nm, kJ/mol, ps; the
conversion happens only at the OpenMM boundary (`openmm_stable.export`, `openmm_stable.engine`).
"""

from openmm_stable.errors import InputError

EV_IN_KJ_PER_MOL = 96.48533212331002
KCAL_PER_MOL_IN_EV = 4.184 / EV_IN_KJ_PER_MOL
HARTREE_IN_EV = 27.211386245988
BOHR_IN_ANGSTROM = 0.529177210903
NM_IN_ANGSTROM = 10.0
BOLTZMANN_EV_PER_K = 8.617333262e-5

# Energy units accepted by the loaders, as the factor that converts one unit to eV.
ENERGY_UNITS_IN_EV = {
    "eV": 1.0,
    "meV": 1e-3,
    "kcal/mol": KCAL_PER_MOL_IN_EV,
    "kJ/mol": 1.0 / EV_IN_KJ_PER_MOL,
    "Hartree": HARTREE_IN_EV,
}
# Length units accepted by the loaders, as the factor that converts one unit to Angstrom.
LENGTH_UNITS_IN_ANGSTROM = {"Angstrom": 1.0, "nm": NM_IN_ANGSTROM, "Bohr": BOHR_IN_ANGSTROM}


def kT_eV(temperature_K: float) -> float:
    """Thermal energy in eV."""
    return BOLTZMANN_EV_PER_K * temperature_K


def energy_factor(unit: str) -> float:
    """Factor converting `unit` to eV, with a clear error for an unknown unit."""
    try:
        return ENERGY_UNITS_IN_EV[unit]
    except KeyError:
        raise InputError(f"unknown energy unit {unit!r}; known: {', '.join(ENERGY_UNITS_IN_EV)}") from None


def length_factor(unit: str) -> float:
    """Factor converting `unit` to Angstrom, with a clear error for an unknown unit."""
    try:
        return LENGTH_UNITS_IN_ANGSTROM[unit]
    except KeyError:
        raise InputError(f"unknown length unit {unit!r}; known: {', '.join(LENGTH_UNITS_IN_ANGSTROM)}") from None

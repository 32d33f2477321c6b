"""Named unit conversions. Inside metamlip: eV, Angstrom, eV/Angstrom.

Factors come from ASE's CODATA-2014 constants so that values agree with ASE
calculators to the last digit. Every conversion at an interface uses a name
from here, never a bare number.
"""

from ase import units as _ase

HARTREE_TO_EV: float = _ase.Hartree
KCAL_PER_MOL_TO_EV: float = _ase.kcal / _ase.mol
KJ_PER_MOL_TO_EV: float = _ase.kJ / _ase.mol
BOHR_TO_ANGSTROM: float = _ase.Bohr
EV_TO_KCAL_PER_MOL: float = 1.0 / KCAL_PER_MOL_TO_EV

_ENERGY_TO_EV: dict[str, float] = {
    "ev": 1.0,
    "hartree": HARTREE_TO_EV,
    "ha": HARTREE_TO_EV,
    "kcal/mol": KCAL_PER_MOL_TO_EV,
    "kcal_mol": KCAL_PER_MOL_TO_EV,
    "kcal mol-1": KCAL_PER_MOL_TO_EV,
    "kcal mol**-1": KCAL_PER_MOL_TO_EV,
    "kj/mol": KJ_PER_MOL_TO_EV,
    "kj_mol": KJ_PER_MOL_TO_EV,
    "kj mol-1": KJ_PER_MOL_TO_EV,
    "mev": 1.0e-3,
}

_LENGTH_TO_ANGSTROM: dict[str, float] = {
    "angstrom": 1.0,
    "ang": 1.0,
    "a": 1.0,
    "bohr": BOHR_TO_ANGSTROM,
    "nm": 10.0,
    "nanometer": 10.0,
}


def _key(unit: str) -> str:
    return " ".join(str(unit).strip().lower().replace("\u00c5", "angstrom").split())


def energy_unit_to_ev(unit: str) -> float:
    """Factor that converts energies in `unit` (e.g. 'Hartree', 'kcal/mol') to eV."""
    key = _key(unit)
    if key not in _ENERGY_TO_EV:
        raise ValueError(f"unknown energy unit {unit!r}; known: {sorted(set(_ENERGY_TO_EV))}")
    return _ENERGY_TO_EV[key]


def length_unit_to_angstrom(unit: str) -> float:
    """Factor that converts lengths in `unit` (e.g. 'bohr', 'Angstrom') to Angstrom."""
    key = _key(unit)
    if key not in _LENGTH_TO_ANGSTROM:
        raise ValueError(f"unknown length unit {unit!r}; known: {sorted(set(_LENGTH_TO_ANGSTROM))}")
    return _LENGTH_TO_ANGSTROM[key]


def force_unit_to_ev_per_angstrom(energy_unit: str, length_unit: str) -> float:
    """Factor that converts forces in `energy_unit`/`length_unit` to eV/Angstrom."""
    return energy_unit_to_ev(energy_unit) / length_unit_to_angstrom(length_unit)

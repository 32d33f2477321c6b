"""One labelled structure: run the backend of a level, convert to eV and eV/Angstrom.

This is the only place where backend units (Hartree, Hartree/bohr) become
metamlip's units, with the named factors of `metamlip.units`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from metamlip.labelling.methods import LevelSpec
from metamlip.units import BOHR_TO_ANGSTROM, HARTREE_TO_EV

BACKEND_MODULES: dict[str, str] = {
    "pyscf": "metamlip.labelling.pyscf_backend",
    "tblite": "metamlip.labelling.tblite_backend",
}


class CalculationFailed(RuntimeError):
    """A single calculation did not give a usable result (e.g. SCF not converged)."""


@dataclass(frozen=True)
class Label:
    """Labels of one structure.

    Attributes:
        energy_ev: total energy in eV.
        forces_ev_per_angstrom: (n_atoms, 3) forces in eV/Angstrom, or None for energy-only methods.
    """

    energy_ev: float
    forces_ev_per_angstrom: np.ndarray | None


def electron_count(numbers: np.ndarray, charge: int) -> int:
    """Electrons of a structure with atomic numbers `numbers` and total charge `charge` (e)."""
    return int(np.sum(numbers)) - int(charge)


def calculate(
    spec: LevelSpec, numbers: np.ndarray, positions_angstrom: np.ndarray, charge: int = 0, multiplicity: int = 1
) -> Label:
    """Energy and forces of one structure (atomic numbers (n,), positions (n, 3) in Angstrom) at `spec`.

    CalculationFailed if `multiplicity` cannot go with the structure's electron count (parity).
    """
    electrons = electron_count(numbers, charge)
    if (electrons - (multiplicity - 1)) % 2:
        raise CalculationFailed(
            f"spin multiplicity {multiplicity} is impossible with {electrons} electrons (charge {charge}): "
            f"an {'even' if electrons % 2 == 0 else 'odd'} count needs an {'odd' if electrons % 2 == 0 else 'even'} multiplicity"
        )
    backend = importlib.import_module(BACKEND_MODULES[spec.backend])
    energy_hartree, gradient_hartree_per_bohr = backend.energy_and_gradient(
        spec, np.asarray(numbers), np.asarray(positions_angstrom, dtype=np.float64), charge, multiplicity
    )
    if not np.isfinite(energy_hartree):
        raise CalculationFailed(f"non-finite energy {energy_hartree}")
    forces = None
    if gradient_hartree_per_bohr is not None:
        forces = -gradient_hartree_per_bohr * (HARTREE_TO_EV / BOHR_TO_ANGSTROM)
        if not np.isfinite(forces).all():
            raise CalculationFailed("non-finite forces")
    return Label(energy_ev=energy_hartree * HARTREE_TO_EV, forces_ev_per_angstrom=forces)

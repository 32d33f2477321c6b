"""Single-point energies and gradients with tblite (GFN1-xTB, GFN2-xTB).

tblite works in atomic units: positions in bohr in, energy in Hartree and
gradient in Hartree/bohr out.
"""

from __future__ import annotations

import numpy as np

from metamlip.labelling.methods import LevelSpec
from metamlip.units import BOHR_TO_ANGSTROM


def energy_and_gradient(
    spec: LevelSpec, numbers: np.ndarray, positions_angstrom: np.ndarray, charge: int, multiplicity: int
) -> tuple[float, np.ndarray]:
    """Total energy (Hartree) and its gradient (n_atoms, 3) in Hartree/bohr."""
    from tblite.interface import Calculator

    positions_bohr = np.asarray(positions_angstrom, dtype=np.float64) / BOHR_TO_ANGSTROM
    calculator = Calculator(
        spec.method,
        np.asarray(numbers, dtype=np.int32),
        positions_bohr,
        charge=float(charge),
        uhf=int(multiplicity) - 1,
    )
    calculator.set("verbosity", 0)
    result = calculator.singlepoint()
    return float(result.get("energy")), np.asarray(result.get("gradient"), dtype=np.float64)

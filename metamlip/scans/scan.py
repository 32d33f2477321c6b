"""The `Scan` result container and the scans that evaluate an ASE calculator along a coordinate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from metamlip.errors import InputError
from metamlip.scans.geometry import SCAN_KINDS, ScanKind, scan_geometries

FULL_TURN_DEGREE: float = 360.0
COORDINATE_UNITS: dict[str, str] = {"torsion": "degree", "bond": "angstrom"}
COORDINATE_LABELS: dict[str, str] = {"torsion": "dihedral angle (degree)", "bond": "bond length (Angstrom)"}
_SAME_ANGLE_TOLERANCE_DEGREE: float = 1e-6


@dataclass(frozen=True)
class Scan:
    """Energies along one coordinate, sorted by coordinate.

    name: label used in tables and plots.
    kind: "torsion" (coordinate in degrees) or "bond" (coordinate in Angstrom).
    coordinate: (n,) float, strictly increasing after construction (inputs are sorted).
    energies_ev: (n,) float, absolute energies in eV (any constant offset is harmless).
    periodic: True for a torsion over a full 360 degree turn; -180 and 180 are then the same point.
    """

    name: str
    kind: ScanKind
    coordinate: np.ndarray = field(repr=False)
    energies_ev: np.ndarray = field(repr=False)
    periodic: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SCAN_KINDS:
            raise InputError(f"scan {self.name!r}: kind must be one of {SCAN_KINDS}, got {self.kind!r}")
        coordinate = np.asarray(self.coordinate, dtype=float).reshape(-1)
        energies_ev = np.asarray(self.energies_ev, dtype=float).reshape(-1)
        if coordinate.shape != energies_ev.shape or coordinate.size < 2:
            raise InputError(
                f"scan {self.name!r}: needs at least 2 points and as many energies as coordinates, "
                f"got {coordinate.size} coordinates and {energies_ev.size} energies"
            )
        if not (np.all(np.isfinite(coordinate)) and np.all(np.isfinite(energies_ev))):
            raise InputError(f"scan {self.name!r}: coordinates and energies must be finite (no NaN)")
        order = np.argsort(coordinate, kind="stable")
        coordinate, energies_ev = coordinate[order], energies_ev[order]
        if np.any(np.diff(coordinate) <= 0.0):
            raise InputError(f"scan {self.name!r}: repeated coordinate {coordinate[np.argmin(np.diff(coordinate))]:g}")
        if self.periodic and self.kind != "torsion":
            raise InputError(f"scan {self.name!r}: only torsion scans can be periodic")
        object.__setattr__(self, "coordinate", coordinate)
        object.__setattr__(self, "energies_ev", energies_ev)
        object.__setattr__(self, "periodic", bool(self.periodic))

    @property
    def relative_energies_ev(self) -> np.ndarray:
        """(n,) energies in eV minus the lowest energy of the scan."""
        return self.energies_ev - self.energies_ev.min()

    @property
    def coordinate_unit(self) -> str:
        """'degree' for torsions, 'angstrom' for bond stretches."""
        return COORDINATE_UNITS[self.kind]

    @property
    def coordinate_label(self) -> str:
        """Axis label naming the coordinate and its unit."""
        return COORDINATE_LABELS[self.kind]

    def one_period(self) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates and energies without points that repeat the first one a full turn later.

        For a periodic scan over [-180, 180] this drops 180; for other scans it returns all points.
        """
        if not self.periodic:
            return self.coordinate, self.energies_ev
        keep = self.coordinate < self.coordinate[0] + FULL_TURN_DEGREE - _SAME_ANGLE_TOLERANCE_DEGREE
        return self.coordinate[keep], self.energies_ev[keep]


def is_full_turn(angles_degree: np.ndarray) -> bool:
    """True when the angles cover the circle: no gap around it is wider than the widest scan step.

    [-180, -170, ..., 180] and [0, 10, ..., 350] are full turns; [-60, ..., 60] is not.
    """
    angles = np.sort(np.asarray(angles_degree, dtype=float).reshape(-1))
    if angles.size < 3:
        return False
    if angles[-1] - angles[0] > FULL_TURN_DEGREE + _SAME_ANGLE_TOLERANCE_DEGREE:
        return True
    widest_step = float(np.max(np.diff(angles)))
    on_circle = np.unique(np.mod(angles, FULL_TURN_DEGREE))
    gaps = np.diff(np.append(on_circle, on_circle[0] + FULL_TURN_DEGREE))
    return float(np.max(gaps)) <= widest_step * (1.0 + 1e-6) + _SAME_ANGLE_TOLERANCE_DEGREE


def scan_energies_ev(geometries: Sequence[Atoms], calculator: Calculator) -> np.ndarray:
    """(n,) potential energies in eV of each geometry with `calculator` (any ASE calculator)."""
    energies = []
    for geometry in geometries:
        geometry.calc = calculator
        energies.append(float(geometry.get_potential_energy()))
        geometry.calc = None
    return np.array(energies, dtype=float)


def run_coordinate_scan(
    atoms: Atoms,
    calculator: Calculator,
    kind: ScanKind,
    indices: Sequence[int],
    coordinates: np.ndarray,
    name: str | None = None,
    periodic: bool | None = None,
) -> Scan:
    """Scan of `kind` ("torsion" in degrees, "bond" in Angstrom) evaluated with `calculator`.

    periodic: None means a torsion is periodic when its angles cover a full turn (`is_full_turn`).
    """
    values = np.asarray(coordinates, dtype=float).reshape(-1)
    energies_ev = scan_energies_ev(scan_geometries(atoms, kind, indices, values), calculator)
    if periodic is None:
        periodic = kind == "torsion" and is_full_turn(values)
    label = name or f"{kind} {'-'.join(str(int(index)) for index in indices)}"
    return Scan(name=label, kind=kind, coordinate=values, energies_ev=energies_ev, periodic=periodic)


def torsion_scan(
    atoms: Atoms,
    calculator: Calculator,
    indices: tuple[int, int, int, int],
    angles_degree: np.ndarray,
    name: str | None = None,
    periodic: bool | None = None,
) -> Scan:
    """Rigid torsion scan of dihedral I-J-K-L (0-based indices) at `angles_degree` (n,)."""
    return run_coordinate_scan(atoms, calculator, "torsion", indices, angles_degree, name, periodic)


def bond_scan(
    atoms: Atoms,
    calculator: Calculator,
    indices: tuple[int, int],
    distances_angstrom: np.ndarray,
    name: str | None = None,
) -> Scan:
    """Bond-stretch scan of distance I-J (0-based indices) at `distances_angstrom` (n,)."""
    return run_coordinate_scan(atoms, calculator, "bond", indices, distances_angstrom, name, periodic=False)

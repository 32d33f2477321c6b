"""1-D potential-energy-surface scans (torsion, bond stretch) with any ASE calculator, and their
roughness against a reference level: spurious extrema, second-derivative RMS, aligned energy error.

Units: torsion angles in degrees, bond lengths in Angstrom, energies in eV. Atom indices are 0-based.
"""

from metamlip.scans.geometry import current_coordinate, moving_fragment, scan_geometries
from metamlip.scans.io import read_scan, write_scan_csv
from metamlip.scans.plot import plot_scans
from metamlip.scans.roughness import (
    DEFAULT_EXTREMUM_TOLERANCE_EV,
    DEFAULT_OVERSAMPLE,
    Roughness,
    count_extrema,
    dense_grid,
    interpolate_scan,
    roughness,
)
from metamlip.scans.scan import Scan, bond_scan, is_full_turn, run_coordinate_scan, torsion_scan

__all__ = [
    "DEFAULT_EXTREMUM_TOLERANCE_EV",
    "DEFAULT_OVERSAMPLE",
    "Roughness",
    "Scan",
    "bond_scan",
    "count_extrema",
    "current_coordinate",
    "dense_grid",
    "interpolate_scan",
    "is_full_turn",
    "moving_fragment",
    "plot_scans",
    "read_scan",
    "roughness",
    "run_coordinate_scan",
    "scan_geometries",
    "torsion_scan",
    "write_scan_csv",
]

"""Roughness of a model scan against a reference scan, on a dense grid.

Both curves are compared on a uniform grid with `oversample` times as many points as the
reference (one period, endpoint excluded, for periodic torsions; both ends included otherwise).
The reference is interpolated there with a cubic spline (periodic boundary for periodic scans).
The model is used as is when its coordinates already are that grid (evaluate it at
`dense_grid(reference)` when a calculator is at hand); otherwise it is interpolated the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.interpolate import CubicSpline

from metamlip.errors import InputError
from metamlip.scans.scan import FULL_TURN_DEGREE, Scan

DEFAULT_OVERSAMPLE: int = 4
# An extremum counts only when the curve moves away from it by more than this, on both sides
# (its prominence). 1e-4 eV (0.1 meV, 0.002 kcal/mol) is ~1000x above SCF convergence and
# float64 model noise, yet ~250x below kT at 300 K: ripples that small cannot matter chemically.
DEFAULT_EXTREMUM_TOLERANCE_EV: float = 1e-4


@dataclass(frozen=True)
class Roughness:
    """How much rougher a model scan is than the reference, on the dense grid.

    spurious_extrema: max(0, model_extrema - reference_extrema).
    model_extrema, reference_extrema: local minima + maxima with prominence above extremum_tolerance_ev
        (periodic wrap for periodic scans; the ends of a non-periodic scan are not extrema).
    second_derivative_rms_ev_per_unit2: RMS of (model - reference) central second differences, in
        eV/degree^2 (torsion) or eV/Angstrom^2 (bond).
    energy_rms_ev, energy_max_ev: RMS and max |error| after subtracting each curve's own minimum.
    coordinate_unit: 'degree' or 'angstrom'. grid_points: size of the dense grid.
    model_interpolated: False when the model was evaluated on the dense grid itself.
    """

    spurious_extrema: int
    model_extrema: int
    reference_extrema: int
    second_derivative_rms_ev_per_unit2: float
    energy_rms_ev: float
    energy_max_ev: float
    coordinate_unit: str
    grid_points: int
    model_interpolated: bool
    extremum_tolerance_ev: float

    def to_dict(self) -> dict[str, int | float | str | bool]:
        """Plain JSON-ready dictionary of all fields."""
        return asdict(self)


def scan_spline(scan: Scan) -> CubicSpline:
    """Cubic spline through a scan's energies (eV); periodic boundary for periodic scans."""
    coordinate, energies_ev = scan.one_period()
    if scan.periodic:
        if coordinate.size < 3:
            raise InputError(f"scan {scan.name!r}: a periodic scan needs at least 3 distinct angles")
        coordinate = np.append(coordinate, coordinate[0] + FULL_TURN_DEGREE)
        energies_ev = np.append(energies_ev, energies_ev[0])
        return CubicSpline(coordinate, energies_ev, bc_type="periodic")
    return CubicSpline(coordinate, energies_ev)


def interpolate_scan(scan: Scan, coordinates: np.ndarray) -> np.ndarray:
    """Spline energies (eV) of `scan` at `coordinates`; NaN outside a non-periodic scan's range."""
    points = np.asarray(coordinates, dtype=float)
    values = scan_spline(scan)(points)
    if not scan.periodic:
        span = scan.coordinate[-1] - scan.coordinate[0]
        slack = 1e-9 * span
        outside = (points < scan.coordinate[0] - slack) | (points > scan.coordinate[-1] + slack)
        values = np.where(outside, np.nan, values)
    return values


def dense_grid(reference: Scan, oversample: int = DEFAULT_OVERSAMPLE) -> np.ndarray:
    """Uniform grid (m,) with m = oversample * (distinct reference points), in the reference's unit.

    Periodic: one full turn from the first reference angle, endpoint excluded. Otherwise: from the
    first to the last reference coordinate, both included.
    """
    if int(oversample) < 1:
        raise InputError(f"oversample must be a positive integer, got {oversample}")
    coordinate, _ = reference.one_period()
    size = int(oversample) * coordinate.size
    if reference.periodic:
        return np.linspace(coordinate[0], coordinate[0] + FULL_TURN_DEGREE, size, endpoint=False)
    return np.linspace(coordinate[0], coordinate[-1], size)


def _is_on_grid(scan: Scan, grid: np.ndarray) -> bool:
    if scan.coordinate.size != grid.size:
        return False
    scale = max(float(np.ptp(grid)), 1.0)
    return bool(np.allclose(scan.coordinate, grid, rtol=0.0, atol=1e-9 * scale))


def model_on_grid(model: Scan, reference: Scan, grid: np.ndarray) -> tuple[np.ndarray, bool]:
    """Model energies (eV) on `grid` and whether they had to be interpolated."""
    if model.kind != reference.kind:
        raise InputError(f"cannot compare a {model.kind} scan ({model.name!r}) with a {reference.kind} reference")
    if _is_on_grid(model, grid):
        return model.energies_ev, False
    if reference.periodic and not model.periodic:
        raise InputError(f"model scan {model.name!r} does not cover the full turn of the periodic reference")
    if not model.periodic:
        slack = 1e-9 * max(float(np.ptp(grid)), 1.0)
        if model.coordinate[0] > grid[0] + slack or model.coordinate[-1] < grid[-1] - slack:
            raise InputError(
                f"model scan {model.name!r} spans [{model.coordinate[0]:g}, {model.coordinate[-1]:g}] "
                f"{model.coordinate_unit}, which does not cover the reference range [{grid[0]:g}, {grid[-1]:g}]"
            )
    return scan_spline(model)(grid), True


def _count_turns(values: np.ndarray, tolerance_ev: float) -> int:
    """Interior turning points of a sequence whose prominence exceeds the tolerance."""
    direction, anchor, extreme, turns = 0, float(values[0]), float(values[0]), 0
    for value in values[1:].tolist():
        if direction == 0:
            if abs(value - anchor) > tolerance_ev:
                direction, extreme = (1 if value > anchor else -1), value
        elif direction * (value - extreme) > 0.0:
            extreme = value
        elif direction * (extreme - value) > tolerance_ev:
            direction, extreme, turns = -direction, value, turns + 1
    return turns


def count_extrema(energies_ev: np.ndarray, periodic: bool, tolerance_ev: float = DEFAULT_EXTREMUM_TOLERANCE_EV) -> int:
    """Local minima + maxima of a sampled curve whose prominence exceeds `tolerance_ev` (eV).

    A turning point counts once the curve has moved back from it by more than the tolerance, so
    flat stretches and noise below the tolerance add nothing. Periodic curves are rotated to start
    and end at their global minimum, which is then counted as one more extremum; the ends of a
    non-periodic curve are never extrema.
    """
    values = np.asarray(energies_ev, dtype=float).reshape(-1)
    if not periodic:
        return _count_turns(values, tolerance_ev)
    start = int(np.argmin(values))
    closed = np.concatenate([np.roll(values, -start), values[start : start + 1]])
    turns = _count_turns(closed, tolerance_ev)
    return turns + 1 if turns > 0 else 0


def second_differences(energies_ev: np.ndarray, step: float, periodic: bool) -> np.ndarray:
    """Central second differences (E[i+1] - 2 E[i] + E[i-1]) / step^2 in eV per unit^2.

    Periodic: all m points with wrap-around. Otherwise: the m - 2 interior points.
    """
    if periodic:
        return (np.roll(energies_ev, -1) - 2.0 * energies_ev + np.roll(energies_ev, 1)) / step**2
    return (energies_ev[2:] - 2.0 * energies_ev[1:-1] + energies_ev[:-2]) / step**2


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def roughness(
    model: Scan,
    reference: Scan,
    oversample: int = DEFAULT_OVERSAMPLE,
    extremum_tolerance_ev: float = DEFAULT_EXTREMUM_TOLERANCE_EV,
) -> Roughness:
    """Spurious extrema, second-derivative RMS and aligned energy errors of `model` vs `reference`."""
    grid = dense_grid(reference, oversample)
    if grid.size < 3:
        raise InputError(f"reference scan {reference.name!r} is too short for a roughness grid")
    periodic = reference.periodic
    reference_ev = scan_spline(reference)(grid)
    model_ev, interpolated = model_on_grid(model, reference, grid)
    step = float(grid[1] - grid[0])
    curvature_error = second_differences(model_ev, step, periodic) - second_differences(reference_ev, step, periodic)
    energy_error_ev = (model_ev - model_ev.min()) - (reference_ev - reference_ev.min())
    model_extrema = count_extrema(model_ev, periodic, extremum_tolerance_ev)
    reference_extrema = count_extrema(reference_ev, periodic, extremum_tolerance_ev)
    return Roughness(
        spurious_extrema=max(0, model_extrema - reference_extrema),
        model_extrema=model_extrema,
        reference_extrema=reference_extrema,
        second_derivative_rms_ev_per_unit2=_rms(curvature_error),
        energy_rms_ev=_rms(energy_error_ev),
        energy_max_ev=float(np.max(np.abs(energy_error_ev))),
        coordinate_unit=reference.coordinate_unit,
        grid_points=int(grid.size),
        model_interpolated=interpolated,
        extremum_tolerance_ev=float(extremum_tolerance_ev),
    )

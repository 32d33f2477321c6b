"""`metamlip scan`: a torsion or bond-stretch scan of a checkpoint, with roughness against a reference.

The checkpoint is turned into an ASE calculator and handed to `run_scan`, which works with any
ASE calculator: it writes scan.csv and scan.png, and roughness.json when a reference is given.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from metamlip.errors import InputError
from metamlip.readers.options import require_file
from metamlip.scans import (
    DEFAULT_OVERSAMPLE,
    Roughness,
    Scan,
    current_coordinate,
    dense_grid,
    plot_scans,
    read_scan,
    roughness,
    run_coordinate_scan,
    scan_geometries,
    write_scan_csv,
)

DEFAULT_TORSION_RANGE_DEGREE: tuple[float, float] = (-180.0, 180.0)
DEFAULT_TORSION_POINTS: int = 37
DEFAULT_BOND_OFFSETS_ANGSTROM: tuple[float, float] = (-0.3, 0.8)  # around the current bond length
DEFAULT_BOND_POINTS: int = 25


@dataclass(frozen=True)
class ScanRun:
    """What `run_scan` computed and wrote.

    scan: model energies at the requested coordinates. dense_scan: model on the roughness grid
    (None without a reference). roughness: metrics against the reference (None without one).
    """

    scan: Scan
    dense_scan: Scan | None
    roughness: Roughness | None
    csv_path: Path
    png_path: Path
    roughness_path: Path | None


def default_coordinates(
    atoms: Atoms, kind: str, indices: Sequence[int], value_range: Sequence[float] | None, points: int | None
) -> np.ndarray:
    """Scan coordinates (n,): degrees for torsions (default -180..180, 37 points), Angstrom for
    bonds (default current length -0.3..+0.8, 25 points). `value_range` is absolute (A, B)."""
    if kind == "torsion":
        start, stop = value_range or DEFAULT_TORSION_RANGE_DEGREE
        count = DEFAULT_TORSION_POINTS if points is None else points
    else:
        length_angstrom = current_coordinate(atoms, kind, indices)
        low, high = DEFAULT_BOND_OFFSETS_ANGSTROM
        start, stop = value_range or (length_angstrom + low, length_angstrom + high)
        count = DEFAULT_BOND_POINTS if points is None else points
    if count < 2:
        raise InputError(f"--points must be at least 2, got {count}")
    if not start < stop:
        raise InputError(f"--range must be increasing, got {start:g} {stop:g}")
    return np.linspace(float(start), float(stop), int(count))


def run_scan(
    calculator: Calculator,
    atoms: Atoms,
    kind: str,
    indices: Sequence[int],
    coordinates: np.ndarray,
    reference: Scan | None,
    out_dir: str | Path,
    name: str = "model",
    oversample: int = DEFAULT_OVERSAMPLE,
) -> ScanRun:
    """Scan `atoms` with any ASE `calculator`; write scan.csv, scan.png and (with a reference)
    roughness.json into `out_dir`. With a reference, the model is also evaluated on
    `dense_grid(reference, oversample)` so the roughness uses model energies, not a spline of them.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scan = run_coordinate_scan(atoms, calculator, kind, indices, coordinates, name=name)
    csv_path = write_scan_csv(out / "scan.csv", scan, reference)
    png_path = plot_scans(out / "scan.png", {name: scan}, reference, title=f"{kind} {list(indices)}")
    if reference is None:
        return ScanRun(scan, None, None, csv_path, png_path, None)
    grid = dense_grid(reference, oversample)
    dense_scan = run_coordinate_scan(atoms, calculator, kind, indices, grid, name=name, periodic=reference.periodic)
    metrics = roughness(dense_scan, reference, oversample)
    record = {"model": name, "reference": reference.name, "kind": kind, "indices": [int(i) for i in indices],
              "oversample": int(oversample), **metrics.to_dict()}
    roughness_path = out / "roughness.json"
    roughness_path.write_text(json.dumps(record, indent=2) + "\n")
    return ScanRun(scan, dense_scan, metrics, csv_path, png_path, roughness_path)


def format_summary(result: ScanRun) -> str:
    """Lines for the terminal: what was written and, with a reference, the roughness metrics."""
    scan = result.scan
    lines = [f"{scan.kind} scan, {scan.coordinate.size} points: wrote {result.csv_path} and {result.png_path}"]
    metrics = result.roughness
    if metrics is not None:
        lines += [
            f"roughness against the reference ({metrics.grid_points}-point grid), written to {result.roughness_path}:",
            f"  spurious extrema                    {metrics.spurious_extrema:d}"
            f"  (model {metrics.model_extrema}, reference {metrics.reference_extrema})",
            f"  energy error RMS / max (eV)         {metrics.energy_rms_ev:.5f} / {metrics.energy_max_ev:.5f}",
            f"  2nd-derivative RMS (eV/{metrics.coordinate_unit}^2)  {metrics.second_derivative_rms_ev_per_unit2:.4e}",
        ]
    return "\n".join(lines)


def read_structure(path: Path) -> Atoms:
    """First frame of an ASE-readable structure file; InputError naming the file when unreadable."""
    import ase.io

    require_file(path, "structure file")
    try:
        return ase.io.read(str(path), index=0)
    except Exception as error:  # noqa: BLE001 - ASE raises many types for bad files
        raise InputError(f"{path}: cannot read structure ({error})") from None


def run(args: argparse.Namespace) -> int:
    """Load the structure, reference and checkpoint, then hand over to `run_scan`."""
    atoms = read_structure(args.structure)
    kind, indices = ("torsion", tuple(args.torsion)) if args.torsion else ("bond", tuple(args.bond))
    coordinates = default_coordinates(atoms, kind, indices, args.range, args.points)
    scan_geometries(atoms, kind, indices, coordinates[:1])  # fail on bad indices before loading the model
    reference = read_scan(args.reference, kind=kind) if args.reference else None
    from metamlip.calculator import MetamlipCalculator

    calculator = MetamlipCalculator.from_checkpoint(args.checkpoint, level=args.level)
    name = Path(args.checkpoint).stem + (f" ({args.level})" if args.level else "")
    print(format_summary(run_scan(calculator, atoms, kind, indices, coordinates, reference, args.out, name=name)))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `metamlip scan`."""
    parser = subparsers.add_parser(
        "scan",
        help="torsion or bond-stretch energy scan of a checkpoint, with roughness against a reference",
        description="Torsion or bond-stretch energy scan of a checkpoint; roughness against a reference scan.",
    )
    parser.add_argument("checkpoint", type=Path, help="model checkpoint file")
    parser.add_argument("--structure", type=Path, required=True, help="ASE-readable structure (first frame is used)")
    coordinate = parser.add_mutually_exclusive_group(required=True)
    coordinate.add_argument("--torsion", type=int, nargs=4, metavar=("I", "J", "K", "L"),
                            help="dihedral I-J-K-L (0-based); the side of L rotates rigidly about J-K")
    coordinate.add_argument("--bond", type=int, nargs=2, metavar=("I", "J"),
                            help="bond I-J (0-based); the side of J moves along I->J")
    parser.add_argument("--range", type=float, nargs=2, metavar=("A", "B"),
                        help="scan from A to B: degrees for torsions (default -180 180), Angstrom for bonds "
                             "(default current length -0.3 to +0.8)")
    parser.add_argument("--points", type=int, help="number of scan points (default 37 torsion, 25 bond)")
    parser.add_argument("--level",
                        help="level of theory to evaluate, for checkpoints with several (default: the checkpoint's)")
    parser.add_argument("--reference", type=Path,
                        help="reference scan: CSV (coordinate, energy_ev) or extended XYZ with info['scan_coordinate']")
    parser.add_argument("--out", type=Path, required=True, help="output folder for scan.csv, scan.png, roughness.json")
    parser.set_defaults(run=run)

"""Scan files: write a model scan (and its reference) as CSV; read a reference scan.

CSV layout written by `write_scan_csv` and read by `read_scan`::

    # metamlip scan; kind=torsion; periodic=true; coordinate_unit=degree; energy_unit=eV; name=...
    coordinate,energy_ev,reference_energy_ev
    -180,0.0123,0.0119
    ...

Energies in the file are relative to each column's minimum. `read_scan` also accepts a reference
CSV with a column ``energy`` in the header's ``energy_unit`` (Hartree, kcal/mol, ...) and a
``coordinate_unit`` of radian (torsion) or bohr/nm (bond); it converts to degrees, Angstrom and eV.
Any ASE-readable file of frames (extended XYZ) is read with the frames' ``info['scan_coordinate']``
and energy (calculator energy or ``info['energy']``, eV), in any order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metamlip.errors import InputError
from metamlip.readers.options import require_file
from metamlip.scans.geometry import INFO_COORDINATE, INFO_KIND, SCAN_KINDS
from metamlip.scans.roughness import interpolate_scan
from metamlip.scans.scan import Scan, is_full_turn
from metamlip.units import energy_unit_to_ev, length_unit_to_angstrom

CSV_MARKER = "metamlip scan"
_ANGLE_UNIT_TO_DEGREE: dict[str, float] = {"degree": 1.0, "deg": 1.0, "radian": 180.0 / np.pi, "rad": 180.0 / np.pi}


def _format(value: float) -> str:
    return "nan" if np.isnan(value) else f"{value:.10g}"


def write_scan_csv(path: str | Path, model: Scan, reference: Scan | None = None) -> Path:
    """Write `model` (and `reference` interpolated at the model's coordinates) to a CSV file.

    Columns: coordinate (degree or Angstrom, named in the header comment), energy_ev (relative to
    the model's minimum) and, with a reference, reference_energy_ev (spline of the reference at the
    same coordinate, relative to the column's minimum; NaN outside a non-periodic reference's range).
    """
    path = Path(path)
    columns = [model.coordinate, model.relative_energies_ev]
    names = ["coordinate", "energy_ev"]
    if reference is not None:
        if reference.kind != model.kind:
            raise InputError(f"reference {reference.name!r} is a {reference.kind} scan, model is a {model.kind} scan")
        reference_ev = interpolate_scan(reference, model.coordinate)
        columns.append(reference_ev - np.nanmin(reference_ev))
        names.append("reference_energy_ev")
    header = (
        f"# {CSV_MARKER}; kind={model.kind}; periodic={str(model.periodic).lower()}; "
        f"coordinate_unit={model.coordinate_unit}; energy_unit=eV; name={model.name.replace(';', ',')}"
    )
    lines = [header, ",".join(names)]
    lines += [",".join(_format(float(value)) for value in row) for row in zip(*columns)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _parse_header_comment(text: str) -> dict[str, str]:
    fields = {}
    for part in text.lstrip("#").split(";"):
        key, separator, value = part.partition("=")
        if separator:
            fields[key.strip().lower()] = value.strip()
    return fields


def _resolve_kind(path: Path, found: str | None, requested: str | None) -> str:
    if found is not None and requested is not None and found != requested:
        raise InputError(f"{path}: the file holds a {found} scan but a {requested} scan was asked for")
    kind = found or requested
    if kind not in SCAN_KINDS:
        raise InputError(f"{path}: scan kind unknown ({kind!r}); give one of {SCAN_KINDS} in the file or the call")
    return kind


def _coordinate_factor(path: Path, kind: str, unit: str | None) -> float:
    if unit is None:
        return 1.0
    try:
        if kind == "torsion":
            return _ANGLE_UNIT_TO_DEGREE[unit.strip().lower()]
        return length_unit_to_angstrom(unit)
    except (KeyError, ValueError):
        raise InputError(f"{path}: coordinate_unit {unit!r} is not a unit for a {kind} scan") from None


def _read_csv(path: Path, kind: str | None, name: str | None) -> Scan:
    meta: dict[str, str] = {}
    columns: list[str] | None = None
    rows: list[tuple[float, float]] = []
    energy_column = "energy_ev"
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("#"):
            meta.update(_parse_header_comment(text))
            continue
        cells = [cell.strip() for cell in text.split(",")]
        if columns is None:
            columns = [cell.lower() for cell in cells]
            energy_column = "energy_ev" if "energy_ev" in columns else "energy"
            if "coordinate" not in columns or energy_column not in columns:
                raise InputError(f"{path}, line {line_number}: header needs columns 'coordinate' and 'energy_ev'")
            continue
        if len(cells) != len(columns):
            raise InputError(f"{path}, line {line_number}: {len(cells)} values for {len(columns)} columns")
        try:
            point = (float(cells[columns.index("coordinate")]), float(cells[columns.index(energy_column)]))
        except ValueError:
            raise InputError(f"{path}, line {line_number}: not a number in {text!r}") from None
        if not np.all(np.isfinite(point)):
            raise InputError(f"{path}, line {line_number}: coordinate and energy must be finite, got {text!r}")
        rows.append(point)
    if len(rows) < 2:
        raise InputError(f"{path}: needs a header line and at least 2 data lines, found {len(rows)}")
    resolved = _resolve_kind(path, meta.get("kind"), kind)
    coordinate_unit = meta.get("coordinate_unit")
    energy_unit = meta.get("energy_unit", "eV") if energy_column == "energy" else "eV"
    try:
        energy_factor = energy_unit_to_ev(energy_unit)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None
    data = np.array(rows) * [_coordinate_factor(path, resolved, coordinate_unit), energy_factor]
    stated = meta.get("periodic")
    periodic = resolved == "torsion" and (is_full_turn(data[:, 0]) if stated is None else stated.lower() == "true")
    label = name or meta.get("name") or path.stem
    return Scan(name=label, kind=resolved, coordinate=data[:, 0], energies_ev=data[:, 1], periodic=periodic)


def _frame_energy_ev(path: Path, index: int, frame) -> float:
    if frame.calc is not None:
        try:
            return float(frame.get_potential_energy())
        except Exception:  # noqa: BLE001 - a calculator without stored energy; fall back to info
            pass
    if "energy" in frame.info:
        return float(frame.info["energy"])
    raise InputError(f"{path}, frame {index}: no energy (neither a stored calculator energy nor info['energy'])")


def _read_frames(path: Path, kind: str | None, name: str | None) -> Scan:
    import ase.io

    try:
        frames = ase.io.read(str(path), index=":")
    except Exception as error:  # noqa: BLE001 - ASE raises many types for bad files
        raise InputError(f"{path}: cannot read scan frames ({error})") from None
    coordinates, energies_ev, kinds = [], [], set()
    for index, frame in enumerate(frames):
        if INFO_COORDINATE not in frame.info:
            raise InputError(f"{path}, frame {index}: no info['{INFO_COORDINATE}']")
        try:
            coordinates.append(float(frame.info[INFO_COORDINATE]))
        except (TypeError, ValueError):
            raise InputError(f"{path}, frame {index}: info['{INFO_COORDINATE}'] is not a number") from None
        energies_ev.append(_frame_energy_ev(path, index, frame))
        if INFO_KIND in frame.info:
            kinds.add(str(frame.info[INFO_KIND]))
    if len(kinds) > 1:
        raise InputError(f"{path}: frames mix scan kinds {sorted(kinds)}")
    resolved = _resolve_kind(path, kinds.pop() if kinds else None, kind)
    periodic = resolved == "torsion" and is_full_turn(np.array(coordinates))
    return Scan(name=name or path.stem, kind=resolved, coordinate=np.array(coordinates),
                energies_ev=np.array(energies_ev), periodic=periodic)


def read_scan(path: str | Path, kind: str | None = None, name: str | None = None) -> Scan:
    """Reference scan from a CSV (.csv) or an ASE-readable file of frames, sorted by coordinate.

    kind: "torsion" | "bond" when the file does not say; must agree with the file when it does.
    Coordinates come back in degrees (torsion) or Angstrom (bond), energies in eV.
    """
    path = require_file(path, "scan file")
    reader = _read_csv if path.suffix.lower() == ".csv" else _read_frames
    try:
        return reader(path, kind, name)
    except InputError as error:
        if str(path) in str(error):
            raise
        raise InputError(f"{path}: {error}") from None

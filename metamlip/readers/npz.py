"""NumPy .npz layouts: MD17/sGDML (`R`, `z`, `E`, `F`) and QM7-X's own key names.

- MD17/sGDML: `R` (n, atoms, 3), `z` (atoms,) or zero-padded (n, atoms) with 0 = no atom,
  `E` (n,) or (n, 1), optional `F` (n, atoms, 3), and optional sGDML metadata `e_unit`,
  `r_unit` and `theory`. Without `e_unit` the option `energy_unit` is required and without
  `theory` the option `level` (MD17 files from most sources store neither). Lengths default
  to Angstrom.
- QM7-X (original key names): `atXYZ`, `atNUM`, `ePBE0+MBD`, `totFOR`, in eV and Angstrom
  as documented for QM7-X; level `pbe0+mbd`.

`energy_key` / `forces_key` pick other keys for the energy and forces.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metamlip.data.level_dataset import LevelDataset
from metamlip.errors import InputError
from metamlip.readers.blocks import build_dataset, make_block
from metamlip.readers.options import ReadOptions, resolve_level, resolve_units


@dataclass(frozen=True)
class _Layout:
    """Key names of one npz layout, and what it implies when the file does not say."""

    positions: str
    numbers: str
    energy: str
    forces: str
    energy_unit: str | None = None
    length_unit: str | None = None
    level: str | None = None


_SGDML = _Layout(positions="R", numbers="z", energy="E", forces="F")
_QM7X = _Layout(
    positions="atXYZ", numbers="atNUM", energy="ePBE0+MBD", forces="totFOR",
    energy_unit="eV", length_unit="angstrom", level="pbe0+mbd",
)
_UNKNOWN_THEORY = {"", "unknown", "none"}
# what numpy's npz reading raises for a truncated or damaged archive or member
_DAMAGED = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def read(path: Path, options: ReadOptions) -> list[LevelDataset]:
    """The one level stored in the npz file at `path` (see the module docstring)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except _DAMAGED as error:
        raise InputError(f"{path}: cannot read as .npz ({type(error).__name__}: {error}); the file may be truncated or damaged") from None
    with archive:
        file = _Keys(path, archive)
        layout = _QM7X if _QM7X.positions in file.keys else _SGDML
        energy_key = options.energy_key or layout.energy
        forces_key = options.forces_key or (layout.forces if layout.forces in file.keys else None)
        theory = file.text("theory")
        units = resolve_units(
            str(path), options, file.text("e_unit") or layout.energy_unit, file.text("r_unit") or layout.length_unit
        )
        level = resolve_level(
            str(path), options, None if (theory or "").lower() in _UNKNOWN_THEORY else theory, layout.level
        )
        block = make_block(
            str(path),
            units,
            numbers=(layout.numbers, file.array(layout.numbers)),
            positions=(layout.positions, file.array(layout.positions)),
            energies=(energy_key, file.array(energy_key)),
            forces=None if forces_key is None else (forces_key, file.array(forces_key)),
        )
    return [build_dataset(level, [block], str(path))]


class _Keys:
    """Access to an open npz archive whose missing or unreadable keys raise InputError."""

    def __init__(self, path: Path, archive: np.lib.npyio.NpzFile) -> None:
        self.path, self.archive, self.keys = path, archive, set(archive.files)

    def array(self, key: str) -> np.ndarray:
        if key not in self.keys:
            raise InputError(f"{self.path}: no key {key!r}; keys: {sorted(self.keys)}")
        try:
            return self.archive[key]
        except _DAMAGED as error:  # a damaged member, or a pickled object array, which is never loaded
            raise InputError(f"{self.path}: cannot read key {key!r} ({type(error).__name__}: {error})") from None

    def text(self, key: str) -> str | None:
        """A stored string (sGDML metadata such as `e_unit`), or None where the key is absent."""
        return str(self.array(key).reshape(-1)[0]) if key in self.keys else None

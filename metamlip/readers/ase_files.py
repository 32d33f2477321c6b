"""Anything ASE reads: extended XYZ, ASE databases (.db, via `ase.db.connect`), trajectories, ...

Labels: with `energy_key` / `forces_key`, from `atoms.info[key]` / `atoms.arrays[key]` (for an
ASE database: the row's key-value pairs and `data`); otherwise the attached calculator's energy
and forces, falling back to entries named `energy` and `forces`. Units are eV and Angstrom (ASE's
convention) unless `info['energy_unit']` / `info['length_unit']` (or the options) say otherwise;
the level is `info['level_of_theory']` or the `level` option. If no frame has forces the level is
energy-only; if only some have, InputError names the first frame without.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ase.db
import ase.io
import numpy as np
from ase import Atoms

from metamlip.data.level_dataset import LevelDataset
from metamlip.errors import InputError, OptionError
from metamlip.readers.blocks import Block, build_dataset, make_block
from metamlip.readers.options import ReadOptions, Units, resolve_level, resolve_units

DB_SUFFIXES = {".db", ".json"}
_FILE_FIELDS = ("level_of_theory", "energy_unit", "length_unit")


@dataclass
class _Frame:
    """One structure and where its labels may be: `info` (scalars) and `extra` (per-atom arrays,
    or a database row's `data`)."""

    atoms: Atoms
    info: Mapping[str, Any]
    extra: Mapping[str, Any]
    extra_name: str = "arrays"


def read(path: Path, options: ReadOptions) -> list[LevelDataset]:
    """The one level of the ASE-readable file at `path`."""
    frames = _db_frames(path) if path.suffix.lower() in DB_SUFFIXES else _file_frames(path)
    if not frames:
        raise InputError(f"{path}: no structures in the file")
    stored = _file_fields(path, frames)
    units = resolve_units(str(path), options, stored["energy_unit"] or "eV", stored["length_unit"])
    level = resolve_level(str(path), options, stored["level_of_theory"])
    periodic = any(frame.atoms.pbc.any() for frame in frames)
    blocks = [_block(path, index, frame, options, units, periodic) for index, frame in enumerate(frames)]
    return [build_dataset(level, blocks, str(path))]


def _db_frames(path: Path) -> list[_Frame]:
    try:
        database = ase.db.connect(path)
        metadata = database.metadata
        return [
            _Frame(row.toatoms(), {**metadata, **row.key_value_pairs}, row.data, "data") for row in database.select()
        ]
    except Exception as error:  # ase.db raises many types for a file it cannot read
        raise InputError(f"{path}: ASE cannot read the database ({type(error).__name__}: {error})") from None


def _file_frames(path: Path) -> list[_Frame]:
    try:
        images = ase.io.read(path, index=":")
    except Exception as error:  # ase.io raises many types (KeyError for an unknown element symbol)
        raise InputError(f"{path}: ASE cannot read the file ({type(error).__name__}: {error})") from None
    images = images if isinstance(images, list) else [images]
    return [_Frame(atoms, atoms.info, atoms.arrays) for atoms in images]


def _file_fields(path: Path, frames: list[_Frame]) -> dict[str, str | None]:
    """Level and units stored in the frames' info; every frame must agree."""
    fields = {}
    for field in _FILE_FIELDS:
        values = [frame.info.get(field) for frame in frames]
        differing = next((i for i, value in enumerate(values) if value != values[0]), None)
        if differing is not None:
            raise InputError(
                f"{path}: frame {differing} has {field}={values[differing]!r} but frame 0 has {values[0]!r}"
            )
        fields[field] = None if values[0] is None else str(values[0])
    return fields


def _block(path: Path, index: int, frame: _Frame, options: ReadOptions, units: Units, periodic: bool) -> Block:
    """One frame as a one-conformer block."""
    name = f"{path}, frame {index}"
    atoms = frame.atoms
    energy_name, energy = _energy(name, frame, options.energy_key)
    forces = _forces(name, frame, options.forces_key)
    return make_block(
        name,
        units,
        numbers=("numbers", atoms.numbers),
        positions=("positions", atoms.positions[None]),
        energies=(energy_name, np.array([energy], dtype=np.float64)),
        forces=None if forces is None else (forces[0], np.asarray(forces[1], dtype=np.float64)[None]),
        cells=atoms.cell.array[None] if periodic else None,
        pbc=atoms.pbc[None] if periodic else None,
    )


def _lookup(frame: _Frame, key: str | None, default: str) -> tuple[str, Any] | None:
    """(description, value) of the first place holding the label, or None.

    With `key`: the frame's info, then its arrays (db: key-value pairs, then data). Without:
    the calculator's results, then entries named `default` in info and arrays.
    """
    name = key or default
    places = [("info", frame.info), (frame.extra_name, frame.extra)]
    if key is None:
        calculator = frame.atoms.calc
        places.insert(0, ("calculator", getattr(calculator, "results", {}) if calculator is not None else {}))
    for place, mapping in places:
        if name in mapping:
            return f"{place}[{name!r}]", mapping[name]
    return None


def _energy(name: str, frame: _Frame, key: str | None) -> tuple[str, float]:
    """(where it came from, value) of the frame's energy, in the file's unit."""
    found = _lookup(frame, key, "energy")
    if found is None:
        what = f"no energy {key!r}" if key else "no energy (calculator, info or data)"
        raise OptionError(f"{name}: {what}; pass {{option}} to name the energy", "energy_key")
    value = np.asarray(found[1], dtype=np.float64).reshape(-1)
    if value.size != 1:
        raise InputError(f"{name}: energy {found[0]} has {value.size} values, expected 1")
    return found[0], float(value[0])


def _forces(name: str, frame: _Frame, key: str | None) -> tuple[str, np.ndarray] | None:
    """(where they came from, (n_atoms, 3) values) of the frame's forces, or None if it has none."""
    found = _lookup(frame, key, "forces")
    if found is None and key:
        raise InputError(f"{name}: no forces {key!r} in arrays, info or data")
    return found

"""ANI HDF5 files: the ANI/COMP6 layout here, the ANI-1x/ANI-1ccx release layout in `ani1x_release`.

ANI/COMP6 layout: any group holding `coordinates` (conformers, atoms, 3) in Angstrom,
`species` (element symbols as bytes, or atomic numbers, per molecule or per conformer),
`energies` (conformers,) in Hartree and optionally `forces` in Hartree/Angstrom, as the ANI
datasets document. The level comes from the `level` option, else from a `lot` dataset
where the file has one (COMP6 files do: ``b'wb97x/6-31g*'``); groups with different `lot`
become different levels. `energy_key` / `forces_key` name other datasets of each group.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from ase.data import chemical_symbols

from metamlip.data.level_dataset import LevelDataset
from metamlip.errors import InputError
from metamlip.readers import ani1x_release
from metamlip.readers.blocks import Block, build_dataset, make_block
from metamlip.readers.hdf5 import groups_with, open_hdf5, read_key, text, where
from metamlip.readers.options import ReadOptions, resolve_level, resolve_units

ENERGY_UNIT = "hartree"
LENGTH_UNIT = "angstrom"
_NUMBER_OF_SYMBOL = {symbol: number for number, symbol in enumerate(chemical_symbols) if number > 0}


def read(path: Path, options: ReadOptions) -> list[LevelDataset]:
    """Every level in the ANI-layout HDF5 file at `path`, whichever of the two layouts it has."""
    with open_hdf5(path) as file:
        if ani1x_release.is_release_layout(file):
            return ani1x_release.read_release(file, path, options)
        return _read_molecule_groups(file, path, options)


def _read_molecule_groups(file: h5py.File, path: Path, options: ReadOptions) -> list[LevelDataset]:
    """ANI/COMP6 layout: one block per group with `coordinates`, grouped by level."""
    by_level: dict[str, list[Block]] = {}
    for group in groups_with(file, "coordinates"):
        level, block = molecule_block(path, group, options)
        by_level.setdefault(level, []).append(block)
    if not by_level:
        raise InputError(f"{path}: no group with 'coordinates' (not an ANI-layout HDF5 file)")
    return [build_dataset(level, blocks, str(path)) for level, blocks in by_level.items()]


def molecule_block(path: Path, group: h5py.Group, options: ReadOptions) -> tuple[str, Block]:
    """(level, conformers) of one ANI/COMP6 group with `coordinates`."""
    name = where(path, group)
    units = resolve_units(str(path), options, ENERGY_UNIT, LENGTH_UNIT)
    energy_key = options.energy_key or "energies"
    stored = text(read_key(path, group, "lot")) if "lot" in group else None
    forces_key = options.forces_key or ("forces" if "forces" in group else None)
    species_key = "species" if "species" in group else "atomic_numbers"
    block = make_block(
        name,
        units,
        numbers=(species_key, _atomic_numbers(name, read_key(path, group, species_key))),
        positions=("coordinates", read_key(path, group, "coordinates")),
        energies=(energy_key, read_key(path, group, energy_key)),
        forces=None if forces_key is None else (forces_key, read_key(path, group, forces_key)),
    )
    return resolve_level(name, options, stored), block


def _atomic_numbers(name: str, species: np.ndarray) -> np.ndarray:
    """Atomic numbers from `species`: element symbols (bytes or str) or numbers already."""
    if species.dtype.kind in "iu":
        return species
    symbols = [text(symbol) for symbol in species.reshape(-1)]
    unknown = [symbol for symbol in symbols if symbol not in _NUMBER_OF_SYMBOL]
    if unknown:
        raise InputError(f"{name}: unknown element symbol {unknown[0]!r} in 'species'")
    return np.array([_NUMBER_OF_SYMBOL[symbol] for symbol in symbols], dtype=np.int64).reshape(species.shape)

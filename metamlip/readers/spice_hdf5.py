"""SPICE HDF5 layout: `<id>/{atomic_numbers, conformations, dft_total_energy, dft_total_gradient}`.

Units come from each dataset's `units` attribute (SPICE stores bohr, hartree and hartree/bohr).
Forces are minus `dft_total_gradient`. The level is SPICE's documented wB97M-D3BJ/def2-TZVPPD
unless the `level` option says otherwise. `energy_key` picks another energy dataset
(e.g. `formation_energy`), `forces_key` another *gradient* dataset (its sign is flipped too).
"""

from __future__ import annotations

from pathlib import Path

import h5py

from metamlip.data.level_dataset import LevelDataset
from metamlip.errors import InputError
from metamlip.readers.blocks import Block, build_dataset, make_block
from metamlip.readers.hdf5 import groups_with, open_hdf5, read_key, unit_attribute, where
from metamlip.readers.options import ReadOptions, Units, resolve_level, resolve_units
from metamlip.units import force_unit_to_ev_per_angstrom

DEFAULT_LEVEL = "wb97m-d3bj/def2-tzvppd"
POSITIONS_KEY = "conformations"
ENERGY_KEY = "dft_total_energy"
GRADIENT_KEY = "dft_total_gradient"


def read(path: Path, options: ReadOptions) -> list[LevelDataset]:
    """The one level of the SPICE file at `path`, all molecules together."""
    level = spice_level(path, options)
    with open_hdf5(path) as file:
        blocks = [molecule_block(path, group, options) for group in groups_with(file, POSITIONS_KEY)]
    if not blocks:
        raise InputError(f"{path}: no group with {POSITIONS_KEY!r} (not a SPICE HDF5 file)")
    return [build_dataset(level, blocks, str(path))]


def spice_level(path: Path, options: ReadOptions) -> str:
    """The level of a SPICE file: SPICE's documented one unless the `level` option says otherwise."""
    return resolve_level(str(path), options, None, DEFAULT_LEVEL)


def molecule_block(path: Path, group: h5py.Group, options: ReadOptions) -> Block:
    """All conformations of one SPICE molecule, forces = -gradient."""
    name = where(path, group)
    energy_key = options.energy_key or ENERGY_KEY
    gradient_key = options.forces_key or (GRADIENT_KEY if GRADIENT_KEY in group else None)
    units = resolve_units(name, options, unit_attribute(group, energy_key), unit_attribute(group, POSITIONS_KEY))
    gradient = None
    if gradient_key is not None:
        gradient = read_key(path, group, gradient_key)
        _check_gradient_unit(name, group, gradient_key, units, options)
    return make_block(
        name,
        units,
        numbers=("atomic_numbers", read_key(path, group, "atomic_numbers")),
        positions=(POSITIONS_KEY, read_key(path, group, POSITIONS_KEY)),
        energies=(energy_key, read_key(path, group, energy_key)),
        forces=None if gradient is None else (f"-{gradient_key}", -gradient),
    )


def _check_gradient_unit(name: str, group: h5py.Group, key: str, units: Units, options: ReadOptions) -> None:
    """The gradient's own `units` attribute ("hartree/bohr") must agree with energy/length."""
    stored = unit_attribute(group, key)
    if stored is None or options.energy_unit or options.length_unit:
        return
    energy_unit, _, length_unit = stored.partition("/")
    try:
        factor = force_unit_to_ev_per_angstrom(energy_unit, length_unit)
    except ValueError as error:
        raise InputError(f"{name}: {key!r} has units {stored!r}: {error}") from None
    if abs(factor - units.force_to_ev_per_angstrom) > 1e-12 * factor:
        raise InputError(f"{name}: {key!r} has units {stored!r}, which is not energy/length of the file")

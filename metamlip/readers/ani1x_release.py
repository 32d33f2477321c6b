"""ANI-1x / ANI-1ccx release HDF5 layout: several levels of theory on the same geometries.

Groups (one per formula) hold `coordinates` (conformers, atoms, 3) in Angstrom,
`atomic_numbers` (atoms,), and labels in Hartree and Hartree/Angstrom (the release's
documented convention), NaN where a label was not computed. Every label key is its own level:

    wb97x_dz.energy     -> wb97x/6-31g(d)      wb97x_tz.energy -> wb97x/def2-tzvpp
    ccsd(t)_cbs.energy  -> ccsd(t)/cbs         hf_dz/tz/qz.energy -> hf/cc-pvdz|tz|qz

A `<method>_<b>.corr_energy` key (b = dz, tz, qz) is a correlation energy only. It is exposed
as the total-energy level `<method>/cc-pv<b>z` whose energy is
`hf_<b>.energy + <method>_<b>.corr_energy`, e.g. `mp2_tz.corr_energy` -> `mp2/cc-pvtz` and
`npno_ccsd(t)_dz.corr_energy` -> `npno_ccsd(t)/cc-pvdz`; without the matching `hf_<b>.energy`
key it is left out (with a warning). Other `<prefix>.energy` keys become the level `<prefix>`.
Levels get forces only where a `<prefix>.forces` key exists. A structure whose energy (or
forces) is NaN, or whose group lacks the key, is skipped for that level only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from metamlip.data.level_dataset import LevelDataset
from metamlip.errors import InputError
from metamlip.levels import normalise_level
from metamlip.readers.blocks import Block, build_dataset, make_block, require_numbers
from metamlip.readers.hdf5 import first_group_with, groups_with, read_key, where
from metamlip.readers.options import ReadOptions, check_levels_found, resolve_units

logger = logging.getLogger("metamlip.readers")

ENERGY_UNIT = "hartree"
LENGTH_UNIT = "angstrom"
_ENERGY = ".energy"
_CORRELATION = ".corr_energy"
_FORCES = ".forces"
_LEVEL_OF_PREFIX = {
    "wb97x_dz": "wb97x/6-31g(d)",
    "wb97x_tz": "wb97x/def2-tzvpp",
    "ccsd(t)_cbs": "ccsd(t)/cbs",
    "hf_dz": "hf/cc-pvdz",
    "hf_tz": "hf/cc-pvtz",
    "hf_qz": "hf/cc-pvqz",
}
_CORRELATION_BASIS = {"dz": "cc-pvdz", "tz": "cc-pvtz", "qz": "cc-pvqz"}


@dataclass(frozen=True)
class _Label:
    """One level in the file: the energy keys whose sum is its total energy, and its forces key."""

    level: str
    energy_keys: tuple[str, ...]
    forces_key: str | None


def is_release_layout(file: h5py.File) -> bool:
    """Whether groups hold `atomic_numbers` and `<prefix>.energy`-style label keys."""
    group = first_group_with(file, "coordinates")
    return (
        group is not None
        and "atomic_numbers" in group
        and any(key.endswith((_ENERGY, _CORRELATION)) for key in group)
    )


def read_release(file: h5py.File, path: Path, options: ReadOptions) -> list[LevelDataset]:
    """The levels of a release-layout file: all, or those named by `levels` (or `level`)."""
    if options.energy_key or options.forces_key:
        raise InputError(
            f"{path}: `energy_key`/`forces_key` do not apply to the ANI-1x release layout, "
            "where every label key is a level; choose levels with `levels`"
        )
    if options.level and options.levels:
        raise InputError(f"{path}: give `level` or `levels`, not both, for a file with several levels")
    wanted = options.levels or ((normalise_level(options.level),) if options.level else None)
    groups = list(groups_with(file, "coordinates"))
    labels = _labels_in(path, set().union(*(group.keys() for group in groups)))
    check_levels_found(str(path), wanted, [label.level for label in labels])
    labels = [label for label in labels if wanted is None or label.level in wanted]
    units = resolve_units(str(path), options, ENERGY_UNIT, LENGTH_UNIT)
    blocks: dict[str, list[Block]] = {label.level: [] for label in labels}
    for group in groups:
        name = where(path, group)
        numbers = ("atomic_numbers", read_key(path, group, "atomic_numbers"))
        positions = ("coordinates", read_key(path, group, "coordinates"))
        shape = positions[1].shape
        for label in labels:
            energies = sum(_values(name, group, key, shape[:1]) for key in label.energy_keys)
            forces = None if label.forces_key is None else _values(name, group, label.forces_key, shape)
            blocks[label.level].append(
                make_block(
                    name,
                    units,
                    numbers=numbers,
                    positions=positions,
                    energies=(" + ".join(label.energy_keys), energies),
                    forces=None if forces is None else (label.forces_key, forces),
                )
            )
    return [build_dataset(level, level_blocks, str(path)) for level, level_blocks in blocks.items()]


def release_levels(path: Path, group: h5py.Group) -> list[str]:
    """The levels whose label keys `group` holds (normalised names)."""
    return [label.level for label in _labels_in(path, set(group.keys()))]


def _labels_in(path: Path, keys: set[str]) -> list[_Label]:
    """The levels that the label keys of the file make up (see the module docstring)."""
    labels = []
    for key in sorted(keys):
        if key.endswith(_ENERGY):
            prefix = key[: -len(_ENERGY)]
            forces_key = prefix + _FORCES
            level = normalise_level(_LEVEL_OF_PREFIX.get(prefix, prefix))
            labels.append(_Label(level, (key,), forces_key if forces_key in keys else None))
        elif key.endswith(_CORRELATION):
            method, _, basis = key[: -len(_CORRELATION)].rpartition("_")
            reference = f"hf_{basis}{_ENERGY}"
            if basis not in _CORRELATION_BASIS or reference not in keys:
                logger.warning("%s: left out %r: no Hartree-Fock energy %r to add it to", path, key, reference)
                continue
            labels.append(_Label(normalise_level(f"{method}/{_CORRELATION_BASIS[basis]}"), (reference, key), None))
    return labels


def _values(name: str, group: h5py.Group, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Dataset `key` of `group` as float64 of `shape`, or all NaN (label missing) if the group lacks it."""
    if key not in group:
        return np.full(shape, np.nan)
    values = require_numbers(name, key, read_key(Path(group.file.filename), group, key)).astype(np.float64)
    if values.shape != shape:
        raise InputError(f"{name}: {key!r} has shape {values.shape}, expected {shape} to match 'coordinates'")
    return values

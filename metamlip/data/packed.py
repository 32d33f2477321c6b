"""The packed level format: one level of theory as numpy ``.npy`` files, read by memory map.

A dataset too large for memory is converted once (`pack_hdf5`, or ``metamlip pack``; ANI-1x
release, ANI/COMP6 and SPICE HDF5 layouts) into one folder per level:

    meta.json                    {"format": "metamlip-packed", "version": 1, "level", "source",
                                  "n_structures", "n_atoms_total", "elements", "has_forces",
                                  "units": {"energy": "eV", "length": "Angstrom"}}
    atomic_numbers.npy           (n_atoms_total,) uint8
    positions_angstrom.npy       (n_atoms_total, 3) float64
    forces_ev_per_angstrom.npy   (n_atoms_total, 3) float64, only if the level has forces
    energies_ev.npy              (n_structures,) float64 total energies
    atom_offsets.npy             (n_structures + 1,) int64 where each structure's atoms start

The conversion streams the source group by group through the ordinary reader (units, NaN
labels), so it never holds the whole file. `PackedLevel` opens a folder: only `atom_offsets`
is read into memory; atoms, positions, forces and energies stay on disk until a batch reads them.
Molecules only (no periodic cells).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import h5py
import numpy as np

from metamlip.atomic_files import write_json_atomically
from metamlip.data.batching import _ranges
from metamlip.data.level_dataset import LevelDataset
from metamlip.data.pack_folders import clear_level_folder, level_folder, prepare_output
from metamlip.data.pack_folders import level_folder_name  # noqa: F401 - re-exported for callers of this module
from metamlip.errors import InputError, OptionError
from metamlip.levels import normalise_level
from metamlip.readers import ani_hdf5, spice_hdf5
from metamlip.readers.ani1x_release import is_release_layout, read_release, release_levels
from metamlip.readers.blocks import build_dataset
from metamlip.readers.hdf5 import first_group_with, groups_with, open_hdf5
from metamlip.readers.options import ReadOptions, check_levels_found, require_file, resolve_level

FORMAT = "metamlip-packed"
VERSION = 1
_ARRAYS = {  # name: (dtype, per-atom or per-structure width; None = 1-D)
    "atomic_numbers": (np.uint8, None),
    "positions_angstrom": (np.float64, 3),
    "forces_ev_per_angstrom": (np.float64, 3),
    "energies_ev": (np.float64, None),
}


PACKED_FILES = {"meta.json", "atom_offsets.npy"} | {f"{name}{suffix}" for name in _ARRAYS for suffix in (".npy", ".raw")}


class _LevelWriter:
    """Appends converted structures of one level to raw files; `finish` turns them into .npy files."""

    def __init__(self, folder: Path, level: str, source: str, has_forces: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.level, self.source, self.has_forces = folder, level, source, has_forces
        names = [name for name in _ARRAYS if has_forces or name != "forces_ev_per_angstrom"]
        self.streams = {name: open(folder / f"{name}.raw", "wb") for name in names}
        self.n_atoms: list[np.ndarray] = []
        self.elements: set[int] = set()

    def append(self, dataset: LevelDataset) -> None:
        if dataset.cells_angstrom is not None:
            raise InputError(f"{dataset.source}: the packed format holds molecules only (no periodic cells)")
        if dataset.has_forces != self.has_forces:
            raise InputError(f"{dataset.source}: level {self.level!r} has forces in some groups and not in others")
        for name, stream in self.streams.items():
            stream.write(np.ascontiguousarray(getattr(dataset, name), dtype=_ARRAYS[name][0]).tobytes())
        self.n_atoms.append(dataset.n_atoms)
        self.elements.update(dataset.elements)

    def finish(self) -> Path:
        n_atoms = np.concatenate(self.n_atoms) if self.n_atoms else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(n_atoms)]).astype(np.int64)
        np.save(self.folder / "atom_offsets.npy", offsets)
        for name, stream in self.streams.items():
            stream.close()
            dtype, width = _ARRAYS[name]
            length = len(n_atoms) if name == "energies_ev" else int(offsets[-1])
            raw = self.folder / f"{name}.raw"
            shape = (length,) if width is None else (length, width)
            target = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            if length:
                source = np.memmap(raw, dtype=dtype, mode="r", shape=shape)
                for start in range(0, length, 1 << 22):  # copy in chunks, never the whole array
                    target[start : start + (1 << 22)] = source[start : start + (1 << 22)]
                del source
            target.flush()
            del target
            raw.unlink()
        meta = {
            "format": FORMAT, "version": VERSION, "level": self.level, "source": self.source,
            "n_structures": len(n_atoms), "n_atoms_total": int(offsets[-1]), "elements": sorted(self.elements),
            "has_forces": self.has_forces, "units": {"energy": "eV", "length": "Angstrom"},
        }
        write_json_atomically(self.folder / "meta.json", meta)  # written last: it marks the folder complete
        return self.folder


def pack_hdf5(
    path: str | PathLike[str],
    out_dir: str | PathLike[str],
    levels: list[str] | None = None,
    **options: str | None,
) -> dict[str, Path]:
    """Convert an HDF5 dataset into one packed folder per level, one molecule group at a time.

    Layouts: ANI-1x/ANI-1ccx release (every label key a level; only the requested levels' keys
    are read), ANI/COMP6 (`coordinates`, `species`, `energies`) and SPICE (`conformations`).
    `options` are `read_dataset`'s (`level`, `energy_unit`, `length_unit`, `energy_key`,
    `forces_key`). Returns {level: folder}. Structures with NaN labels are dropped per level, as
    `read_dataset` does. Nothing is written or removed outside `out_dir`: see `pack_folders` for
    the folder names and what a rerun may replace.
    """
    path, out_dir = require_file(path), Path(out_dir)
    try:
        wanted = None if levels is None else tuple(normalise_level(level) for level in levels)
    except ValueError as error:
        raise OptionError(f"{path}: {{option}}: {error}", "levels") from None
    writers: dict[str, _LevelWriter] = {}
    folder_levels: dict[str, str] = {}  # folder name -> level, to refuse two levels in one folder
    found: set[str] = set()  # every level of the file, for the message when a wanted one is missing
    with open_hdf5(path) as file:
        wanted, read_options = _release_level_selects(file, path, wanted, ReadOptions(**options))
        prepare_output(out_dir)
        for dataset in _group_levels(file, path, wanted, read_options, found):
            found.add(dataset.level)
            if wanted is not None and dataset.level not in wanted:
                continue
            if dataset.level not in writers:
                folder = level_folder(out_dir, dataset.level, folder_levels, str(path))
                clear_level_folder(folder, dataset.level, PACKED_FILES)
                writers[dataset.level] = _LevelWriter(folder, dataset.level, str(path), dataset.has_forces)
            writers[dataset.level].append(dataset)
    if not writers and wanted is None:
        raise InputError(f"{path}: no molecule groups of a known HDF5 layout (ANI-1x release, ANI/COMP6, SPICE)")
    check_levels_found(str(path), wanted, sorted(found))
    return {level: writer.finish() for level, writer in writers.items()}


def _release_level_selects(
    file: h5py.File, path: Path, wanted: tuple[str, ...] | None, options: ReadOptions
) -> tuple[tuple[str, ...] | None, ReadOptions]:
    """In the ANI-1x release layout the `level` option picks a level (as in `read_dataset`): it
    joins the wanted levels. Other layouts keep it as the level name of the file's data."""
    if not options.level or not is_release_layout(file):
        return wanted, options
    level = resolve_level(str(path), options, None)
    return (wanted or ()) + (level,), dataclasses.replace(options, level=None)


def _group_levels(
    file: h5py.File, path: Path, wanted: tuple[str, ...] | None, options: ReadOptions, found: set[str]
) -> Iterator[LevelDataset]:
    """The levels of each molecule group of the file, read one group at a time (release layout: only
    the wanted ones; all its levels are added to `found`)."""
    if first_group_with(file, spice_hdf5.POSITIONS_KEY) is not None:
        level = spice_hdf5.spice_level(path, options)
        for group in groups_with(file, spice_hdf5.POSITIONS_KEY):
            yield build_dataset(level, [spice_hdf5.molecule_block(path, group, options)], str(path))
    elif is_release_layout(file):
        for group in groups_with(file, "coordinates"):
            here = release_levels(path, group)
            found.update(here)
            levels_here = tuple(level for level in here if wanted is None or level in wanted)
            if levels_here:
                yield from read_release(group, path, dataclasses.replace(options, levels=levels_here))
    else:
        for group in groups_with(file, "coordinates"):
            level, block = ani_hdf5.molecule_block(path, group, options)
            yield build_dataset(level, [block], str(path))


@dataclass
class PackedLevel:
    """A packed level opened by memory map: the `LevelDataset` fields a batcher reads, lazily.

    `indices` selects (and orders) structures of the folder, so `subset` costs no copy of atoms.
    """

    folder: Path
    level: str
    source: str
    elements: list[int]
    has_forces: bool
    indices: np.ndarray

    @classmethod
    def open(cls, folder: str | PathLike[str]) -> PackedLevel:
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise InputError(f"{folder}: not a packed level (no meta.json); make one with `metamlip pack`")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
            raise InputError(f"{folder}: meta.json is not {FORMAT} version <= {VERSION}")
        return cls(folder, meta["level"], meta["source"], meta["elements"], meta["has_forces"], np.arange(meta["n_structures"]))

    def __post_init__(self) -> None:
        self._offsets = np.load(self.folder / "atom_offsets.npy")
        self._arrays: dict[str, np.ndarray] | None = None

    def _array(self, name: str) -> np.ndarray:
        """Memory map of one array, opened on first use in this process (never shared across fork)."""
        if self._arrays is None:
            self._arrays = {}
        if name not in self._arrays:
            self._arrays[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def n_atoms(self) -> np.ndarray:
        """(n_structures,) int64 atoms per structure."""
        return self._offsets[self.indices + 1] - self._offsets[self.indices]

    def atom_starts(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices),) where the atoms of structures `indices` (of this view) start in the files."""
        return self._offsets[self.indices[indices]]

    @property
    def energies_ev(self) -> np.ndarray:
        """(n_structures,) float64 total energies of this view (read into memory: 8 bytes each)."""
        return self.energies_of(np.arange(len(self)))

    @property
    def forces_ev_per_angstrom(self) -> np.ndarray | None:
        """(n_atoms of this view, 3) float64 forces, read into memory (for evaluating a test set)."""
        if not self.has_forces:
            return None
        return self.atoms("forces_ev_per_angstrom", _ranges(self.atom_starts(np.arange(len(self))), self.n_atoms))

    def energies_of(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices),) float64 total energies of structures `indices` of this view, eV."""
        return np.asarray(self._array("energies_ev")[self.indices[indices]])

    def atoms(self, name: str, atom_index: np.ndarray) -> np.ndarray:
        """Per-atom array `name` (see the module docstring) at file atom positions `atom_index`."""
        return np.asarray(self._array(name)[atom_index])

    def subset(self, indices: np.ndarray | list[int]) -> PackedLevel:
        """The structures at `indices` of this view, in that order (no data is read)."""
        view = copy.copy(self)  # shares the (read-only) atom offsets; memory maps reopen on first use
        view.indices = self.indices[np.asarray(indices, dtype=np.int64)]
        return view

    def composition_matrix(self, elements: list[int]) -> np.ndarray:
        """(n_structures, n_elements) element counts, read in chunks (for `EnergyReference.fit`)."""
        column = np.full(119, -1, dtype=np.int64)
        column[np.asarray(elements, dtype=np.int64)] = np.arange(len(elements))
        counts = np.zeros((len(self), len(elements)))
        all_n_atoms = self.n_atoms
        for start in range(0, len(self), 65536):
            chunk = np.arange(start, min(start + 65536, len(self)))
            n_atoms = all_n_atoms[chunk]
            numbers = self.atoms("atomic_numbers", _ranges(self.atom_starts(chunk), n_atoms)).astype(np.int64)
            if (column[numbers] < 0).any():
                raise InputError(f"{self.folder}: elements {sorted(set(numbers[column[numbers] < 0]))} not in {elements}")
            np.add.at(counts, (np.repeat(chunk, n_atoms), column[numbers]), 1.0)
        return counts


def open_packed(
    folder: str | PathLike[str], *, levels: Sequence[str] | str | None = None, **options: object
) -> list[PackedLevel]:
    """The level of packed `folder`, opened lazily, as a one-item list like `read_dataset`'s.

    `levels` (names are normalised): InputError if the folder's level is not among them. Unit, key
    and level-name options are refused: a packed folder is in eV and Angstrom and names its level.
    """
    given = sorted(name for name, value in options.items() if value is not None)
    if given:
        raise OptionError(f"{folder}: {{option}} does not apply to a packed level folder (eV, Angstrom, level from meta.json)", given[0])
    level = PackedLevel.open(folder)
    names = [levels] if isinstance(levels, str) else levels
    try:
        wanted = None if names is None else tuple(normalise_level(name) for name in names)
    except ValueError as error:
        raise OptionError(f"{folder}: {{option}}: {error}", "levels") from None
    check_levels_found(str(folder), wanted, [level.level])
    return [level]

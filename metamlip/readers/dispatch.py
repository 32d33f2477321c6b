"""`read_dataset` and `read_level`: pick the reader for a file, apply the level selection."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar
from os import PathLike
from pathlib import Path

from metamlip.data.level_dataset import LevelDataset
from metamlip.errors import InputError, OptionError
from metamlip.levels import normalise_level
from metamlip.readers import ani_hdf5, ase_files, npz, spice_hdf5
from metamlip.readers.hdf5 import first_group_with, open_hdf5
from metamlip.readers.options import ReadOptions, check_levels_found, require_file

Reader = Callable[[Path, ReadOptions], list[LevelDataset]]
T = TypeVar("T")  # a level's data: in memory or packed

READERS: dict[str, Reader] = {
    "npz": npz.read,
    "ani-hdf5": ani_hdf5.read,
    "spice-hdf5": spice_hdf5.read,
    "ase": ase_files.read,
}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURE = b"PK\x03\x04"


def read_dataset(
    path: str | PathLike[str],
    *,
    format: str | None = None,
    level: str | None = None,
    levels: Sequence[str] | None = None,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
) -> list[LevelDataset]:
    """Every level of theory in the file at `path`, each as a `LevelDataset` in eV and Angstrom.

    Args:
        path: the dataset file.
        format: one of `READERS` ("npz", "ani-hdf5", "spice-hdf5", "ase"); None detects it from
            the file's content (HDF5 layout by its keys, npz by its zip signature) and otherwise
            hands it to ASE. "packed" is refused here: see `metamlip.data.packed.open_packed`.
        level: level name for files that do not store one; overrides a stored name. In a file
            with several levels (ANI-1x release) it selects that level.
        levels: only these levels (names are normalised); InputError if one is not in the file.
        energy_unit, length_unit: units of the file's values (e.g. "kcal/mol", "bohr"); needed
            where the file and its layout do not say, and override them otherwise.
        energy_key, forces_key: names of the energy and forces entries where a layout has a choice.

    Forces are in eV/Angstrom (the energy factor over the length factor); `n_skipped` counts
    structures dropped for NaN labels.
    """
    if format is not None and format.strip().lower() == "packed":
        raise InputError(f"{path}: format 'packed' (a `metamlip pack` folder) is opened lazily from a config's `datasets` "
                         "entry or by `metamlip.data.packed.open_packed`, not read into memory by this command")
    path = require_file(path)
    options = ReadOptions(
        level=level,
        levels=_normalised(path, levels),
        energy_unit=energy_unit,
        length_unit=length_unit,
        energy_key=energy_key,
        forces_key=forces_key,
    )
    datasets = READERS[_format_of(path, format)](path, options)
    check_levels_found(str(path), options.levels, [dataset.level for dataset in datasets])
    return [dataset for dataset in datasets if options.levels is None or dataset.level in options.levels]


def read_level(path: str | PathLike[str], **options: object) -> LevelDataset:
    """The one level of theory in (or selected from) the file: `read_dataset` with one result.

    InputError naming the file and the levels found if there is not exactly one.
    """
    return only_level(path, read_dataset(path, **options))  # type: ignore[arg-type]


def only_level(path: str | PathLike[str], levels: list[T]) -> T:
    """The one item of `levels` (datasets of the file at `path`); InputError naming the levels found if not one."""
    if len(levels) != 1:
        found = [level.level for level in levels]
        raise InputError(f"{path}: expected one level of theory, found {len(found)}: {found}; choose with `levels=[...]`")
    return levels[0]


def _normalised(path: Path, levels: Sequence[str] | None) -> tuple[str, ...] | None:
    if levels is None:
        return None
    names = [levels] if isinstance(levels, str) else list(levels)
    try:
        return tuple(normalise_level(name) for name in names)
    except ValueError as error:
        raise OptionError(f"{path}: {{option}}: {error}", "levels") from None


def _format_of(path: Path, format: str | None) -> str:
    """The reader name: `format` checked, or detected from the file's first bytes and keys."""
    if format is not None:
        name = format.strip().lower().replace("_", "-")
        if name not in READERS:
            raise InputError(f"{path}: unknown format {format!r}; known formats: {sorted(READERS)}")
        return name
    with path.open("rb") as handle:
        signature = handle.read(8)
    if signature.startswith(_ZIP_SIGNATURE):
        return "npz"
    if signature == _HDF5_SIGNATURE:
        return _hdf5_layout(path)
    return "ase"


def _hdf5_layout(path: Path) -> str:
    with open_hdf5(path) as file:
        if first_group_with(file, spice_hdf5.POSITIONS_KEY) is not None:
            return "spice-hdf5"
        if first_group_with(file, "coordinates") is not None:
            return "ani-hdf5"
    raise InputError(
        f"{path}: HDF5 file with neither 'conformations' (SPICE) nor 'coordinates' (ANI) groups; "
        f"known formats: {sorted(READERS)}"
    )

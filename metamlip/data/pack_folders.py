"""Where `metamlip pack` writes: one sub-folder of the output folder per level, named safely.

A level name comes from data (an HDF5 key, a `lot` dataset, the `level` option), so it may hold
`/`, be `..` or `.`. The folder name keeps letters, digits, `-`, `+` and `.` and turns every other
character into `_` ('mp2/cc-pvdz' -> 'mp2_cc-pvdz'); a name of dots only (or nothing) is refused,
and two levels of one file that get the same folder name are an error. Every folder pack writes
into or clears must resolve to a direct child of the output folder (a link that points elsewhere is
refused), and clearing a folder removes only the files of the packed format, never a folder tree.
"""

from __future__ import annotations

import json
from pathlib import Path

from metamlip.errors import InputError

_KEPT_CHARACTERS = "-+."


def level_folder_name(level: str) -> str:
    """A file-system-safe folder name for a level, e.g. 'wb97x/6-31g(d)' -> 'wb97x_6-31g_d_'.

    InputError if nothing usable is left ('', '.', '..' and other names of dots only).
    """
    name = "".join(character if character.isalnum() or character in _KEPT_CHARACTERS else "_" for character in level)
    if not name.strip("."):
        raise InputError(f"level {level!r} cannot name a folder (it would be {name!r}); give the level another name")
    return name


def prepare_output(out_dir: Path) -> Path:
    """Create the output folder; InputError if it exists as something other than a folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder; choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def level_folder(out_dir: Path, level: str, taken: dict[str, str], source: str) -> Path:
    """The folder of `level` (read from the file `source`) directly under `out_dir`, recorded in
    `taken` (folder name -> level).

    InputError if the name is unusable, already taken by another level of this run, or resolves
    outside `out_dir` (a link).
    """
    try:
        name = level_folder_name(level)
    except InputError as error:
        raise InputError(f"{source}: {error}") from None
    if taken.get(name, level) != level:
        raise InputError(
            f"{source}: levels {taken[name]!r} and {level!r} would both be packed into {out_dir / name}; "
            "rename one of them (folder names keep only letters, digits, '-', '+' and '.')"
        )
    folder = out_dir / name
    if folder.resolve().parent != out_dir.resolve():
        raise InputError(f"{folder}: resolves to {folder.resolve()}, outside the output folder {out_dir}; remove it")
    taken[name] = level
    return folder


def clear_level_folder(folder: Path, level: str, packed_files: set[str]) -> None:
    """Remove a former pack of `level` from `folder`, file by file (nothing if it does not exist).

    InputError if `folder` is not a folder, holds anything `metamlip pack` does not write (names
    outside `packed_files`, sub-folders), or is the packed folder of another level.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; remove it or choose another output folder")
    entries = list(folder.iterdir())
    foreign = [entry.name for entry in entries if not _written_by_pack(entry.name, packed_files) or (entry.is_dir() and not entry.is_symlink())]
    if foreign:
        raise InputError(
            f"{folder}: holds {foreign[0]!r}, which `metamlip pack` does not write; remove it or choose another output folder"
        )
    _check_former_level(folder, level)
    for entry in entries:
        entry.unlink()


def _written_by_pack(name: str, packed_files: set[str]) -> bool:
    """A packed file, or the temporary file an atomic write of one leaves when killed (`.NAME.*.tmp`)."""
    return name in packed_files or (name.endswith(".tmp") and any(name.startswith(f".{packed}.") for packed in packed_files))


def _check_former_level(folder: Path, level: str) -> None:
    """InputError if `folder`'s meta.json names another level (a folder-name collision across runs)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return  # an interrupted pack: raw files only
    try:
        former = json.loads(meta_path.read_text(encoding="utf-8")).get("level")
    except (ValueError, AttributeError, UnicodeDecodeError) as error:
        raise InputError(f"{meta_path}: not a packed level's meta.json ({error}); remove the folder") from None
    if former != level:
        raise InputError(f"{folder}: holds the packed level {former!r}, not {level!r}; choose another output folder")

"""Small HDF5 helpers shared by the HDF5 layouts: open, find groups, read keys with clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from metamlip.errors import InputError


def open_hdf5(path: Path) -> h5py.File:
    """The file opened read-only; InputError naming it if it is not HDF5."""
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise InputError(f"{path}: cannot open as HDF5 ({error})") from None


def where(path: Path, group: h5py.Group) -> str:
    """'FILE:group' for messages and sources."""
    return f"{path}:{group.name.lstrip('/')}"


def groups_with(group: h5py.Group, key: str) -> Iterator[h5py.Group]:
    """Every group at or below `group` (in name order) that holds a dataset named `key`.

    A member HDF5 cannot open (corrupt bytes, a broken link) is an InputError naming it, never
    skipped: h5py's own `values()` would silently leave it out.
    """
    if key in group and isinstance(member(group, key), h5py.Dataset):
        yield group
    for name in group:
        child = member(group, name)
        if isinstance(child, h5py.Group):
            yield from groups_with(child, key)


def first_group_with(group: h5py.Group, key: str) -> h5py.Group | None:
    return next(groups_with(group, key), None)


def member(group: h5py.Group, name: str) -> h5py.Group | h5py.Dataset:
    """The group or dataset `name` of `group`; InputError naming the file and member if it cannot be opened."""
    try:
        return group[name]
    except (KeyError, OSError, RuntimeError, ValueError) as error:
        inside = f"{group.name.rstrip('/')}/{name}".lstrip("/")
        raise InputError(f"{group.file.filename}:{inside}: HDF5 cannot open it ({error}); the file may be damaged") from None


def read_key(path: Path, group: h5py.Group, key: str) -> np.ndarray:
    """The dataset `key` of `group` as an array; InputError naming file, group and key if absent or unreadable."""
    if key not in group:
        raise InputError(f"{where(path, group)}: no key {key!r}; keys: {sorted(group.keys())}")
    dataset = member(group, key)
    try:
        return dataset[()]
    except (OSError, RuntimeError, ValueError) as error:
        raise InputError(f"{where(path, group)}: cannot read {key!r} ({error}); the file may be damaged") from None


def text(value: object) -> str:
    """A string stored as bytes, a numpy string, or a one-element array of either."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def unit_attribute(group: h5py.Group, key: str) -> str | None:
    """The `units` attribute of dataset `key`, if it has one."""
    units = member(group, key).attrs.get("units") if key in group else None
    return None if units is None else text(units)

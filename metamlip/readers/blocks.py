"""From arrays in a file's units to one `LevelDataset`: shape checks, units, missing labels.

A reader cuts a file into blocks (one molecule's conformers, one npz file, one ASE frame),
checks each with `make_block`, and hands them to `build_dataset`, which converts units once,
drops structures whose labels are NaN, logs how many, and packs the rest.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from metamlip.data.level_dataset import LevelDataset
from metamlip.errors import InputError
from metamlip.readers.options import Units

logger = logging.getLogger("metamlip.readers")

Keyed = tuple[str, np.ndarray]  # (name in the file, values), the name used in error messages


@dataclass
class Block:
    """Conformers read from one place in a file, values still in the file's units.

    Attributes:
        where: "FILE" or "FILE:group" (or "FILE, frame i"), used in messages.
        units: factors from this block's units to eV and Angstrom.
        numbers: (n_atoms,) shared by all conformers, or (n_conf, n_atoms) with 0 = no atom.
        positions: (n_conf, n_atoms, 3) in the file's length unit.
        energies: (n_conf,) in the file's energy unit; NaN = label missing.
        forces: (n_conf, n_atoms, 3) in file energy/length units, NaN = missing, or None.
        cells: (n_conf, 3, 3) lattice vectors in the file's length unit, or None.
        pbc: (n_conf, 3) bool, or None.
    """

    where: str
    units: Units
    numbers: np.ndarray
    positions: np.ndarray
    energies: np.ndarray
    forces: np.ndarray | None = None
    cells: np.ndarray | None = None
    pbc: np.ndarray | None = None


def make_block(
    where: str,
    units: Units,
    numbers: Keyed,
    positions: Keyed,
    energies: Keyed,
    forces: Keyed | None = None,
    cells: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
) -> Block:
    """A `Block` after checking that the arrays fit together; InputError names `where` and the key."""
    (z_key, z), (r_key, r), (e_key, e) = numbers, positions, energies
    z, r, e = (require_numbers(where, key, values) for key, values in (numbers, positions, energies))
    if r.ndim != 3 or r.shape[2] != 3:
        raise InputError(f"{where}: {r_key!r} has shape {r.shape}, expected (structures, atoms, 3)")
    n_conf, n_atoms = r.shape[:2]
    if e.ndim == 2 and e.shape[1] == 1:
        e = e[:, 0]
    if e.ndim != 1:
        raise InputError(f"{where}: {e_key!r} has shape {e.shape}, expected (structures,)")
    if len(e) != n_conf:
        raise InputError(f"{where}: {e_key!r} has {len(e)} rows but {r_key!r} has {n_conf}")
    if z.shape not in ((n_atoms,), (n_conf, n_atoms)):
        raise InputError(
            f"{where}: {z_key!r} has shape {z.shape} but {r_key!r} has shape {r.shape}; "
            f"expected ({n_atoms},) or ({n_conf}, {n_atoms})"
        )
    f = None
    if forces is not None:
        f_key, f = forces[0], require_numbers(where, *forces)
        if f.shape != r.shape:
            raise InputError(f"{where}: {f_key!r} has shape {f.shape} but {r_key!r} has shape {r.shape}")
    return Block(where, units, z, r, e, f, cells, pbc)


def require_numbers(where: str, key: str, values: object) -> np.ndarray:
    """`values` as an array of numbers; InputError naming `where` and `key` if it holds text or objects."""
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        shown = array.reshape(-1)[:1].tolist()
        raise InputError(f"{where}: {key!r} holds {array.dtype} values (first: {shown}), expected numbers")
    return array


def build_dataset(level: str, blocks: list[Block], source: str) -> LevelDataset:
    """Convert, drop structures with NaN energy or forces, and pack `blocks` into one dataset.

    The count of dropped structures goes to `n_skipped` and to the log at INFO.
    """
    if not blocks:
        raise InputError(f"{source}: no structures found for level {level!r}")
    parts = [_converted(level, block) for block in blocks]
    kept = [_labelled(part) for part in parts]
    n_total = sum(len(part) for part in parts)
    n_kept = sum(int(keep.sum()) for keep in kept)
    parts = [part if keep.all() else part.subset(np.flatnonzero(keep)) for part, keep in zip(parts, kept)]
    dataset = _concatenate(parts, source)
    dataset.n_skipped = n_total - n_kept
    if dataset.n_skipped:
        logger.info(
            "%s: skipped %d of %d structures with NaN labels in %s", dataset.level, dataset.n_skipped, n_total, source
        )
    return dataset


def _converted(level: str, block: Block) -> LevelDataset:
    """One block in eV and Angstrom, padding atoms (number 0) removed."""
    units = block.units
    dataset = LevelDataset.from_padded(
        level=level,
        atomic_numbers=block.numbers,
        positions_angstrom=np.asarray(block.positions, dtype=np.float64) * units.length_to_angstrom,
        energies_ev=np.asarray(block.energies, dtype=np.float64) * units.energy_to_ev,
        forces_ev_per_angstrom=None
        if block.forces is None
        else np.asarray(block.forces, dtype=np.float64) * units.force_to_ev_per_angstrom,
        source=block.where,
    )
    if block.cells is None:
        return dataset
    return dataclasses.replace(
        dataset,
        cells_angstrom=np.asarray(block.cells, dtype=np.float64) * units.length_to_angstrom,
        pbc=np.asarray(block.pbc, dtype=bool),
    )


def _labelled(dataset: LevelDataset) -> np.ndarray:
    """(n_structures,) bool: energy finite and, where there are forces, all forces finite."""
    keep = np.isfinite(dataset.energies_ev)
    if dataset.forces_ev_per_angstrom is not None:
        bad_atoms = ~np.isfinite(dataset.forces_ev_per_angstrom).all(axis=1)
        structure_of_atom = np.repeat(np.arange(len(dataset)), dataset.n_atoms)
        keep[structure_of_atom[bad_atoms]] = False
    return keep


def _concatenate(parts: list[LevelDataset], source: str) -> LevelDataset:
    """One dataset holding all `parts` in order; every part has forces (cells) or none does."""
    for attribute, what in (("forces_ev_per_angstrom", "forces"), ("cells_angstrom", "cells")):
        present = [getattr(part, attribute) is not None for part in parts]
        if any(present) and not all(present):
            raise InputError(
                f"{parts[present.index(False)].source} has no {what}, but {parts[present.index(True)].source} has; "
                f"give {what} to all structures of a level or to none"
            )

    def joined(attribute: str) -> np.ndarray | None:
        values = [getattr(part, attribute) for part in parts]
        return None if values[0] is None else np.concatenate(values)

    return LevelDataset(
        level=parts[0].level,
        atomic_numbers=joined("atomic_numbers"),
        positions_angstrom=joined("positions_angstrom"),
        energies_ev=joined("energies_ev"),
        n_atoms=joined("n_atoms"),
        forces_ev_per_angstrom=joined("forces_ev_per_angstrom"),
        cells_angstrom=joined("cells_angstrom"),
        pbc=joined("pbc"),
        source=source,
    )

"""Neighbour pairs from vesin, computed once per structure and kept with the dataset."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from vesin import NeighborList

from metamlip.data.level_dataset import LevelDataset


@dataclass(frozen=True)
class PairTable:
    """All ordered pairs (i, j), i != j, closer than the cutoff, for every structure of a dataset.

    Attributes:
        cutoff_angstrom: the cutoff the pairs were computed with.
        pair_first: (n_pairs_total,) int64 index of atom i within its structure.
        pair_second: (n_pairs_total,) int64 index of atom j within its structure.
        pair_cell_shift: (n_pairs_total, 3) int64 periodic image of j (all zero for molecules).
        pair_offsets: (n_structures + 1,) int64 where each structure's pairs start.
    """

    cutoff_angstrom: float
    pair_first: np.ndarray
    pair_second: np.ndarray
    pair_cell_shift: np.ndarray
    pair_offsets: np.ndarray

    @property
    def n_pairs(self) -> np.ndarray:
        """(n_structures,) pairs per structure."""
        return np.diff(self.pair_offsets)


def structure_pairs(
    positions_angstrom: np.ndarray,
    cutoff_angstrom: float,
    cell_angstrom: np.ndarray | None = None,
    pbc: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full neighbour list (i, j, cell shift) of one structure, sorted by (i, j)."""
    periodic = np.zeros(3, dtype=bool) if pbc is None else np.asarray(pbc, dtype=bool)
    box = np.zeros((3, 3)) if cell_angstrom is None or not periodic.any() else np.asarray(cell_angstrom, dtype=np.float64)
    calculator = NeighborList(cutoff=float(cutoff_angstrom), full_list=True, n_threads=1)
    first, second, shift = calculator.compute(
        points=np.asarray(positions_angstrom, dtype=np.float64), box=box, periodic=periodic, quantities="ijS"
    )
    order = np.lexsort((second, first))
    return first[order].astype(np.int64), second[order].astype(np.int64), shift[order].astype(np.int64)


def build_pair_table(dataset: LevelDataset, cutoff_angstrom: float) -> PairTable:
    """Neighbour pairs of every structure in `dataset` (one vesin call per structure)."""
    firsts, seconds, shifts, counts = [], [], [], []
    for index in range(len(dataset)):
        atoms = dataset.atom_slice(index)
        cell = None if dataset.cells_angstrom is None else dataset.cells_angstrom[index]
        pbc = None if dataset.pbc is None else dataset.pbc[index]
        first, second, shift = structure_pairs(dataset.positions_angstrom[atoms], cutoff_angstrom, cell, pbc)
        firsts.append(first)
        seconds.append(second)
        shifts.append(shift)
        counts.append(len(first))
    empty = np.zeros(0, dtype=np.int64)
    return PairTable(
        cutoff_angstrom=float(cutoff_angstrom),
        pair_first=np.concatenate(firsts) if firsts else empty,
        pair_second=np.concatenate(seconds) if seconds else empty,
        pair_cell_shift=np.concatenate(shifts) if shifts else np.zeros((0, 3), dtype=np.int64),
        pair_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    )

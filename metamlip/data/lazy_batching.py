"""Batches read from a packed level on disk, with neighbour pairs computed per batch.

`PackedBatcher` is the out-of-core sibling of `StructureBatcher`: the same `batch`,
`batches`, `batch_orders`, `n_atoms` and `__len__`, the same `Batch`es (built by
`assemble_batch`), but nothing per atom is held in memory between batches: each batch
reads its structures from the memory-mapped files and calls vesin (`structure_pairs`)
for each of them. `make_batcher` picks the batcher that fits a dataset.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import torch

from metamlip.data.batching import Batch, Batcher, StructureBatcher, _ranges, assemble_batch, species_indices
from metamlip.data.level_dataset import LevelDataset
from metamlip.data.neighbours import structure_pairs
from metamlip.data.packed import PackedLevel

LevelData: TypeAlias = LevelDataset | PackedLevel  # one level's structures, in memory or packed on disk


class PackedBatcher(Batcher):
    """Cuts batches from a `PackedLevel`; neighbour pairs within `cutoff_angstrom`, computed per batch."""

    def __init__(self, dataset: PackedLevel, species: list[int], cutoff_angstrom: float, dtype: torch.dtype = torch.float32) -> None:
        self.dataset = dataset
        self.species = list(species)
        self.cutoff_angstrom = float(cutoff_angstrom)
        self.dtype = dtype
        self._n_atoms = dataset.n_atoms
        species_indices(np.asarray(dataset.elements, dtype=np.int64), self.species, dataset.source or dataset.level)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def n_atoms(self) -> np.ndarray:
        """(n_structures,) int64 atoms per structure."""
        return self._n_atoms

    def batch(self, indices: np.ndarray) -> Batch:
        """The structures at `indices` as one batch (read from disk, pairs computed now)."""
        data = self.dataset
        indices = np.asarray(indices, dtype=np.int64)
        n_atoms = self._n_atoms[indices]
        atom_index = _ranges(data.atom_starts(indices), n_atoms)
        numbers = data.atoms("atomic_numbers", atom_index).astype(np.int64)
        positions = data.atoms("positions_angstrom", atom_index)
        starts = np.cumsum(n_atoms) - n_atoms
        pairs = [structure_pairs(positions[start : start + count], self.cutoff_angstrom) for start, count in zip(starts, n_atoms)]
        n_pairs = np.array([len(first) for first, _, _ in pairs], dtype=np.int64)
        first = np.concatenate([pair[0] for pair in pairs]) if pairs else np.zeros(0, dtype=np.int64)
        second = np.concatenate([pair[1] for pair in pairs]) if pairs else np.zeros(0, dtype=np.int64)
        return assemble_batch(
            level=data.level,
            species_index=species_indices(numbers, self.species, data.source or data.level),
            positions_angstrom=positions,
            n_atoms=n_atoms,
            pairs=(first, second, np.zeros((len(first), 3))),  # molecules: no periodic shifts
            n_pairs=n_pairs,
            energies_ev=data.energies_of(indices),
            forces_ev_per_angstrom=data.atoms("forces_ev_per_angstrom", atom_index) if data.has_forces else None,
            dtype=self.dtype,
        )


def make_batcher(dataset: LevelData, species: list[int], cutoff_angstrom: float, dtype: torch.dtype = torch.float32) -> Batcher:
    """A `PackedBatcher` for a packed level (or a view of one), a `StructureBatcher` for one in memory."""
    kind = PackedBatcher if isinstance(dataset, PackedLevel) else StructureBatcher
    return kind(dataset, species, cutoff_angstrom, dtype)

"""Batches of structures as flat tensors, cut from a level dataset and its cached pairs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from metamlip.data.level_dataset import LevelDataset
from metamlip.data.neighbours import PairTable, build_pair_table
from metamlip.errors import InputError


@dataclass
class Batch:
    """Several structures of one level, atoms end to end.

    Attributes:
        level: normalised level-of-theory name of the labels.
        species_index: (n_atoms,) int64 position of each atom's element in the model's species list.
        positions_angstrom: (n_atoms, 3) model dtype.
        structure_index: (n_atoms,) int64 structure of each atom within the batch.
        n_atoms: (n_structures,) int64 atoms per structure.
        neighbour_index: (n_atoms, max_neighbours) int64 batch-wide index of each neighbour j of atom i;
            padded slots point at atom i itself.
        neighbour_shift_angstrom: (n_atoms, max_neighbours, 3) model dtype, Cartesian shift of j's
            periodic image (zero for molecules and padding).
        neighbour_mask: (n_atoms, max_neighbours) bool, False on padded slots.
        energies_ev: (n_structures,) float64 labelled total energies.
        forces_ev_per_angstrom: (n_atoms, 3) model dtype labelled forces, or None (energy-only level).
        shard_of: (structures, atoms) of the global batch when this batch is one process's shard
            of it in data-parallel training (see `metamlip.distributed`); None otherwise.
    """

    level: str
    species_index: torch.Tensor
    positions_angstrom: torch.Tensor
    structure_index: torch.Tensor
    n_atoms: torch.Tensor
    neighbour_index: torch.Tensor
    neighbour_shift_angstrom: torch.Tensor
    neighbour_mask: torch.Tensor
    energies_ev: torch.Tensor
    forces_ev_per_angstrom: torch.Tensor | None
    shard_of: tuple[int, int] | None = None

    @property
    def n_structures(self) -> int:
        return int(self.n_atoms.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """This batch on `device` (itself when it is there already)."""
        if self.species_index.device == torch.device(device):
            return self
        moved = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return Batch(**moved)


def species_indices(atomic_numbers: np.ndarray, species: list[int], where: str) -> np.ndarray:
    """Position of each atomic number in `species`; InputError naming the first unknown element."""
    lookup = np.full(max(max(species), int(atomic_numbers.max(initial=0))) + 1, -1, dtype=np.int64)
    lookup[np.asarray(species, dtype=np.int64)] = np.arange(len(species))
    index = lookup[atomic_numbers]
    if (index < 0).any():
        unknown = sorted(set(int(z) for z in atomic_numbers[index < 0]))
        raise InputError(f"{where}: element(s) with atomic number {unknown} unknown to the model (species {species})")
    return index


class Batcher:
    """Cuts batches from a dataset; subclasses give `batch(indices)` and `__len__`."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: np.ndarray) -> Batch:
        raise NotImplementedError

    def batches(self, batch_size: int, seed: int | tuple[int, ...] | None = None) -> Iterator[Batch]:
        """One pass over the dataset; shuffled with `seed` (a fixed order when None)."""
        for indices in self.batch_orders(batch_size, seed):
            yield self.batch(indices)

    def batch_orders(self, batch_size: int, seed: int | tuple[int, ...] | None = None) -> Iterator[np.ndarray]:
        """The structure indices of each batch of `batches`, without building the batches."""
        return batch_orders(len(self), batch_size, seed)


class StructureBatcher(Batcher):
    """Cuts batches from one level dataset; neighbour pairs are computed once, here."""

    def __init__(
        self,
        dataset: LevelDataset,
        species: list[int],
        cutoff_angstrom: float,
        dtype: torch.dtype = torch.float32,
        pairs: PairTable | None = None,
    ) -> None:
        self.dataset = dataset
        self.dtype = dtype
        self.pairs = pairs if pairs is not None else build_pair_table(dataset, cutoff_angstrom)
        self._species_index = species_indices(dataset.atomic_numbers, species, dataset.source or dataset.level)
        self._pair_shift_angstrom = self._cartesian_shifts()

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def n_atoms(self) -> np.ndarray:
        """(n_structures,) int64 atoms per structure."""
        return self.dataset.n_atoms

    def _cartesian_shifts(self) -> np.ndarray:
        shifts = self.pairs.pair_cell_shift.astype(np.float64)
        if self.dataset.cells_angstrom is None or not shifts.any():
            return np.zeros_like(shifts)
        structure_of_pair = np.repeat(np.arange(len(self.dataset)), self.pairs.n_pairs)
        return np.einsum("pk,pkl->pl", shifts, self.dataset.cells_angstrom[structure_of_pair])

    def batch(self, indices: np.ndarray) -> Batch:
        """The structures at `indices` as one batch."""
        data = self.dataset
        indices = np.asarray(indices, dtype=np.int64)
        n_atoms = data.n_atoms[indices]
        atom_index = _ranges(data.atom_offsets[indices], n_atoms)
        n_pairs = self.pairs.n_pairs[indices]
        pair_index = _ranges(self.pairs.pair_offsets[indices], n_pairs)
        forces = data.forces_ev_per_angstrom
        return assemble_batch(
            level=data.level,
            species_index=self._species_index[atom_index],
            positions_angstrom=data.positions_angstrom[atom_index],
            n_atoms=n_atoms,
            pairs=(self.pairs.pair_first[pair_index], self.pairs.pair_second[pair_index], self._pair_shift_angstrom[pair_index]),
            n_pairs=n_pairs,
            energies_ev=data.energies_ev[indices],
            forces_ev_per_angstrom=None if forces is None else forces[atom_index],
            dtype=self.dtype,
        )


def batch_orders(n_structures: int, batch_size: int, seed: int | tuple[int, ...] | None = None) -> Iterator[np.ndarray]:
    """Indices of consecutive batches of one pass over `n_structures`; shuffled with `seed` (fixed order when None)."""
    order = np.arange(n_structures) if seed is None else np.random.default_rng(seed).permutation(n_structures)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def assemble_batch(
    level: str,
    species_index: np.ndarray,
    positions_angstrom: np.ndarray,
    n_atoms: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    n_pairs: np.ndarray,
    energies_ev: np.ndarray,
    forces_ev_per_angstrom: np.ndarray | None,
    dtype: torch.dtype,
) -> Batch:
    """A `Batch` from per-atom arrays of several structures (end to end) and their pairs.

    `pairs` are (first, second, Cartesian shift in Angstrom) with atom indices *within* each
    structure, structure after structure, sorted by first atom; `n_pairs` counts them per structure.
    """
    first_atom_in_batch = np.repeat(np.cumsum(n_atoms) - n_atoms, n_pairs)
    neighbours = _neighbour_matrix(pairs[0] + first_atom_in_batch, pairs[1] + first_atom_in_batch, pairs[2], len(species_index))
    return Batch(
        level=level,
        species_index=torch.from_numpy(species_index),
        positions_angstrom=torch.from_numpy(positions_angstrom).to(dtype),
        structure_index=torch.from_numpy(np.repeat(np.arange(len(n_atoms)), n_atoms)),
        n_atoms=torch.from_numpy(n_atoms),
        neighbour_index=torch.from_numpy(neighbours[0]),
        neighbour_shift_angstrom=torch.from_numpy(neighbours[1]).to(dtype),
        neighbour_mask=torch.from_numpy(neighbours[2]),
        energies_ev=torch.from_numpy(energies_ev),
        forces_ev_per_angstrom=None if forces_ev_per_angstrom is None else torch.from_numpy(forces_ev_per_angstrom).to(dtype),
    )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each pair, vectorised."""
    total = int(lengths.sum())
    block_start = np.cumsum(lengths) - lengths
    return np.repeat(starts - block_start, lengths) + np.arange(total, dtype=np.int64)


def _neighbour_matrix(
    pair_first: np.ndarray, pair_second: np.ndarray, pair_shift_angstrom: np.ndarray, n_atoms: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs sorted by first atom -> padded (n_atoms, max_neighbours) index, shift and mask arrays."""
    count = np.bincount(pair_first, minlength=n_atoms)
    width = max(int(count.max(initial=0)), 1)
    slot = np.arange(len(pair_first)) - np.repeat(np.cumsum(count) - count, count)
    index = np.repeat(np.arange(n_atoms, dtype=np.int64)[:, None], width, axis=1)
    index[pair_first, slot] = pair_second
    shift = np.zeros((n_atoms, width, 3))
    shift[pair_first, slot] = pair_shift_angstrom
    mask = np.zeros((n_atoms, width), dtype=bool)
    mask[pair_first, slot] = True
    return index, shift, mask

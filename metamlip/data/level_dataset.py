"""A dataset of structures labelled at one level of theory, in eV and Angstrom.

Structures are packed: the atoms of all structures lie end to end in one array,
and ``atom_offsets`` says where each structure starts. Readers convert units once
and build this object; everything downstream reads it and never sees a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

from metamlip.errors import InputError
from metamlip.levels import normalise_level


@dataclass
class LevelDataset:
    """Structures, energies and optional forces at one level of theory.

    Attributes:
        level: normalised level-of-theory name (see `metamlip.levels`).
        atomic_numbers: (n_atoms_total,) int64, atoms of all structures end to end.
        positions_angstrom: (n_atoms_total, 3) float64.
        energies_ev: (n_structures,) float64 total energies.
        n_atoms: (n_structures,) int64 atoms per structure.
        forces_ev_per_angstrom: (n_atoms_total, 3) float64, or None for energy-only levels.
        cells_angstrom: (n_structures, 3, 3) float64 lattice vectors, or None for molecules.
        pbc: (n_structures, 3) bool periodic directions, or None for molecules.
        source: where the data came from (file path and group or key).
        n_skipped: structures the reader dropped because their labels were missing (NaN).
    """

    level: str
    atomic_numbers: np.ndarray
    positions_angstrom: np.ndarray
    energies_ev: np.ndarray
    n_atoms: np.ndarray
    forces_ev_per_angstrom: np.ndarray | None = None
    cells_angstrom: np.ndarray | None = None
    pbc: np.ndarray | None = None
    source: str = ""
    n_skipped: int = 0
    atom_offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.level = normalise_level(self.level)
        self.atomic_numbers = np.ascontiguousarray(self.atomic_numbers, dtype=np.int64)
        self.positions_angstrom = np.ascontiguousarray(self.positions_angstrom, dtype=np.float64)
        self.energies_ev = np.ascontiguousarray(self.energies_ev, dtype=np.float64).reshape(-1)
        self.n_atoms = np.ascontiguousarray(self.n_atoms, dtype=np.int64).reshape(-1)
        if self.forces_ev_per_angstrom is not None:
            self.forces_ev_per_angstrom = np.ascontiguousarray(self.forces_ev_per_angstrom, dtype=np.float64)
        self.atom_offsets = np.concatenate([[0], np.cumsum(self.n_atoms)]).astype(np.int64)
        self._validate()

    def _validate(self) -> None:
        where = self.source or self.level
        n_total = int(self.n_atoms.sum())
        if len(self.energies_ev) != len(self.n_atoms):
            raise InputError(f"{where}: {len(self.energies_ev)} energies for {len(self.n_atoms)} structures")
        if self.atomic_numbers.shape != (n_total,):
            raise InputError(f"{where}: atomic numbers have shape {self.atomic_numbers.shape}, expected ({n_total},)")
        if self.positions_angstrom.shape != (n_total, 3):
            raise InputError(f"{where}: positions have shape {self.positions_angstrom.shape}, expected ({n_total}, 3)")
        if self.forces_ev_per_angstrom is not None and self.forces_ev_per_angstrom.shape != (n_total, 3):
            raise InputError(
                f"{where}: forces have shape {self.forces_ev_per_angstrom.shape}, expected ({n_total}, 3)"
            )
        bad_atoms = np.flatnonzero(~np.isfinite(self.positions_angstrom).all(axis=1))
        if len(bad_atoms):
            structure = int(np.searchsorted(self.atom_offsets, bad_atoms[0], side="right") - 1)
            raise InputError(f"{where}: structure {structure} has NaN or infinite positions")
        if (self.atomic_numbers < 1).any() or (self.atomic_numbers > 118).any():
            atom = int(np.flatnonzero((self.atomic_numbers < 1) | (self.atomic_numbers > 118))[0])
            structure = int(np.searchsorted(self.atom_offsets, atom, side="right") - 1)
            raise InputError(f"{where}: structure {structure} has atomic number {self.atomic_numbers[atom]}")

    def __len__(self) -> int:
        return len(self.n_atoms)

    @property
    def has_forces(self) -> bool:
        return self.forces_ev_per_angstrom is not None

    @property
    def elements(self) -> list[int]:
        """Sorted atomic numbers present in the dataset."""
        return sorted(int(z) for z in np.unique(self.atomic_numbers))

    def atom_slice(self, index: int) -> slice:
        return slice(int(self.atom_offsets[index]), int(self.atom_offsets[index + 1]))

    def composition_matrix(self, elements: list[int]) -> np.ndarray:
        """(n_structures, n_elements) count of each element in each structure."""
        column = {z: i for i, z in enumerate(elements)}
        missing = set(self.elements) - set(column)
        if missing:
            raise InputError(f"{self.source or self.level}: elements {sorted(missing)} not in {elements}")
        structure_of_atom = np.repeat(np.arange(len(self)), self.n_atoms)
        counts = np.zeros((len(self), len(elements)))
        np.add.at(counts, (structure_of_atom, [column[int(z)] for z in self.atomic_numbers]), 1.0)
        return counts

    def subset(self, indices: np.ndarray | list[int]) -> LevelDataset:
        """A new dataset with the structures at `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise InputError(f"{self.source or self.level}: index out of range for {len(self)} structures")
        indices = indices % max(len(self), 1)
        atom_index = (
            np.concatenate([np.arange(self.atom_offsets[i], self.atom_offsets[i + 1]) for i in indices])
            if len(indices)
            else np.zeros(0, dtype=np.int64)
        )
        return LevelDataset(
            level=self.level,
            atomic_numbers=self.atomic_numbers[atom_index],
            positions_angstrom=self.positions_angstrom[atom_index],
            energies_ev=self.energies_ev[indices],
            n_atoms=self.n_atoms[indices],
            forces_ev_per_angstrom=None if self.forces_ev_per_angstrom is None else self.forces_ev_per_angstrom[atom_index],
            cells_angstrom=None if self.cells_angstrom is None else self.cells_angstrom[indices],
            pbc=None if self.pbc is None else self.pbc[indices],
            source=self.source,
        )

    def to_atoms(self, index: int) -> Atoms:
        """Structure `index` as ASE Atoms (no calculator attached)."""
        atoms_range = self.atom_slice(index)
        cell = None if self.cells_angstrom is None else self.cells_angstrom[index]
        pbc = False if self.pbc is None else self.pbc[index]
        return Atoms(
            numbers=self.atomic_numbers[atoms_range],
            positions=self.positions_angstrom[atoms_range],
            cell=cell,
            pbc=pbc,
        )

    @classmethod
    def from_structures(
        cls,
        level: str,
        atomic_numbers: list[np.ndarray],
        positions_angstrom: list[np.ndarray],
        energies_ev: np.ndarray,
        forces_ev_per_angstrom: list[np.ndarray] | None = None,
        cells_angstrom: np.ndarray | None = None,
        pbc: np.ndarray | None = None,
        source: str = "",
        n_skipped: int = 0,
    ) -> LevelDataset:
        """Pack per-structure arrays (each (n_atoms_i,) or (n_atoms_i, 3)) into one dataset."""
        n_atoms = np.array([len(z) for z in atomic_numbers], dtype=np.int64)
        if len(positions_angstrom) != len(n_atoms):
            raise InputError(f"{source}: {len(positions_angstrom)} position sets for {len(n_atoms)} structures")
        for i, (z, r) in enumerate(zip(atomic_numbers, positions_angstrom)):
            if np.shape(r) != (len(z), 3):
                raise InputError(f"{source}: structure {i} has positions of shape {np.shape(r)} for {len(z)} atoms")
            if forces_ev_per_angstrom is not None and np.shape(forces_ev_per_angstrom[i]) != (len(z), 3):
                raise InputError(
                    f"{source}: structure {i} has forces of shape {np.shape(forces_ev_per_angstrom[i])} for {len(z)} atoms"
                )

        def pack(parts: list[np.ndarray], width: int | None) -> np.ndarray:
            if parts:
                return np.concatenate([np.asarray(p) for p in parts])
            return np.zeros((0, width) if width else (0,))

        return cls(
            level=level,
            atomic_numbers=pack(atomic_numbers, None),
            positions_angstrom=pack(positions_angstrom, 3),
            energies_ev=np.asarray(energies_ev, dtype=np.float64),
            n_atoms=n_atoms,
            forces_ev_per_angstrom=None if forces_ev_per_angstrom is None else pack(forces_ev_per_angstrom, 3),
            cells_angstrom=cells_angstrom,
            pbc=pbc,
            source=source,
            n_skipped=n_skipped,
        )

    @classmethod
    def from_padded(
        cls,
        level: str,
        atomic_numbers: np.ndarray,
        positions_angstrom: np.ndarray,
        energies_ev: np.ndarray,
        forces_ev_per_angstrom: np.ndarray | None = None,
        source: str = "",
    ) -> LevelDataset:
        """From padded arrays: atomic numbers (n, max_atoms) or (max_atoms,) with 0 = no atom,
        positions and forces (n, max_atoms, 3), energies (n,) or (n, 1)."""
        positions_angstrom = np.asarray(positions_angstrom, dtype=np.float64)
        n_structures = positions_angstrom.shape[0]
        numbers = np.asarray(atomic_numbers)
        if numbers.ndim == 1:
            numbers = np.broadcast_to(numbers, (n_structures, numbers.shape[0]))
        if numbers.shape != positions_angstrom.shape[:2] or positions_angstrom.shape[2:] != (3,):
            raise InputError(
                f"{source}: atomic numbers of shape {np.shape(atomic_numbers)} do not match "
                f"positions of shape {positions_angstrom.shape}"
            )
        real = numbers > 0
        forces = None
        if forces_ev_per_angstrom is not None:
            forces = np.asarray(forces_ev_per_angstrom, dtype=np.float64)
            if forces.shape != positions_angstrom.shape:
                raise InputError(f"{source}: forces of shape {forces.shape} do not match positions {positions_angstrom.shape}")
            forces = forces[real]
        return cls(
            level=level,
            atomic_numbers=numbers[real],
            positions_angstrom=positions_angstrom[real],
            energies_ev=np.asarray(energies_ev, dtype=np.float64).reshape(-1),
            n_atoms=real.sum(axis=1),
            forces_ev_per_angstrom=forces,
            source=source,
        )

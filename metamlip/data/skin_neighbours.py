"""The batch of one structure that moves (molecular dynamics), with a skin-buffered neighbour list.

Pairs are found with vesin within cutoff + skin and kept while no atom has moved more than half
the skin since they were found: a pair now closer than the cutoff was then closer than
cutoff + skin, so the kept list still holds every pair that counts. Pairs beyond the cutoff give
exactly zero (the model's cosine cutoff is multiplied by r <= cutoff, which zeroes value and
gradient), so results equal those of a fresh list; only the distances are recomputed each call.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from metamlip.data.batching import Batch, assemble_batch, species_indices
from metamlip.data.neighbours import structure_pairs


class SkinNeighbourBatch:
    """Batches of one structure at changing positions; pairs are rebuilt only when needed.

    A rebuild happens when an atom moved more than `skin_angstrom / 2` since the last build, or
    the atomic numbers, cell or periodicity changed. `n_builds` counts the builds.
    """

    def __init__(
        self,
        level: str,
        species: list[int],
        cutoff_angstrom: float,
        skin_angstrom: float,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if skin_angstrom < 0.0:
            raise ValueError(f"skin_angstrom must be >= 0, got {skin_angstrom}")
        self.level = level
        self.species = species
        self.cutoff_angstrom = float(cutoff_angstrom)
        self.skin_angstrom = float(skin_angstrom)
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_builds = 0
        self._built: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray] | None = None  # numbers, positions, cell, pbc
        self._template: Batch | None = None

    def batch(
        self, numbers: np.ndarray, positions_angstrom: np.ndarray, cell_angstrom: np.ndarray | None, pbc: np.ndarray
    ) -> Batch:
        """A one-structure batch on the device at `positions_angstrom` (n_atoms, 3); `cell_angstrom`
        (3, 3) rows are lattice vectors (ignored where `pbc` (3,) is all False)."""
        pbc = np.asarray(pbc, dtype=bool)
        cell = np.array(cell_angstrom, dtype=np.float64) if pbc.any() else None
        if self._needs_build(numbers, positions_angstrom, cell, pbc):
            self._build(np.array(numbers), np.array(positions_angstrom, dtype=np.float64), cell, pbc)
        positions = torch.as_tensor(positions_angstrom, dtype=self.dtype, device=self.device)
        return replace(self._template, positions_angstrom=positions)

    def _needs_build(self, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None, pbc: np.ndarray) -> bool:
        if self._built is None:
            return True
        built_numbers, built_positions, built_cell, built_pbc = self._built
        if not (np.array_equal(numbers, built_numbers) and np.array_equal(pbc, built_pbc)):
            return True
        if (cell is None) != (built_cell is None) or (cell is not None and not np.array_equal(cell, built_cell)):
            return True
        displacement = np.linalg.norm(np.asarray(positions) - built_positions, axis=1)
        return bool(displacement.max(initial=0.0) > 0.5 * self.skin_angstrom)

    def _build(self, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray | None, pbc: np.ndarray) -> None:
        first, second, image = structure_pairs(positions, self.cutoff_angstrom + self.skin_angstrom, cell, pbc)
        shift = image.astype(np.float64) @ cell if cell is not None else np.zeros((len(first), 3))
        self._template = assemble_batch(
            level=self.level,
            species_index=species_indices(numbers, self.species, "ASE atoms"),
            positions_angstrom=positions,
            n_atoms=np.array([len(numbers)], dtype=np.int64),
            pairs=(first, second, shift),
            n_pairs=np.array([len(first)], dtype=np.int64),
            energies_ev=np.zeros(1),
            forces_ev_per_angstrom=None,
            dtype=self.dtype,
        ).to(self.device)
        self._built = (numbers, positions, cell, pbc)
        self.n_builds += 1

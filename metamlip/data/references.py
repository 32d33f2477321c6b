"""Per-level linear energy reference: E ~ sum_Z n_Z e_Z, fitted by least squares."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from metamlip.data.level_dataset import LevelDataset

if TYPE_CHECKING:
    from metamlip.data.packed import PackedLevel

log = logging.getLogger(__name__)


@dataclass
class EnergyReference:
    """Per-element reference energies of one level of theory.

    Attributes:
        level: normalised level name.
        elements: atomic numbers, in the order of `energy_per_element_ev`.
        energy_per_element_ev: (n_elements,) e_Z in eV; 0 for elements the level never saw.
    """

    level: str
    elements: list[int]
    energy_per_element_ev: np.ndarray

    @classmethod
    def fit(cls, dataset: LevelDataset | PackedLevel, elements: list[int]) -> EnergyReference:
        """Least-squares e_Z (eV) on element counts; a level with a single composition
        gets the mean energy per atom for every element it contains. A packed level (or view)
        is counted from its atomic-number file, chunk by chunk."""
        return cls.from_counts(dataset.level, elements, dataset.composition_matrix(elements), dataset.energies_ev)

    @classmethod
    def from_counts(cls, level: str, elements: list[int], counts: np.ndarray, energies: np.ndarray) -> EnergyReference:
        """The fit of `fit` on an (n_structures, n_elements) count matrix and (n_structures,) energies in eV.
        Several compositions that do not determine every element's e_Z (rank below the elements
        present) get the minimum-norm fit and a logged warning naming the level."""
        if len(np.unique(counts, axis=0)) <= 1:
            per_atom = float(np.mean(energies / counts.sum(axis=1))) if len(energies) else 0.0
            energy_per_element = np.where(counts[:1].sum(axis=0) > 0, per_atom, 0.0) if len(counts) else np.zeros(len(elements))
        else:
            energy_per_element, _, rank, _ = np.linalg.lstsq(counts, energies, rcond=None)
            present = counts.sum(axis=0) > 0
            if rank < present.sum():
                log.warning(
                    "level %r: the element counts of its %d structures have rank %d for %d elements, so its "
                    "per-element reference energies are not determined (minimum-norm fit): energies of other "
                    "formulas at this level will be off by an arbitrary amount",
                    level, len(energies), rank, int(present.sum()),
                )
            energy_per_element = np.where(present, energy_per_element, 0.0)
        return cls(level, list(elements), np.asarray(energy_per_element, dtype=np.float64))

    def energies_ev(self, counts: np.ndarray) -> np.ndarray:
        """(n_structures,) reference energies for an (n_structures, n_elements) count matrix."""
        return np.asarray(counts, dtype=np.float64) @ self.energy_per_element_ev

    def to_dict(self) -> dict:
        return {
            "level": self.level,
            "elements": [int(z) for z in self.elements],
            "energy_per_element_ev": [float(e) for e in self.energy_per_element_ev],
        }

    @classmethod
    def from_dict(cls, state: dict) -> EnergyReference:
        return cls(state["level"], list(state["elements"]), np.asarray(state["energy_per_element_ev"], dtype=np.float64))

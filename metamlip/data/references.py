"""Per-level linear energy reference: E ~ sum_Z n_Z e_Z, fitted by least squares, either on the
level's own energies or, for a level of a few formulas, anchored to a level that labels the same
geometries (`EnergyReference.fit_anchored`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from metamlip.data.batching import _ranges
from metamlip.data.level_dataset import LevelDataset
from metamlip.errors import InputError

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
    def from_counts(
        cls, level: str, elements: list[int], counts: np.ndarray, energies: np.ndarray, warn_undetermined: bool = True
    ) -> EnergyReference:
        """The fit of `fit` on an (n_structures, n_elements) count matrix and (n_structures,) energies in eV.
        Several compositions that do not determine every element's e_Z (rank below the elements
        present) get the minimum-norm fit and, with `warn_undetermined`, a logged warning naming the level."""
        if len(np.unique(counts, axis=0)) <= 1:
            per_atom = float(np.mean(energies / counts.sum(axis=1))) if len(energies) else 0.0
            energy_per_element = np.where(counts[:1].sum(axis=0) > 0, per_atom, 0.0) if len(counts) else np.zeros(len(elements))
        else:
            energy_per_element, _, rank, _ = np.linalg.lstsq(counts, energies, rcond=None)
            present = counts.sum(axis=0) > 0
            if warn_undetermined and rank < present.sum():
                log.warning(
                    "level %r: the element counts of its %d structures have rank %d for %d elements, so its "
                    "per-element reference energies are not determined (minimum-norm fit): energies of other "
                    "formulas at this level will be off by an arbitrary amount",
                    level, len(energies), rank, int(present.sum()),
                )
            energy_per_element = np.where(present, energy_per_element, 0.0)
        return cls(level, list(elements), np.asarray(energy_per_element, dtype=np.float64))

    @classmethod
    def fit_anchored(
        cls,
        dataset: LevelDataset | PackedLevel,
        elements: list[int],
        anchor: EnergyReference,
        anchor_dataset: LevelDataset | PackedLevel,
    ) -> EnergyReference:
        """e_Z of `dataset`'s level as its anchor level's e_Z plus a correction fitted (as `from_counts`)
        on the energy differences of the structures both label (`geometry_keys`).

        A level of a handful of formulas fitted on its own interpolates them and extrapolates to
        other formulas by whole atomization energies (tens of eV); the difference between two levels
        on one geometry varies far less, so the anchored reference extrapolates about as well as the
        anchor's. `anchor` is the anchor level's reference, fitted on `anchor_dataset`'s level."""
        anchor_energy_ev = dict(zip(geometry_keys(anchor_dataset), anchor_dataset.energies_ev))
        keys = geometry_keys(dataset)
        shared = [index for index, key in enumerate(keys) if key in anchor_energy_ev]
        if not shared:
            raise InputError(
                f"level {dataset.level!r}: none of its {len(keys)} training structures has the geometry of a "
                f"structure of its reference anchor {anchor.level!r}, so the anchored reference cannot be fitted"
            )
        counts = dataset.composition_matrix(elements)
        difference_ev = dataset.energies_ev[shared] - np.array([anchor_energy_ev[keys[index]] for index in shared])
        correction = cls.from_counts(dataset.level, elements, counts[shared], difference_ev, warn_undetermined=False)
        log.info(
            "level %r: reference anchored to %r on %d shared structures of %d formulas (a correction the formulas "
            "do not determine is taken as small as it can be)",
            dataset.level, anchor.level, len(shared), len(np.unique(counts[shared], axis=0)),
        )
        present = counts.sum(axis=0) > 0
        energy_per_element = np.where(present, anchor.energy_per_element_ev + correction.energy_per_element_ev, 0.0)
        return cls(dataset.level, list(elements), energy_per_element)

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


def geometry_keys(dataset: LevelDataset | PackedLevel) -> list[bytes]:
    """One key per structure: its atomic numbers and its positions rounded to 1e-4 Angstrom, so the
    same geometry labelled at two levels (two files of one source) has one key."""
    if isinstance(dataset, LevelDataset):
        numbers, positions = dataset.atomic_numbers, dataset.positions_angstrom
    else:
        atom_index = _ranges(dataset.atom_starts(np.arange(len(dataset))), dataset.n_atoms)
        numbers, positions = dataset.atoms("atomic_numbers", atom_index), dataset.atoms("positions_angstrom", atom_index)
    bounds = np.cumsum(dataset.n_atoms)[:-1]
    rounded = np.round(np.asarray(positions, dtype=np.float64), 4) + 0.0  # + 0.0: -0.0 and 0.0 give one key
    return [
        numbers_of.astype(np.int64).tobytes() + positions_of.tobytes()
        for numbers_of, positions_of in zip(np.split(np.asarray(numbers), bounds), np.split(rounded, bounds))
    ]

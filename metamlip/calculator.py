"""ASE calculator for a metamlip potential: energy in eV, forces in eV/Angstrom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from metamlip.data.batching import StructureBatcher
from metamlip.data.level_dataset import LevelDataset
from metamlip.model.potential import Potential
from metamlip.training.checkpoint import load_potential


class MetamlipCalculator(Calculator):
    """Energies and forces of a trained potential at one of its levels of theory.

    A model that knows several levels (multi-head or joint training) predicts the
    level named by `level`; a one-level model needs no name.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, model: Potential, level: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.model = model.eval()
        self.level = model.resolve_level(level)
        self.dtype = next(model.parameters()).dtype

    @classmethod
    def from_checkpoint(cls, path: str | Path, level: str | None = None, **kwargs) -> MetamlipCalculator:
        """Calculator for the potential stored at `path` (a model.pt written by metamlip)."""
        return cls(load_potential(path), level=level, **kwargs)

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        structure = LevelDataset.from_structures(
            level=self.level,
            atomic_numbers=[self.atoms.numbers],
            positions_angstrom=[self.atoms.positions],
            energies_ev=np.zeros(1),
            cells_angstrom=np.asarray(self.atoms.cell[:])[None] if self.atoms.pbc.any() else None,
            pbc=np.asarray(self.atoms.pbc)[None] if self.atoms.pbc.any() else None,
            source="ASE atoms",
        )
        batcher = StructureBatcher(structure, self.model.species, self.model.config.cutoff_angstrom, self.dtype)
        with torch.enable_grad():
            prediction = self.model(batcher.batch(np.array([0])), level=self.level, forces=True)
        energy = float(prediction.energy_ev[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": prediction.forces_ev_per_angstrom.detach().double().cpu().numpy().copy(),
        }

"""ASE calculator for a metamlip potential: energy and per-atom energies in eV, forces in
eV/Angstrom, stress in eV/Angstrom^3 (cells periodic in all three directions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from metamlip import allocator
from metamlip.data.skin_neighbours import SkinNeighbourBatch
from metamlip.errors import InputError
from metamlip.model.potential import Potential
from metamlip.training.checkpoint import load_potential

# Half the skin (0.25 Angstrom) is ~25 steps of 0.5 fs for a hydrogen at 300 K (~0.02 Angstrom/fs);
# at a 6.5 Angstrom cutoff the list holds (7.0 / 6.5)^3 = 1.25x the pairs within the cutoff.
DEFAULT_SKIN_ANGSTROM = 0.5


class MetamlipCalculator(Calculator):
    """Energies, forces, per-atom energies and stress of a trained potential at one of its levels.

    A model that knows several levels (multi-head or joint training) predicts the level named by
    `level`; a one-level model needs no name. `dtype` ("float32", "float64" or a torch dtype) and
    `device` cast the model in place; results are float64 numpy arrays either way.

    Neighbour pairs are found within the cutoff + `skin_angstrom` and kept until an atom moves more
    than half the skin (or cell, periodicity or atoms change); pairs beyond the cutoff contribute
    exactly zero, so results equal those of a fresh list. `skin_angstrom=0` rebuilds at every move.
    Stress, (1/V) dE/d(strain) in ASE's Voigt order, is computed for cells periodic in all three
    directions; asking it of any other structure raises PropertyNotImplementedError. `compile`
    runs a HIP-NN model's kernels through `torch.compile` (`Potential.use_compile`; the first call
    compiles, ~30 s); `native` runs them as compiled C++ (`Potential.use_native`: built once,
    ~30 s, then cached; needs a C++ compiler). `keep_freed_memory` (default True) keeps freed memory in the process
    (`metamlip.allocator.keep_freed_memory`, for the whole process): without it, structures of
    hundreds of atoms page-fault fresh memory on every call (BENCHMARKS.md).
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model: Potential,
        level: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        skin_angstrom: float = DEFAULT_SKIN_ANGSTROM,
        compile: bool = False,
        native: bool = False,
        keep_freed_memory: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if keep_freed_memory:
            allocator.keep_freed_memory()
        self.model = model.to(device=device, dtype=torch_dtype(dtype)).eval()
        if compile:
            self.model.use_compile()
        if native:
            self.model.use_native()
        self.level = model.resolve_level(level)
        parameter = next(model.parameters())
        self.dtype = parameter.dtype
        self.neighbours = SkinNeighbourBatch(
            self.level, model.species, model.config.cutoff_angstrom, skin_angstrom, parameter.dtype, parameter.device
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        level: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        **kwargs,
    ) -> MetamlipCalculator:
        """Calculator for the potential stored at `path` (a model.pt written by metamlip)."""
        return cls(load_potential(path), level=level, dtype=dtype, device=device, **kwargs)

    def calculate(self, atoms: Atoms | None = None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.all())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        batch = self.neighbours.batch(self.atoms.numbers, self.atoms.positions, self.atoms.cell[:], self.atoms.pbc)
        with torch.enable_grad():
            prediction = self.model(batch, level=self.level, forces=True, stress=periodic)
        energy = float(prediction.energy_ev[0])
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": as_numpy(prediction.atom_energy_ev),
            "forces": as_numpy(prediction.forces_ev_per_angstrom),
        }
        if periodic:
            strain_derivative = as_numpy(prediction.strain_derivative_ev[0])
            self.results["stress"] = full_3x3_to_voigt_6_stress(strain_derivative / self.atoms.get_volume())


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch.float32 or torch.float64 from a name or a torch dtype; None stays None."""
    if dtype is None:
        return None
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.float64):
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
    return resolved


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of a model output."""
    return tensor.detach().double().cpu().numpy().copy()

"""metamlip's HIP-NN potential against the contracts of metamlip.testing, on real MD17 ethanol
geometries and a small periodic box; and the checks themselves catch broken models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from metamlip.data.batching import Batch
from metamlip.data.level_dataset import LevelDataset
from metamlip.data.references import EnergyReference
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.potential import Potential, Prediction, build_potential
from metamlip.readers import read_level
from metamlip.testing import (
    check_all_contracts,
    check_batch_independence,
    check_forces_finite_difference,
    check_periodic_images,
    check_permutation,
    check_rotation_translation,
)

DATA = Path(__file__).parent / "data"
LEVEL = "pbe+vdw-ts"
SMALL_HIPNN = HipnnConfig(n_features=16, n_sensitivities=8, n_interaction_layers=2, n_atom_layers=1, cutoff_angstrom=5.0)


@pytest.fixture(scope="module")
def ethanol() -> LevelDataset:
    return read_level(DATA / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level=LEVEL)


@pytest.fixture(scope="module")
def model(ethanol: LevelDataset) -> Potential:
    """Random-weight float64 HIP-NN with the MD17 level's fitted reference."""
    potential = build_potential([1, 6, 8], SMALL_HIPNN, seed=0, dtype=torch.float64)
    potential.add_level(EnergyReference.fit(ethanol.subset(np.arange(100)), potential.species))
    return potential


def water_box() -> Atoms:
    """Two waters, a methanol and a CO in a triclinic periodic cell (~6 Angstrom edges, cutoff 5)."""
    cell = np.array([[6.0, 0.0, 0.0], [0.9, 5.6, 0.0], [0.5, 0.7, 5.8]])
    box = Atoms(cell=cell, pbc=True)
    placements = (("H2O", (0.25, 0.25, 0.25)), ("CH3OH", (0.75, 0.75, 0.3)), ("H2O", (0.25, 0.75, 0.75)), ("CO", (0.7, 0.2, 0.8)))
    for name, fractional in placements:
        part = molecule(name)
        part.positions += np.asarray(fractional) @ cell - part.get_center_of_mass()
        box += part
    return box


def geometries(ethanol: LevelDataset) -> list[Atoms]:
    """Three MD17 ethanol frames far apart in the trajectory."""
    return [ethanol.to_atoms(index) for index in (0, 777, 1999)]


def test_rotation_and_translation(model: Potential, ethanol: LevelDataset) -> None:
    for seed, atoms in enumerate(geometries(ethanol)):
        check_rotation_translation(model, atoms, LEVEL, seed=seed)
    check_rotation_translation(model, water_box(), LEVEL)


def test_permutation(model: Potential, ethanol: LevelDataset) -> None:
    for seed, atoms in enumerate(geometries(ethanol)):
        check_permutation(model, atoms, LEVEL, seed=seed)
    check_permutation(model, water_box(), LEVEL)


def test_forces_are_minus_energy_gradient(model: Potential, ethanol: LevelDataset) -> None:
    check_forces_finite_difference(model, geometries(ethanol)[1], LEVEL)
    check_forces_finite_difference(model, water_box(), LEVEL)


def test_finite_difference_check_casts_float32_models_to_float64(model: Potential, ethanol: LevelDataset) -> None:
    single = build_potential([1, 6, 8], SMALL_HIPNN, seed=0, dtype=torch.float32)
    single.add_level(model.references[LEVEL])
    check_forces_finite_difference(single, geometries(ethanol)[0], atom_indices=[0, 2, 5])
    assert next(single.parameters()).dtype == torch.float32


def test_batch_independence(model: Potential, ethanol: LevelDataset) -> None:
    check_batch_independence(model, geometries(ethanol) + [molecule("H2O"), water_box()], LEVEL)


def test_periodic_images(model: Potential) -> None:
    check_periodic_images(model, water_box(), LEVEL)


def test_all_contracts_in_one_call(model: Potential, ethanol: LevelDataset) -> None:
    check_all_contracts(model, [geometries(ethanol)[2], molecule("H2O")], periodic=water_box(), level=LEVEL, seed=5)


def test_periodic_check_refuses_a_box_without_boundary_pairs(model: Potential) -> None:
    lonely = molecule("H2O", cell=np.eye(3) * 20.0, pbc=True)
    with pytest.raises(AssertionError, match="crosses the cell boundary"):
        check_periodic_images(model, lonely, LEVEL)


class _Mutant(Potential):
    """A potential broken on purpose: `breakage` edits the prediction of the real model."""

    breakage: str = ""

    def forward(self, batch: Batch, level: str | None = None, forces: bool = True, create_graph: bool = False) -> Prediction:
        if self.breakage == "ignores_cell_shifts":
            batch = Batch(**{**batch.__dict__, "neighbour_shift_angstrom": torch.zeros_like(batch.neighbour_shift_angstrom)})
        prediction = super().forward(batch, level, forces, create_graph)
        per_structure = torch.zeros_like(prediction.residual_energy_ev)
        if self.breakage == "absolute_position":
            per_structure = per_structure.index_add(0, batch.structure_index, 1e-3 * batch.positions_angstrom[:, 0])
        elif self.breakage == "atom_order":
            order = torch.arange(len(batch.species_index), dtype=per_structure.dtype)
            per_structure = per_structure.index_add(0, batch.structure_index, 1e-3 * order * batch.species_index)
        elif self.breakage == "batch_size":
            per_structure = per_structure + 1e-3 * batch.n_structures
        elif self.breakage == "scaled_forces":
            prediction.forces_ev_per_angstrom = 1.001 * prediction.forces_ev_per_angstrom
        prediction.residual_energy_ev = prediction.residual_energy_ev + per_structure
        return prediction


@pytest.mark.parametrize(
    ("breakage", "check", "message"),
    [
        ("absolute_position", check_rotation_translation, "rotation/translation"),
        ("atom_order", check_permutation, "permutation"),
        ("scaled_forces", check_forces_finite_difference, "finite-difference"),
        ("batch_size", lambda m, a, level: check_batch_independence(m, [a, molecule("H2O")], level), "batched"),
        ("ignores_cell_shifts", lambda m, a, level: check_periodic_images(m, water_box(), level), "wrapped|lattice vector"),
    ],
)
def test_checks_catch_broken_models(model: Potential, ethanol: LevelDataset, breakage: str, check, message: str) -> None:
    mutant = _Mutant.from_description(model.describe()).double()
    mutant.load_state_dict(model.state_dict())
    mutant.breakage = breakage
    with pytest.raises(AssertionError, match=message):
        check(mutant, ethanol.to_atoms(0), LEVEL)

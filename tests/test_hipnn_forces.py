"""HIP-NN's hand-written forces and their weight gradients (metamlip.model.hipnn_forces and
hipnn_force_training) equal autograd of the network's definition, `HipnnBackbone.forward`, in float64:
energies, forces, dE/d(strain), and the gradient of a loss on energies and forces with respect to every
weight (autograd's double backward), for molecules with padded neighbour slots and for a periodic box
with level embeddings, adjust layers and three interaction layers."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from metamlip.data.batching import Batch, StructureBatcher
from metamlip.data.references import EnergyReference
from metamlip.data.skin_neighbours import SkinNeighbourBatch
from metamlip.errors import InputError
from metamlip.model import hipnn_forces
from metamlip.model.energy_head import structure_sums
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.mace_config import MaceConfig
from metamlip.model.potential import Potential, build_potential
from metamlip.readers import read_level

DATA = Path(__file__).parent / "data"
LEVEL = "pbe+vdw-ts"
RELATIVE_TOLERANCE = 1e-10
# Every ethanol pair lies within 6.5 Angstrom; at 2.2 Angstrom padded slots and the cutoff matter.
MOLECULE_CONFIGS = {
    "default_cutoff": HipnnConfig(n_features=16, n_sensitivities=8, n_interaction_layers=2, n_atom_layers=2),
    "short_cutoff": HipnnConfig(
        n_features=12, n_sensitivities=6, n_interaction_layers=2, n_atom_layers=1,
        soft_min_angstrom=0.85, soft_max_angstrom=2.0, cutoff_angstrom=2.2,
    ),
}
NEEDS_COMPILER = pytest.mark.skipif(  # the native kernels (metamlip.model.hipnn_native) are built on first use
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="the native kernels are built with a C++ compiler (none on PATH)"
)
BOX_CONFIG = HipnnConfig(n_features=12, n_sensitivities=6, n_interaction_layers=3, n_atom_layers=2, cutoff_angstrom=4.0, n_level_features=3)


def perturbed(model: Potential, seed: int) -> Potential:
    """`model` with every weight moved off its initial value (the one-hot read-out starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.mul_(1.0 + 0.05 * noise) if name.endswith(("mu", "sigma")) else parameter.add_(0.1 * noise)
    return model


def autograd_prediction(model: Potential, batch: Batch, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual energies, forces and dE/d(strain) by autograd through `HipnnBackbone.forward`."""
    level = model.resolve_level(batch.level)
    positions = batch.positions_angstrom.detach().requires_grad_(True)
    strain = positions.new_zeros((batch.n_structures, 3, 3), requires_grad=True)
    vector = model.neighbour_vectors_angstrom(batch, positions, strain)
    features = model.backbone(batch.species_index, batch.neighbour_index, batch.neighbour_mask, vector, model.level_features(level))
    energies = structure_sums(model.heads[model.level_heads[level]].atom_energies(features), batch.structure_index, batch.n_structures)
    position_gradient, strain_gradient = torch.autograd.grad(energies.sum(), [positions, strain], create_graph=create_graph)
    return energies, -position_gradient, strain_gradient


def loss(energies: torch.Tensor, forces: torch.Tensor, batch: Batch) -> torch.Tensor:
    return torch.mean(torch.square(energies / batch.n_atoms)) + 3.0 * torch.mean(torch.square(forces - batch.forces_ev_per_angstrom))


def weight_gradients(model: Potential, energies: torch.Tensor, forces: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss(energies, forces, batch).backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float = RELATIVE_TOLERANCE) -> None:
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= tolerance * max(scale, 1e-300), f"{what}: max error {error:.3e} for scale {scale:.3e}"


def assert_matches_autograd(model: Potential, batch: Batch) -> None:
    expected_energies, expected_forces, expected_strain = autograd_prediction(model, batch, create_graph=False)
    prediction = model(batch, forces=True, stress=True)
    assert_relative_close(prediction.residual_energy_ev, expected_energies.detach(), "energies")
    assert_relative_close(prediction.forces_ev_per_angstrom, expected_forces, "forces")
    assert_relative_close(prediction.strain_derivative_ev, expected_strain, "dE/d(strain)")

    expected = weight_gradients(model, *autograd_prediction(model, batch, create_graph=True)[:2], batch)
    prediction = model(batch, forces=True, create_graph=True)
    actual = weight_gradients(model, prediction.residual_energy_ev, prediction.forces_ev_per_angstrom, batch)
    unused = {f"level_embeddings.{key}" for level, key in model.level_embedding_keys.items() if level != batch.level}
    assert set(actual) == set(expected) == {name for name, _ in model.named_parameters()} - unused
    for name in expected:
        assert_relative_close(actual[name], expected[name], f"gradient of {name}")


def ethanol_model(config_name: str = "default_cutoff", dtype: torch.dtype = torch.float64) -> Potential:
    """A perturbed one-level model of shape MOLECULE_CONFIGS[config_name]."""
    model = perturbed(build_potential([1, 6, 8], MOLECULE_CONFIGS[config_name], seed=5, dtype=dtype), seed=6)
    model.add_level(EnergyReference(LEVEL, [1, 6, 8], np.zeros(3)))
    return model


def ethanol_conformers(cutoff_angstrom: float, dtype: torch.dtype = torch.float64, count: int = 12) -> Batch:
    """One batch of `count` MD17 ethanol conformers, every 50th of the file (0: an empty batch)."""
    ethanol = read_level(DATA / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level=LEVEL).subset(np.arange(0, 600, 50))
    return StructureBatcher(ethanol, [1, 6, 8], cutoff_angstrom, dtype=dtype).batch(np.arange(count))


@pytest.fixture(scope="module")
def ethanol_batch() -> Batch:
    return ethanol_conformers(6.5)


def periodic_box() -> Atoms:
    """Two waters and a methanol in a triclinic cell of ~6 Angstrom edges (cutoff 4: images count)."""
    cell = np.array([[6.0, 0.0, 0.0], [0.9, 5.6, 0.0], [0.5, 0.7, 5.8]])
    box = Atoms(cell=cell, pbc=True)
    for name, fractional in (("H2O", (0.25, 0.25, 0.25)), ("CH3OH", (0.75, 0.75, 0.3)), ("H2O", (0.25, 0.75, 0.75))):
        part = molecule(name)
        part.positions += np.asarray(fractional) @ cell - part.get_center_of_mass()
        box += part
    return box


@pytest.mark.parametrize("config_name", sorted(MOLECULE_CONFIGS))
def test_molecules_match_autograd(config_name: str, ethanol_batch: Batch) -> None:
    config = MOLECULE_CONFIGS[config_name]
    model = ethanol_model(config_name)
    batch = ethanol_batch
    if config.cutoff_angstrom < 6.5:
        positions = batch.positions_angstrom.numpy()
        batch = ethanol_conformers(config.cutoff_angstrom)
        assert np.allclose(batch.positions_angstrom.numpy(), positions) and not bool(batch.neighbour_mask.all())
    assert_matches_autograd(model, batch)


def box_model_and_batch(dtype: torch.dtype = torch.float64) -> tuple[Potential, Batch]:
    """A perturbed two-level model with level embeddings (BOX_CONFIG) and `periodic_box` at its second
    level, with random force labels."""
    model = build_potential([1, 6, 8], BOX_CONFIG, seed=1, dtype=dtype)
    for level in ("first", "second"):
        model.add_level(EnergyReference(level, [1, 6, 8], np.zeros(3)))
    model = perturbed(model, seed=2)
    box = periodic_box()
    batch = SkinNeighbourBatch("second", model.species, BOX_CONFIG.cutoff_angstrom, 0.3, dtype).batch(
        box.numbers, box.positions, box.cell[:], box.pbc
    )
    forces = torch.randn(len(box), 3, dtype=dtype, generator=torch.Generator().manual_seed(3))
    return model, replace(batch, forces_ev_per_angstrom=forces)


def test_periodic_box_with_level_embeddings_matches_autograd() -> None:
    assert_matches_autograd(*box_model_and_batch())


def test_chunked_slot_products_equal_whole_ones(ethanol_batch: Batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many neighbours: the per-slot products are made and scattered in chunks of atoms."""
    model = ethanol_model()
    whole = model(ethanol_batch, forces=True, create_graph=True)
    whole_gradients = weight_gradients(model, whole.residual_energy_ev, whole.forces_ev_per_angstrom, ethanol_batch)
    monkeypatch.setattr(hipnn_forces, "SLOT_CHUNK_BYTES", 100)  # chunks of one atom
    chunked = model(ethanol_batch, forces=True, create_graph=True)
    chunked_gradients = weight_gradients(model, chunked.residual_energy_ev, chunked.forces_ev_per_angstrom, ethanol_batch)
    assert_relative_close(chunked.forces_ev_per_angstrom.detach(), whole.forces_ev_per_angstrom.detach(), "forces")
    for name, gradient in whole_gradients.items():
        assert_relative_close(chunked_gradients[name], gradient, f"gradient of {name}")


@pytest.mark.parametrize("fused", [False, True])
def test_predictions_follow_in_place_weight_updates(ethanol_batch: Batch, fused: bool) -> None:
    """After an optimiser step (fused Adam changes weights without bumping version counters) the
    model predicts with its new weights, as a fresh copy of it does."""
    model = ethanol_model()
    before = model(ethanol_batch).forces_ev_per_angstrom
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=fused)
    prediction = model(ethanol_batch, create_graph=True)
    loss(prediction.residual_energy_ev, prediction.forces_ev_per_angstrom, ethanol_batch).backward()
    optimizer.step()
    after = model(ethanol_batch).forces_ev_per_angstrom
    assert not torch.equal(after, before)
    assert torch.equal(after, copy.deepcopy(model)(ethanol_batch).forces_ev_per_angstrom)


def test_empty_batch(ethanol_batch: Batch) -> None:
    """A data-parallel shard may hold no structures: empty predictions, zero weight gradients."""
    empty = ethanol_conformers(6.5, count=0)
    model = build_potential([1, 6, 8], MOLECULE_CONFIGS["default_cutoff"], seed=5, dtype=torch.float64)
    model.add_level(EnergyReference(LEVEL, [1, 6, 8], np.zeros(3)))
    prediction = model(empty, create_graph=True)
    assert prediction.residual_energy_ev.shape == (0,) and prediction.forces_ev_per_angstrom.shape == (0, 3)
    (prediction.residual_energy_ev.sum() + prediction.forces_ev_per_angstrom.sum()).backward()
    assert all(float(parameter.grad.abs().max()) == 0.0 for parameter in model.parameters() if parameter.grad is not None)
    assert model(empty, forces=False).residual_energy_ev.shape == (0,)  # the network's definition (energy-only levels)


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=NEEDS_COMPILER)])
def test_forces_have_no_distance_gradient(ethanol_batch: Batch, native: bool) -> None:
    model = build_potential([1, 6, 8], MOLECULE_CONFIGS["default_cutoff"], seed=5, dtype=torch.float64)
    model.add_level(EnergyReference(LEVEL, [1, 6, 8], np.zeros(3)))
    vector = model.neighbour_vectors_angstrom(ethanol_batch, ethanol_batch.positions_angstrom)
    distance = torch.linalg.vector_norm(vector, dim=-1).requires_grad_(True)
    features = model.backbone.input_features(ethanol_batch.species_index, None, distance.dtype)
    _, distance_gradient = hipnn_forces.energies_and_distance_gradient(
        model.backbone, model.heads["shared"], features, ethanol_batch.neighbour_index, distance, native=native
    )
    with pytest.raises(RuntimeError, match="no gradient with respect to distances"):
        distance_gradient.sum().backward()


@pytest.mark.skipif(importlib.util.find_spec("mace") is None, reason='needs the mace extra: pip install -e ".[mace]"')
def test_compile_is_for_hipnn_only() -> None:
    model = build_potential([1, 8], MaceConfig(), seed=0)
    with pytest.raises(InputError, match="HIP-NN backbone only"):
        model.use_compile()
    model.use_compile(False)


@pytest.mark.slow
def test_compiled_kernels_equal_eager_ones(ethanol_batch: Batch) -> None:
    """torch.compile of the same kernels (about a minute to compile on a loaded 2-core machine)."""
    eager = ethanol_model()
    compiled = copy.deepcopy(eager).use_compile()
    expected, actual = eager(ethanol_batch, create_graph=True), compiled(ethanol_batch, create_graph=True)
    assert_relative_close(actual.forces_ev_per_angstrom.detach(), expected.forces_ev_per_angstrom.detach(), "forces")
    expected_gradients = weight_gradients(eager, expected.residual_energy_ev, expected.forces_ev_per_angstrom, ethanol_batch)
    actual_gradients = weight_gradients(compiled, actual.residual_energy_ev, actual.forces_ev_per_angstrom, ethanol_batch)
    for name, gradient in expected_gradients.items():
        assert_relative_close(actual_gradients[name], gradient, f"gradient of {name}")

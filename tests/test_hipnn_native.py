"""HIP-NN through the compiled C++ extension (metamlip.model.hipnn_native, opt-in with
`Potential.use_native`) equals the Python kernels: energies, forces and stress, and the weight
gradients of a loss on energies and forces, in float64 to 1e-12 relative, for molecules with padded
slots, a periodic box with level embeddings and three interaction layers (from positions, and from
distances when stress is asked), chunked slot products, feature widths across the vector blocks of the
slot products, input rows narrower than one vector (float32), an empty batch and along ASE molecular
dynamics; float32 to float32's rounding. The slot products equal torch.bmm, written and accumulated,
and softplus and sigmoid torch's. A failed build is an InputError.

The extension is built once per machine (~30 s, then cached); these tests need a C++ compiler."""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.utils.cpp_extension
from ase import units
from ase.md.verlet import VelocityVerlet

from metamlip.calculator import MetamlipCalculator
from metamlip.cli.main import main
from metamlip.data.batching import Batch, StructureBatcher
from metamlip.data.references import EnergyReference
from metamlip.errors import InputError
from metamlip.model import hipnn_forces, hipnn_native
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.hipnn_forces import HipnnWeights
from metamlip.model.mace_config import MaceConfig
from metamlip.model.potential import SHARED_HEAD, Potential, build_potential
from metamlip.readers import read_level
from metamlip.training.checkpoint import save_checkpoint
from metamlip.training.loop import MixedBatchEpochs, Task, TrainingSettings, fit
from test_hipnn_forces import (
    DATA, LEVEL, MOLECULE_CONFIGS, NEEDS_COMPILER, assert_relative_close, box_model_and_batch, ethanol_conformers, ethanol_model, loss,
    perturbed, weight_gradients,
)

pytestmark = NEEDS_COMPILER
TOLERANCE = 1e-12  # relative, float64: tighter than the 1e-10 against autograd (the same operations in the same order)


def assert_native_matches_python(model: Potential, batch: Batch, tolerance: float = TOLERANCE, stress: bool = False) -> None:
    """Inference with and without the native kernels: energies, per-atom energies, forces (and stress)."""
    python = model.use_native(False)(batch, forces=True, stress=stress)
    native = model.use_native(True)(batch, forces=True, stress=stress)
    assert_relative_close(native.residual_energy_ev, python.residual_energy_ev, "energies", tolerance)
    assert_relative_close(native.atom_residual_energy_ev, python.atom_residual_energy_ev, "atom energies", tolerance)
    assert_relative_close(native.forces_ev_per_angstrom, python.forces_ev_per_angstrom, "forces", tolerance)
    if stress:
        assert_relative_close(native.strain_derivative_ev, python.strain_derivative_ev, "dE/d(strain)", tolerance)


def assert_native_training_matches_python(model: Potential, batch: Batch, tolerance: float = TOLERANCE) -> None:
    """The weight gradients (level embeddings included) of a loss on energies and forces, both ways."""
    gradients = {}
    for native in (False, True):
        model.use_native(native)
        prediction = model(batch, forces=True, create_graph=True)
        gradients[native] = weight_gradients(model, prediction.residual_energy_ev, prediction.forces_ev_per_angstrom, batch)
    assert set(gradients[True]) == set(gradients[False])
    for name, expected in gradients[False].items():
        assert_relative_close(gradients[True][name], expected, f"gradient of {name}", tolerance)


@pytest.mark.parametrize("config_name", sorted(MOLECULE_CONFIGS))
def test_molecules_match_the_python_kernels(config_name: str) -> None:
    batch = ethanol_conformers(MOLECULE_CONFIGS[config_name].cutoff_angstrom)
    if config_name == "short_cutoff":
        assert not bool(batch.neighbour_mask.all())  # padded slots
    assert_native_matches_python(ethanol_model(config_name), batch)
    assert_native_training_matches_python(ethanol_model(config_name), batch)


def test_periodic_box_with_level_embeddings_matches_the_python_kernels() -> None:
    model, batch = box_model_and_batch()
    assert_native_matches_python(model, batch)  # from positions in the extension (periodic shifts)
    assert_native_matches_python(model, batch, stress=True)  # from distances, the displacements kept for the stress
    assert_native_training_matches_python(model, batch)


def test_narrow_input_rows_match_in_float32() -> None:
    """Input features of 6 float32 elements (3 species, 3 level features) are narrower than one vector:
    their environment, and the messages back to the trainable level features, take the narrow loops."""
    model, batch = box_model_and_batch(torch.float32)
    assert model.backbone.input_features(batch.species_index, model.level_features("second"), torch.float32).shape[1] == 6
    assert_native_matches_python(model, batch, tolerance=1e-5)
    assert_native_training_matches_python(model, batch, tolerance=1e-4)


def test_chunked_slot_products_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hipnn_forces, "SLOT_CHUNK_BYTES", 100)  # chunks of one atom, in both kernels
    assert_native_matches_python(ethanol_model(), ethanol_conformers(6.5))
    assert_native_training_matches_python(ethanol_model(), ethanol_conformers(6.5))


@pytest.mark.parametrize(("width", "dtype"), [(37, torch.float64), (70, torch.float32)])
def test_feature_widths_across_vector_blocks_match(width: int, dtype: torch.dtype) -> None:
    """The slot products keep up to 8 vectors of 32 bytes per block, then single elements: 37 float64
    features are 8 + 1 vectors and one element, 70 float32 features 8 vectors and six elements."""
    config = HipnnConfig(n_features=width, n_sensitivities=5, n_interaction_layers=2, n_atom_layers=1)
    model = perturbed(build_potential([1, 6, 8], config, seed=3, dtype=dtype), seed=4)
    model.add_level(EnergyReference(LEVEL, [1, 6, 8], np.zeros(3)))
    batch = ethanol_conformers(config.cutoff_angstrom, dtype, count=4)
    if dtype == torch.float64:
        assert_native_matches_python(model, batch)
        assert_native_training_matches_python(model, batch)
    else:
        assert_native_matches_python(model, batch, tolerance=1e-5)


def test_forces_from_positions_have_no_position_gradient() -> None:
    model = ethanol_model()
    batch = ethanol_conformers(6.5, count=2)
    positions = batch.positions_angstrom.clone().requires_grad_(True)
    features = model.backbone.input_features(batch.species_index, None, positions.dtype)
    _, forces = hipnn_native.energies_and_forces(
        HipnnWeights.of(model.backbone, model.heads[SHARED_HEAD]), features, positions, batch.neighbour_index, batch.neighbour_shift_angstrom,
        batch.neighbour_mask, model.padding_component_angstrom(),
    )
    with pytest.raises(RuntimeError, match="no gradient with respect to positions"):
        forces.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("slots", "sensitivities", "features"), [(8, 20, 64), (3, 5, 3), (8, 20, 7), (2, 3, 1), (26, 7, 70), (1, 4, 37)])
def test_slot_products_equal_batched_matrix_products(dtype: torch.dtype, slots: int, sensitivities: int, features: int) -> None:
    """The extension's per-atom products, written and accumulated, against torch.bmm: widths below one
    vector, of whole vectors, and beyond a block of eight with elements left over."""
    native = hipnn_native.native_module()
    generator = torch.Generator().manual_seed(1)
    by_slot, by_sensitivity, dots = (slots, features), (sensitivities, features), (slots, sensitivities)
    values, rows, environment, start_environment, start_messages, start_dots = (
        torch.randn(11, *shape, generator=generator, dtype=dtype) for shape in (dots, by_slot, by_sensitivity, by_sensitivity, by_slot, dots)
    )
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    cases = {
        "s^T x": (lambda out, add: native.slot_product_into(out, values, True, rows, add), torch.bmm(values.transpose(1, 2), rows), start_environment),
        "s e": (lambda out, add: native.slot_product_into(out, values, False, environment, add), torch.bmm(values, environment), start_messages),
        "x e^T": (lambda out, add: native.slot_dots_into(out, rows, environment, add), torch.bmm(rows, environment.transpose(1, 2)), start_dots),
    }
    for name, (product, expected, start) in cases.items():
        written = torch.full_like(expected, float("nan"))
        product(written, False)
        assert_relative_close(written, expected, name, tolerance)
        accumulated = start.clone()
        product(accumulated, True)
        assert_relative_close(accumulated, start + expected, f"{name}, accumulated", tolerance)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 4e-7), (torch.float64, 1e-15)])
def test_activation_equals_torch_softplus_and_sigmoid(dtype: torch.dtype, tolerance: float) -> None:
    """softplus and sigmoid from one exponential (float32: log1p by a series, hipnn_native.cpp) within
    a few units of the last place of their exact values at the same inputs, from h = -100 (softplus ~
    4e-44) to 100, the threshold of 20 included."""
    h = torch.cat([torch.linspace(-100, 100, 200_001, dtype=dtype), torch.tensor([0.0, 20.0, -87.5, -88.0, 1e-30, -1e-30], dtype=dtype)])
    softplus, sigmoid = hipnn_native.native_module().activation(h)
    exact = h.double()
    for name, actual, expected in (("softplus", softplus, torch.nn.functional.softplus(exact)), ("sigmoid", sigmoid, torch.sigmoid(exact))):
        normal = expected > torch.finfo(dtype).tiny  # below it the dtype holds fewer digits
        error = ((actual.double() - expected).abs() / expected)[normal]
        assert float(error.max()) <= tolerance, f"{name}: max relative error {float(error.max()):.2e}"


def test_float32_matches_to_its_rounding() -> None:
    assert_native_matches_python(ethanol_model(dtype=torch.float32), ethanol_conformers(6.5, torch.float32), tolerance=1e-5)


def test_empty_batch() -> None:
    empty = ethanol_conformers(6.5, count=0)
    model = ethanol_model().use_native()
    prediction = model(empty)
    assert prediction.residual_energy_ev.shape == (0,) and prediction.forces_ev_per_angstrom.shape == (0, 3)
    prediction = model(empty, create_graph=True)
    (prediction.residual_energy_ev.sum() + prediction.forces_ev_per_angstrom.sum()).backward()
    assert all(float(parameter.grad.abs().max()) == 0.0 for parameter in model.parameters() if parameter.grad is not None)


def test_not_a_number_positions_give_not_a_number_energies() -> None:
    """The floors on exponents (hipnn_native.cpp) must not turn bad input into finite numbers."""
    batch = ethanol_conformers(6.5)
    positions = batch.positions_angstrom.clone()
    positions[4, 1] = float("nan")
    prediction = ethanol_model().use_native()(replace(batch, positions_angstrom=positions))
    assert bool(torch.isnan(prediction.residual_energy_ev[0])) and bool(torch.isfinite(prediction.residual_energy_ev[1:]).all())


def test_calculator_along_molecular_dynamics() -> None:
    ethanol = read_level(DATA / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level=LEVEL)
    model = ethanol_model()
    atoms = ethanol.to_atoms(100)
    python = MetamlipCalculator(copy.deepcopy(model))
    atoms.calc = MetamlipCalculator(model, native=True)
    assert atoms.calc.model.native and not python.model.native
    deviation = []

    def compare() -> None:
        moved = atoms.copy()
        moved.calc = python
        deviation.append(np.abs(moved.get_forces() - atoms.get_forces()).max() / np.abs(moved.get_forces()).max())

    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dynamics.attach(compare, interval=1)
    dynamics.run(20)
    assert len(deviation) == 21 and max(deviation) < TOLERANCE


def test_a_failed_build_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'metamlip_hipnn_native': c++: command not found")

    monkeypatch.setattr(hipnn_native, "_BUILT", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    model = ethanol_model()
    with pytest.raises(InputError, match=r"hipnn_native\.cpp failed .*command not found"):
        model.use_native()
    assert not model.native


@pytest.mark.skipif(importlib.util.find_spec("mace") is None, reason='needs the mace extra: pip install -e ".[mace]"')
def test_native_is_for_hipnn_only() -> None:
    model = build_potential([1, 8], MaceConfig(), seed=0)
    with pytest.raises(InputError, match="HIP-NN backbone only"):
        model.use_native()


def test_training_with_native_kernels_follows_the_python_kernels(tmp_path) -> None:
    """`training.native`: the same epochs as the Python kernels (float64, same seed), to rounding."""
    ethanol = read_level(DATA / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level=LEVEL)
    train, validation = ethanol.subset(np.arange(0, 400, 10)), ethanol.subset(np.arange(5, 400, 20))
    histories = {}
    for native in (False, True):
        model = build_potential(ethanol.elements, MOLECULE_CONFIGS["short_cutoff"], seed=0, dtype=torch.float64)
        model.add_level(EnergyReference.fit(train, model.species))
        cutoff = MOLECULE_CONFIGS["short_cutoff"].cutoff_angstrom
        tasks = [Task(LEVEL, *(StructureBatcher(part, model.species, cutoff, torch.float64) for part in (train, validation)))]
        settings = TrainingSettings(batch_size=8, learning_rate=3e-3, max_epochs=4, progress=False, seed=0, native=native)
        result = fit(model, MixedBatchEpochs(tasks, settings), tasks, settings, tmp_path / f"native_{native}")
        assert result.model.native == native
        histories[native] = [epoch["train_loss"] for epoch in result.history]
    assert len(histories[True]) == 4 and histories[True][-1] < histories[True][0]
    np.testing.assert_allclose(histories[True], histories[False], rtol=1e-9, atol=0)


def test_evaluate_command_with_native_kernels(tmp_path, capsys) -> None:
    """`metamlip evaluate --native` prints the same metrics as without it (float64 model)."""
    model = ethanol_model()
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, model)
    tables = []
    for flags in ([], ["--native"]):
        assert main(["evaluate", str(checkpoint), str(DATA / "md17_ethanol_dft.npz"), "--energy-unit", "kcal/mol", "--data-level", LEVEL, *flags]) == 0
        tables.append(capsys.readouterr().out)
    assert "pbe+vdw-ts" in tables[0] and tables[1] == tables[0]


def test_a_retained_graph_gives_the_same_gradient_twice() -> None:
    model = ethanol_model().use_native()
    batch = ethanol_conformers(6.5)
    prediction = model(batch, create_graph=True)
    value = loss(prediction.residual_energy_ev, prediction.forces_ev_per_angstrom, batch)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    first = torch.autograd.grad(value, parameters, retain_graph=True)
    second = torch.autograd.grad(value, parameters)
    assert all(torch.equal(a, b) for a, b in zip(first, second))

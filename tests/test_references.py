"""Per-level energy references (metamlip.data.references) on real compositions: recovery of
known per-element energies, the single-composition fallback, separation of levels inside a
Potential, the to_dict/from_dict round trip, and references anchored to another level on shared
geometries (the ANI-1x sample's levels of the bundled organic-pretraining set)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from importlib.resources import as_file, files
from pathlib import Path

import numpy as np
import pytest
import torch

from metamlip.data.batching import StructureBatcher
from metamlip.data.level_dataset import LevelDataset
from metamlip.data.packed import PackedLevel, pack_hdf5
from metamlip.data.references import EnergyReference, geometry_keys
from metamlip.errors import InputError
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.potential import Potential, build_potential
from metamlip.pretrain import checked_reference_anchors, pretraining_tasks
from metamlip.readers import read_dataset, read_level
from metamlip.strategies import get_strategy
from metamlip.training.refit import refit_reference
from metamlip.training.run_training import validation_splits

DATA = Path(__file__).parent / "data"
# Rough free-atom energies (eV) of H, C, N, O, S, Cl: the magnitudes a DFT level gives.
TRUE_EV = {1: -13.6, 6: -1029.8, 7: -1485.3, 8: -2042.6, 16: -10830.0, 17: -12516.0}
NOISE_EV = 1.0e-3
SMALL_HIPNN = HipnnConfig(n_features=8, n_sensitivities=4, n_interaction_layers=1, n_atom_layers=1, cutoff_angstrom=4.0)


@pytest.fixture(scope="module")
def qm7x() -> LevelDataset:
    """200 QM7-X structures of 18 compositions of H, C, N, O, S, Cl."""
    return read_level(DATA / "qm7x_small_200.npz", energy_unit="eV", level="pbe0+mbd")


def synthetic_level(dataset: LevelDataset, level: str, per_element_ev: dict[int, float], seed: int) -> LevelDataset:
    """`dataset`'s structures relabelled E = sum_Z n_Z e_Z + Gaussian noise of NOISE_EV."""
    counts = dataset.composition_matrix(sorted(per_element_ev))
    energies = counts @ np.array([per_element_ev[z] for z in sorted(per_element_ev)])
    energies += np.random.default_rng(seed).normal(scale=NOISE_EV, size=len(dataset))
    return replace(dataset, level=level, energies_ev=energies)


def test_fit_recovers_per_element_energies(qm7x: LevelDataset) -> None:
    elements = [1, 6, 7, 8, 9, 16, 17]  # F is in the model but never in the data
    reference = EnergyReference.fit(synthetic_level(qm7x, "pbe0+mbd", TRUE_EV, seed=0), elements)
    counts = qm7x.composition_matrix(sorted(TRUE_EV))
    # least-squares standard error of each e_Z for this noise on these real compositions
    # (0.04 NOISE_EV for H up to 0.46 NOISE_EV for Cl, which only 10 structures contain)
    standard_error = NOISE_EV * np.sqrt(np.diag(np.linalg.inv(counts.T @ counts)))
    fitted = dict(zip(reference.elements, reference.energy_per_element_ev))
    assert fitted[9] == 0.0
    for column, z in enumerate(sorted(TRUE_EV)):
        assert abs(fitted[z] - TRUE_EV[z]) < 5.0 * standard_error[column], (z, fitted[z], TRUE_EV[z])


def test_fit_is_exact_without_noise(qm7x: LevelDataset) -> None:
    exact = replace(qm7x, energies_ev=qm7x.composition_matrix(sorted(TRUE_EV)) @ np.array(list(TRUE_EV.values())))
    reference = EnergyReference.fit(exact, sorted(TRUE_EV))
    np.testing.assert_allclose(reference.energy_per_element_ev, list(TRUE_EV.values()), rtol=0, atol=1e-7)
    np.testing.assert_allclose(reference.energies_ev(exact.composition_matrix(sorted(TRUE_EV))), exact.energies_ev, atol=1e-6)


def test_single_composition_falls_back_to_mean_energy_per_atom() -> None:
    ethanol = read_level(DATA / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level="pbe+vdw-ts")
    reference = EnergyReference.fit(ethanol, [1, 6, 7, 8])
    per_atom = np.mean(ethanol.energies_ev / 9.0)
    np.testing.assert_allclose(reference.energy_per_element_ev, [per_atom, per_atom, 0.0, per_atom], rtol=1e-14)
    predicted = reference.energies_ev(ethanol.composition_matrix([1, 6, 7, 8]))
    np.testing.assert_allclose(predicted.mean(), ethanol.energies_ev.mean(), rtol=1e-14)


def test_compositions_that_do_not_determine_the_reference_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The ANI-1x sample's CCSD(T)*/CBS level: 6 structures of 5 formulas of H, C, N, O; 3 formulas
    leave the 4 reference energies undetermined (as a small training split of it can)."""
    ccsdt = next(data for data in read_dataset(DATA / "ani1x_release_sample.h5") if data.level == "ccsd(t)/cbs")
    counts = ccsdt.composition_matrix([1, 6, 7, 8])
    _, first = np.unique(counts, axis=0, return_index=True)
    caplog.set_level(logging.WARNING, logger="metamlip.data.references")
    EnergyReference.fit(ccsdt, [1, 6, 7, 8])
    assert caplog.text == ""  # 5 formulas: rank 4, determined
    three_formulas = ccsdt.subset(sorted(first)[:3])
    EnergyReference.fit(three_formulas, [1, 6, 7, 8])
    assert "level 'ccsd(t)/cbs': the element counts of its 3 structures have rank 3 for 4 elements" in caplog.text

    caplog.clear()  # training registers the level, then refits on the same structures: one warning, not two
    model = build_potential([1, 6, 7, 8], SMALL_HIPNN, seed=0, dtype=torch.float64)
    model.add_level(EnergyReference.fit(three_formulas, [1, 6, 7, 8]))
    refit_reference(model, StructureBatcher(three_formulas, model.species, SMALL_HIPNN.cutoff_angstrom, torch.float64), "ccsd(t)/cbs")
    assert caplog.text.count("have rank 3 for 4 elements") == 1


def test_levels_keep_their_own_references_inside_a_potential(qm7x: LevelDataset) -> None:
    elements = sorted(TRUE_EV)
    shifted = {z: e + 0.5 * z for z, e in TRUE_EV.items()}
    level_a = synthetic_level(qm7x, "pbe0+mbd", TRUE_EV, seed=1)
    level_b = synthetic_level(qm7x.subset(np.arange(0, 200, 2)), "wB97X/6-31G*", shifted, seed=2)
    reference_a = EnergyReference.fit(level_a, elements)
    reference_b = EnergyReference.fit(level_b, elements)
    model = build_potential(elements, SMALL_HIPNN, seed=0, dtype=torch.float64)
    model.add_level(reference_a)
    fitted_a = reference_a.energy_per_element_ev.copy()
    model.add_level(reference_b)
    model.add_level(EnergyReference.fit(level_b, elements), head="b_head")  # re-registering b touches only b
    assert model.levels == ["pbe0+mbd", "wb97x/6-31g(d)"]
    np.testing.assert_array_equal(model.references["pbe0+mbd"].energy_per_element_ev, fitted_a)
    np.testing.assert_allclose(model.references["wb97x/6-31g(d)"].energy_per_element_ev, list(shifted.values()), atol=0.01)

    batch = StructureBatcher(level_a, model.species, SMALL_HIPNN.cutoff_angstrom, torch.float64).batch(np.arange(20))
    counts = level_a.subset(np.arange(20)).composition_matrix(elements)
    rebuilt = Potential.from_description(json.loads(json.dumps(model.describe()))).double()
    for potential in (model, rebuilt):
        own = potential(batch, forces=False)  # the batch's own level, a
        other = potential(batch, level="WB97X/6-31g(d)", forces=False)
        np.testing.assert_allclose(own.reference_energy_ev.numpy(), counts @ reference_a.energy_per_element_ev, rtol=1e-12)
        np.testing.assert_allclose(other.reference_energy_ev.numpy(), counts @ reference_b.energy_per_element_ev, rtol=1e-12)


def test_round_trip_through_plain_dict(qm7x: LevelDataset) -> None:
    reference = EnergyReference.fit(qm7x, [1, 6, 7, 8, 9, 16, 17])
    state = json.loads(json.dumps(reference.to_dict()))
    restored = EnergyReference.from_dict(state)
    assert restored.level == reference.level == "pbe0+mbd"
    assert restored.elements == reference.elements
    assert restored.energy_per_element_ev.dtype == np.float64
    np.testing.assert_array_equal(restored.energy_per_element_ev, reference.energy_per_element_ev)


def test_a_reference_for_other_elements_is_a_clear_error(qm7x: LevelDataset) -> None:
    model = build_potential(qm7x.elements, HipnnConfig(n_features=4, n_sensitivities=2, n_interaction_layers=1, n_atom_layers=1), seed=0)
    reference = EnergyReference.fit(qm7x, [*qm7x.elements, 9])
    with pytest.raises(InputError, match=r"level 'pbe0\+mbd': reference elements .* differ from model species"):
        model.add_level(reference)


ORGANIC = files("metamlip").joinpath("bundled", "organic_pretraining")
HCNO = [1, 6, 7, 8]


@pytest.fixture(scope="module")
def ani1x_levels() -> dict[str, LevelDataset]:
    """The organic-pretraining set's wB97X/6-31G(d) (COMP6 S66x8 + the ANI-1x sample's 8 conformers:
    536 structures) and three of the ANI-1x sample's own levels on 6 of those conformers (5 formulas)."""
    files_of = {"wb97x/6-31g(d)": "wb97x_6-31g_d.xyz", "hf/cc-pvdz": "hf_cc-pvdz.xyz", "mp2/cc-pvdz": "mp2_cc-pvdz.xyz", "ccsd(t)/cbs": "ccsd_t_cbs.xyz"}
    levels = {}
    for level, name in files_of.items():
        with as_file(ORGANIC.joinpath(name)) as path:
            levels[level] = read_level(path)
    return levels


@pytest.mark.parametrize("level", ["hf/cc-pvdz", "mp2/cc-pvdz", "ccsd(t)/cbs"])
def test_an_anchored_reference_extrapolates_to_formulas_its_level_never_saw(ani1x_levels: dict[str, LevelDataset], level: str) -> None:
    """Fitted on the other 5 structures, a level's own reference misses the energy of a formula seen
    once by 3.8-9 eV beyond the anchor's residual (25-210 eV for the two with 2 carbons, all others
    have 1); anchored to wB97X/6-31G(d) it misses by at most 2.8 eV, and 3x less."""
    anchor = ani1x_levels["wb97x/6-31g(d)"]
    anchor_reference = EnergyReference.fit(anchor, HCNO)
    dataset = ani1x_levels[level]
    counts = dataset.composition_matrix(HCNO)
    formulas, index_of, times = np.unique(counts, axis=0, return_index=True, return_counts=True)
    anchor_energy_ev = dict(zip(geometry_keys(anchor), anchor.energies_ev))
    keys = geometry_keys(dataset)
    held_out = [int(index) for index, count in zip(index_of, times) if count == 1]
    assert len(held_out) == 4
    for index in held_out:
        train = dataset.subset([i for i in range(len(dataset)) if i != index])
        own = EnergyReference.fit(train, HCNO)
        anchored = EnergyReference.fit_anchored(train, HCNO, anchor_reference, anchor)
        anchor_residual_ev = anchor_energy_ev[keys[index]] - counts[index] @ anchor_reference.energy_per_element_ev
        own_miss_ev = dataset.energies_ev[index] - counts[index] @ own.energy_per_element_ev - anchor_residual_ev
        anchored_miss_ev = dataset.energies_ev[index] - counts[index] @ anchored.energy_per_element_ev - anchor_residual_ev
        assert abs(anchored_miss_ev) < min(3.0, abs(own_miss_ev) / 3), (level, index, own_miss_ev, anchored_miss_ev)
        if counts[index, 1] == 2:
            assert abs(own_miss_ev) > 20.0, (level, index, own_miss_ev)


def test_an_anchored_reference_is_exact_for_a_linear_shift(ani1x_levels: dict[str, LevelDataset]) -> None:
    anchor = ani1x_levels["wb97x/6-31g(d)"]
    anchor_reference = EnergyReference.fit(anchor, HCNO)
    shift_ev = np.array([-0.7, 3.1, -2.2, 5.4])
    conformers = anchor.subset(np.arange(len(anchor))[-8:])  # the ANI-1x sample's 8 (5 formulas)
    shifted = replace(conformers, level="shifted", energies_ev=conformers.energies_ev + conformers.composition_matrix(HCNO) @ shift_ev)
    anchored = EnergyReference.fit_anchored(shifted, HCNO, anchor_reference, anchor)
    np.testing.assert_allclose(anchored.energy_per_element_ev, anchor_reference.energy_per_element_ev + shift_ev, atol=1e-8)
    assert anchored.level == "shifted"


def test_an_anchor_without_shared_geometries_is_a_clear_error(ani1x_levels: dict[str, LevelDataset]) -> None:
    anchor = ani1x_levels["wb97x/6-31g(d)"]
    s66_only = anchor.subset(np.arange(len(anchor) - 8))
    with pytest.raises(InputError, match=r"level 'ccsd\(t\)/cbs': none of its 6 training structures has the geometry of a structure of its reference anchor 'wb97x/6-31g\(d\)'"):
        EnergyReference.fit_anchored(ani1x_levels["ccsd(t)/cbs"], HCNO, EnergyReference.fit(s66_only, HCNO), s66_only)


def test_pretraining_registers_anchored_references_and_checks_the_anchors(ani1x_levels: dict[str, LevelDataset]) -> None:
    levels = {level: ani1x_levels[level] for level in ("wb97x/6-31g(d)", "mp2/cc-pvdz", "ccsd(t)/cbs")}
    splits = validation_splits(levels, 0.1, 0)
    anchors = {"ccsd(t)/cbs": "wb97x/6-31g(d)"}
    model = build_potential(HCNO, SMALL_HIPNN, seed=0)
    pretraining_tasks(get_strategy("joint"), model, splits, anchors)
    expected = EnergyReference.fit_anchored(
        splits["ccsd(t)/cbs"].train, HCNO, EnergyReference.fit(splits["wb97x/6-31g(d)"].train, HCNO), splits["wb97x/6-31g(d)"].train
    )
    np.testing.assert_array_equal(model.references["ccsd(t)/cbs"].energy_per_element_ev, expected.energy_per_element_ev)
    np.testing.assert_array_equal(model.references["mp2/cc-pvdz"].energy_per_element_ev, EnergyReference.fit(splits["mp2/cc-pvdz"].train, HCNO).energy_per_element_ev)
    with pytest.raises(InputError, match=r"pretrain.reference_anchors: level 'hf/cc-pvdz' is not among the pre-training levels"):
        checked_reference_anchors({"ccsd(t)/cbs": "hf/cc-pvdz"}, splits)
    with pytest.raises(InputError, match=r"the anchor 'mp2/cc-pvdz' of 'ccsd\(t\)/cbs' is anchored itself"):
        checked_reference_anchors({"ccsd(t)/cbs": "mp2/cc-pvdz", "mp2/cc-pvdz": "wb97x/6-31g(d)"}, splits)


def test_packed_levels_give_the_same_geometry_keys_and_anchored_reference(tmp_path: Path) -> None:
    """The ANI-1x sample packed (memory-mapped) and read into memory: one key per geometry either way."""
    path = DATA / "ani1x_release_sample.h5"
    levels = ["wb97x/6-31g(d)", "ccsd(t)/cbs"]
    folders = pack_hdf5(path, tmp_path, levels=levels)
    packed = {level: PackedLevel.open(folders[level]) for level in levels}
    in_memory = {data.level: data for data in read_dataset(path) if data.level in levels}
    for level in levels:
        assert geometry_keys(packed[level]) == geometry_keys(in_memory[level])
    assert len(set(geometry_keys(in_memory["ccsd(t)/cbs"])) & set(geometry_keys(in_memory["wb97x/6-31g(d)"]))) == 6
    anchor = EnergyReference.fit(in_memory["wb97x/6-31g(d)"], HCNO)
    from_packed = EnergyReference.fit_anchored(packed["ccsd(t)/cbs"], HCNO, anchor, packed["wb97x/6-31g(d)"])
    from_memory = EnergyReference.fit_anchored(in_memory["ccsd(t)/cbs"], HCNO, anchor, in_memory["wb97x/6-31g(d)"])
    np.testing.assert_array_equal(from_packed.energy_per_element_ev, from_memory.energy_per_element_ev)

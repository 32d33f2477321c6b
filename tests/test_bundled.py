"""The bundled `ethanol-multilevel` dataset: levels, counts, forces, scans, and cross-level sanity."""

from __future__ import annotations

import numpy as np
import pytest

from metamlip.datasets import BundledDataset, list_bundled, load_bundled
from metamlip.errors import InputError

NAME = "ethanol-multilevel"
MD17_LEVEL = "pbe+vdw-ts"  # original MD17 labels: no scans, cannot be recomputed
MIN_LEVELS = 6
MIN_CHEAP_STRUCTURES = 300
MIN_TARGET_STRUCTURES = 150
SCAN_POINTS = {"torsion_hocc": 36, "bond_co": 27}


@pytest.fixture(scope="module")
def ethanol() -> BundledDataset:
    return load_bundled(NAME)


def test_listed_and_unknown_name_lists_available() -> None:
    assert NAME in list_bundled()
    with pytest.raises(InputError, match=NAME):
        load_bundled("no-such-dataset")


def test_levels_and_counts(ethanol: BundledDataset) -> None:
    assert len(ethanol.levels) >= MIN_LEVELS
    assert ethanol.target_level == "mp2/cc-pvdz" and ethanol.target_level in ethanol.levels
    assert len(ethanol.levels[ethanol.target_level]) >= MIN_TARGET_STRUCTURES
    cheap = [level for level, entry in ethanol.manifest["levels"].items() if entry["role"] == "cheap"]
    assert len(cheap) >= 5 + 1  # five recomputed levels and the original MD17 one
    assert ethanol.manifest["levels"][ethanol.target_level]["role"] == "target"
    for level in cheap:
        assert len(ethanol.levels[level]) >= MIN_CHEAP_STRUCTURES, level
    for level, dataset in ethanol.levels.items():
        assert dataset.level == level
        assert len(dataset) == ethanol.manifest["levels"][level]["n_structures"] == len(ethanol.source_frames[level])
        assert dataset.elements == [1, 6, 8]


def test_forces_where_promised(ethanol: BundledDataset) -> None:
    for level, entry in ethanol.manifest["levels"].items():
        assert entry["forces"], level
        dataset = ethanol.levels[level]
        assert dataset.has_forces and np.isfinite(dataset.forces_ev_per_angstrom).all(), level


def test_same_md17_frame_has_the_same_geometry_at_every_level(ethanol: BundledDataset) -> None:
    reference = ethanol.levels[MD17_LEVEL]
    row_of_frame = {int(frame): row for row, frame in enumerate(ethanol.source_frames[MD17_LEVEL])}
    for level, dataset in ethanol.levels.items():
        assert set(ethanol.source_frames[level]) <= set(row_of_frame), level
        for row, frame in list(enumerate(ethanol.source_frames[level]))[:20]:
            np.testing.assert_allclose(
                dataset.positions_angstrom[dataset.atom_slice(row)],
                reference.positions_angstrom[reference.atom_slice(row_of_frame[int(frame)])],
                atol=1e-7,
            )


def test_energies_correlate_across_levels_on_shared_geometries(ethanol: BundledDataset) -> None:
    """Levels differ by an offset (same composition) plus a smaller change of PES shape."""
    reference = ethanol.levels[MD17_LEVEL]
    row_of_frame = {int(frame): row for row, frame in enumerate(ethanol.source_frames[MD17_LEVEL])}
    for level, dataset in ethanol.levels.items():
        rows = [row_of_frame[int(frame)] for frame in ethanol.source_frames[level]]
        energies = dataset.energies_ev - dataset.energies_ev.mean()
        reference_energies = reference.energies_ev[rows] - reference.energies_ev[rows].mean()
        assert np.corrcoef(energies, reference_energies)[0, 1] > 0.9, level


def test_scans_at_every_computed_level(ethanol: BundledDataset) -> None:
    computed = set(ethanol.levels) - {MD17_LEVEL}
    assert set(ethanol.scans) == set(SCAN_POINTS)
    for scan_name, points in SCAN_POINTS.items():
        definition = ethanol.manifest["scans"][scan_name]
        assert set(ethanol.scans[scan_name]) == computed, scan_name
        for level, scan in ethanol.scans[scan_name].items():
            assert len(scan.coordinate) == points == definition["n_points"], (scan_name, level)
            assert np.isfinite(scan.energies_ev).all()
    torsion = ethanol.scans["torsion_hocc"][ethanol.target_level]
    assert torsion.kind == "torsion" and torsion.coordinate.max() - torsion.coordinate.min() >= 340.0
    bond = ethanol.scans["bond_co"][ethanol.target_level]
    assert bond.kind == "bond"
    assert bond.coordinate.min() == pytest.approx(1.1) and bond.coordinate.max() == pytest.approx(2.4)
    # the C-O bond has its minimum near 1.43 Angstrom at every level
    for level, scan in ethanol.scans["bond_co"].items():
        assert 1.3 <= scan.coordinate[np.argmin(scan.energies_ev)] <= 1.55, level


def test_readme_keeps_the_attribution() -> None:
    from importlib.resources import files

    readme = files("metamlip").joinpath("bundled", "ethanol_multilevel", "README.md").read_text(encoding="utf-8")
    assert "thorben-frank/mlff" in readme and "MIT License" in readme and "Chmiela" in readme


# --- methyl-formate-multilevel: GFN2-xTB MD geometries, MP2 and CCSD(T) targets --------------------------------

MF_NAME = "methyl-formate-multilevel"
MF_CHEAP_LEVELS = ("gfn2-xtb", "gfn1-xtb", "hf/sto-3g", "hf/3-21g", "hf/6-31g(d)")
MF_TARGETS = {"mp2/cc-pvdz": True, "ccsd(t)/cc-pvdz": False}  # target level -> has forces
MF_MIN_STRUCTURES = {"mp2/cc-pvdz": MIN_TARGET_STRUCTURES, "ccsd(t)/cc-pvdz": MIN_TARGET_STRUCTURES}
MF_SCAN_POINTS = {"torsion_ococ": 36, "bond_och3": 25}


@pytest.fixture(scope="module")
def methyl_formate() -> BundledDataset:
    return load_bundled(MF_NAME)


def test_methyl_formate_levels_counts_and_forces(methyl_formate: BundledDataset) -> None:
    assert MF_NAME in list_bundled()
    assert methyl_formate.target_level == "mp2/cc-pvdz"
    assert set(methyl_formate.levels) == set(MF_CHEAP_LEVELS) | set(MF_TARGETS)
    for level in MF_CHEAP_LEVELS:
        assert len(methyl_formate.levels[level]) >= MIN_CHEAP_STRUCTURES, level
        assert methyl_formate.manifest["levels"][level]["role"] == "cheap"
    for level in MF_TARGETS:
        assert len(methyl_formate.levels[level]) >= MF_MIN_STRUCTURES[level], level
        assert methyl_formate.manifest["levels"][level]["role"] == "target"
    for level, dataset in methyl_formate.levels.items():
        entry = methyl_formate.manifest["levels"][level]
        assert len(dataset) == entry["n_structures"] == len(methyl_formate.source_frames[level]), level
        assert dataset.elements == [1, 6, 8] and dataset.n_atoms.tolist() == [8] * len(dataset), level
        has_forces = MF_TARGETS.get(level, True)
        assert entry["forces"] == dataset.has_forces == has_forces, level
        if has_forces:
            assert np.isfinite(dataset.forces_ev_per_angstrom).all(), level


def test_methyl_formate_targets_share_geometries_with_the_cheap_levels(methyl_formate: BundledDataset) -> None:
    frames = methyl_formate.source_frames
    reference = methyl_formate.levels["gfn2-xtb"]
    row_of_frame = {int(frame): row for row, frame in enumerate(frames["gfn2-xtb"])}
    assert set(frames["ccsd(t)/cc-pvdz"].tolist()) == set(frames["mp2/cc-pvdz"].tolist())
    for level, dataset in methyl_formate.levels.items():
        assert set(frames[level].tolist()) <= set(row_of_frame), level
        for row, frame in list(enumerate(frames[level]))[::15]:
            np.testing.assert_allclose(
                dataset.positions_angstrom[dataset.atom_slice(row)],
                reference.positions_angstrom[reference.atom_slice(row_of_frame[int(frame)])],
                atol=1e-7,
            )


def test_methyl_formate_energies_are_sane(methyl_formate: BundledDataset) -> None:
    """Every level correlates with MP2 on shared frames; CCSD(T) sits below MP2 by a near-constant offset."""
    mp2 = methyl_formate.levels["mp2/cc-pvdz"].energies_ev
    mp2_row = {int(frame): row for row, frame in enumerate(methyl_formate.source_frames["mp2/cc-pvdz"])}
    for level, dataset in methyl_formate.levels.items():
        pairs = [(row, mp2_row[int(frame)]) for row, frame in enumerate(methyl_formate.source_frames[level])
                 if int(frame) in mp2_row]
        rows, mp2_rows = (list(column) for column in zip(*pairs))
        energies = dataset.energies_ev[rows]
        # HF, without correlation energy, correlates least with MP2 (about 0.84 at HF/6-31G(d))
        assert np.corrcoef(energies, mp2[mp2_rows])[0, 1] > (0.99 if level == "ccsd(t)/cc-pvdz" else 0.8), level
        if level == "ccsd(t)/cc-pvdz":
            assert (energies < mp2[mp2_rows]).all()
            assert np.std(energies - mp2[mp2_rows]) < 0.05  # eV; the offset is about -1.2 eV


def test_methyl_formate_scans(methyl_formate: BundledDataset) -> None:
    assert set(methyl_formate.scans) == set(MF_SCAN_POINTS)
    for scan_name, points in MF_SCAN_POINTS.items():
        assert methyl_formate.manifest["scans"][scan_name]["n_points"] == points
        assert set(MF_CHEAP_LEVELS) | {"mp2/cc-pvdz"} <= set(methyl_formate.scans[scan_name]), scan_name
        for level, scan in methyl_formate.scans[scan_name].items():
            assert len(scan.coordinate) == points and np.isfinite(scan.energies_ev).all(), (scan_name, level)
    assert all("ccsd(t)/cc-pvdz" in methyl_formate.scans[scan_name] for scan_name in MF_SCAN_POINTS)
    for level, torsion in methyl_formate.scans["torsion_ococ"].items():
        # the cis (Z) ester, O=C-O-C = 0 degree, is the minimum and lies below trans (180 degree)
        assert torsion.kind == "torsion" and abs(torsion.coordinate[np.argmin(torsion.energies_ev)]) <= 10.0, level
    for level, bond in methyl_formate.scans["bond_och3"].items():
        assert bond.kind == "bond" and 1.35 <= bond.coordinate[np.argmin(bond.energies_ev)] <= 1.55, level


def test_methyl_formate_readme_states_origin_and_license() -> None:
    from importlib.resources import files

    readme = files("metamlip").joinpath("bundled", "methyl_formate_multilevel", "README.md").read_text(encoding="utf-8")
    assert "computed by" in readme.lower() and "license" in readme.lower()


ORGANIC_NAME = "organic-pretraining"
HCNO = {1, 6, 7, 8}
ORGANIC_PUBLIC_LEVELS = {  # level -> (structures, forces): the public samples, H/C/N/O structures kept
    "pbe0+mbd": (2420, True),  # QM7-X: 80 of 2500 hold S or Cl
    "wb97x/6-31g(d)": (528 + 8, True),  # COMP6 S66x8 + ANI-1x
    "wb97x/def2-tzvpp": (8, True),
    "hf/cc-pvdz": (6, False),
    "mp2/cc-pvdz": (6, False),
    "ccsd(t)/cbs": (6, False),
    "wb97m-d3bj/def2-tzvppd": (50, True),  # SPICE: the 5 conformations with Na left out
    "pbe+vdw-ts": (2000, True),  # MD17 ethanol
}
ORGANIC_RELABELLED_LEVELS = {"gfn2-xtb": 2420, "gfn1-xtb": 2420, "df-hf/sto-3g": 1000, "df-hf/6-31g(d)": 1000}


@pytest.fixture(scope="module")
def organic() -> BundledDataset:
    return load_bundled(ORGANIC_NAME)


def test_organic_levels_counts_elements_and_forces(organic: BundledDataset) -> None:
    """The issue's set: the public samples in their own levels and QM7-X relabelled at four levels
    (thousands at xTB, >= 1000 at each HF level)."""
    assert organic.target_level is None
    assert set(organic.levels) == set(ORGANIC_PUBLIC_LEVELS) | set(ORGANIC_RELABELLED_LEVELS)
    for level, (count, forces) in ORGANIC_PUBLIC_LEVELS.items():
        dataset = organic.levels[level]
        assert len(dataset) == count and dataset.has_forces == forces, level
    for level, minimum in ORGANIC_RELABELLED_LEVELS.items():
        dataset = organic.levels[level]
        assert len(dataset) >= minimum and dataset.has_forces, level
        assert organic.manifest["levels"][level]["origin"] == "computed with metamlip label"
    for level, dataset in organic.levels.items():
        assert set(dataset.elements) <= HCNO, level
        assert len(dataset) == organic.manifest["levels"][level]["n_structures"], level
        if dataset.has_forces:
            assert np.isfinite(dataset.forces_ev_per_angstrom).all(), level
    left_out = organic.manifest["public_samples"]["qm7x"]["levels"]["pbe0+mbd"]
    assert left_out["n_read"] - left_out["n_kept"] == 80 and set(left_out["left_out_by_element"]) == {"S", "Cl"}


def test_organic_qm7x_levels_share_geometries(organic: BundledDataset) -> None:
    """One source_index names one QM7-X geometry at PBE0+MBD and at every relabelled level."""
    reference = organic.levels["pbe0+mbd"]
    assert organic.source_frames["pbe0+mbd"].tolist() == list(range(len(reference)))
    for level in ORGANIC_RELABELLED_LEVELS:
        dataset = organic.levels[level]
        for row, frame in list(enumerate(organic.source_frames[level]))[::97]:
            np.testing.assert_allclose(
                dataset.positions_angstrom[dataset.atom_slice(row)],
                reference.positions_angstrom[reference.atom_slice(int(frame))],
                atol=1e-7,
            )
        # with each level's per-element linear reference removed (as metamlip's models do), xTB and HF
        # energies track PBE0+MBD across molecules and geometries (0.990 to 0.998 measured)
        residual = reference_free_energies(dataset)
        assert np.corrcoef(residual, reference_free_energies(reference)[organic.source_frames[level]])[0, 1] > 0.98, level


def reference_free_energies(dataset) -> np.ndarray:
    """Energies (eV) minus the least-squares per-element reference of the dataset."""
    from metamlip.data.references import EnergyReference

    elements = sorted(HCNO)
    reference = EnergyReference.fit(dataset, elements)
    return dataset.energies_ev - dataset.composition_matrix(elements) @ reference.energy_per_element_ev


def test_organic_readme_states_sources_and_licenses() -> None:
    from importlib.resources import files

    readme = files("metamlip").joinpath("bundled", "organic_pretraining", "README.md").read_text(encoding="utf-8")
    for source in ("QM7-X", "COMP6", "ANI-1x", "SPICE", "MD17", "MIT"):
        assert source in readme, source


PARACETAMOL_NAME = "paracetamol-target"
PARACETAMOL_TARGET = "df-b3lyp-d3bj/def2-svp"


@pytest.fixture(scope="module")
def paracetamol() -> BundledDataset:
    return load_bundled(PARACETAMOL_NAME)


def test_paracetamol_target_shares_the_md_geometries_and_has_forces(paracetamol: BundledDataset) -> None:
    """Every target structure is a GFN2-xTB MD frame (same source_index, same positions), with forces;
    the target level is in no level of the organic pre-training set. (Labelling continues: the
    issue's 250 structures are checked by count once complete, see the README.)"""
    assert paracetamol.target_level == PARACETAMOL_TARGET
    assert len(paracetamol.levels["gfn2-xtb"]) == 300
    organic_levels = load_bundled(ORGANIC_NAME).manifest["levels"]
    assert PARACETAMOL_TARGET not in organic_levels
    gfn2 = paracetamol.levels["gfn2-xtb"]
    row_of_frame = {int(frame): row for row, frame in enumerate(paracetamol.source_frames["gfn2-xtb"])}
    target = paracetamol.levels[PARACETAMOL_TARGET]
    assert len(target) >= 1 and target.has_forces and np.isfinite(target.forces_ev_per_angstrom).all()
    drawn = np.random.default_rng(0).permutation(300)  # the manifest's selection rule
    assert set(paracetamol.source_frames[PARACETAMOL_TARGET].tolist()) == set(drawn[: len(target)].tolist())  # a prefix of the draw
    for row, frame in enumerate(paracetamol.source_frames[PARACETAMOL_TARGET]):
        np.testing.assert_allclose(
            target.positions_angstrom[target.atom_slice(row)],
            gfn2.positions_angstrom[gfn2.atom_slice(row_of_frame[int(frame)])],
            atol=1e-7,
        )
    for dataset in paracetamol.levels.values():
        assert dataset.elements == [1, 6, 7, 8] and set(dataset.n_atoms.tolist()) == {20}


def test_paracetamol_torsion_scan_minimum_is_planar(paracetamol: BundledDataset) -> None:
    """At GFN2-xTB and the target level the amide plane lies in the ring plane at the minimum (C1-N3-C4-C5 near 0 degree)."""
    for level in ("gfn2-xtb", PARACETAMOL_TARGET):
        torsion = paracetamol.scans["torsion_amide_aryl"][level]
        assert len(torsion.coordinate) == 24 and abs(torsion.coordinate[np.argmin(torsion.energies_ev)]) <= 15.0, level
        assert np.ptp(torsion.energies_ev) > 0.2, level  # eV: a real barrier (6.0-6.4 kcal/mol at +-90 degree)

"""Tests of metamlip.scans and `metamlip scan`: geometries, roughness metrics, files, CLI wiring."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import Calculator, all_changes

from metamlip.cli import scan as scan_cli
from metamlip.errors import InputError
from metamlip.scans import (
    Scan,
    bond_scan,
    count_extrema,
    dense_grid,
    is_full_turn,
    moving_fragment,
    plot_scans,
    read_scan,
    roughness,
    scan_geometries,
    torsion_scan,
    write_scan_csv,
)

ETHANOL_HOCC = (3, 2, 1, 0)  # ase.build ethanol: C0 C1 O2 H3(on O); H-O-C-C
ETHANOL_OC = (2, 1)  # O2-C1: stretching moves the C1 side (C1, C0 and their H)
BARRIER_EV = 0.05
ABSOLUTE_OFFSET_EV = -1000.0


def torsion_energy_ev(angle_degree: np.ndarray) -> np.ndarray:
    """Threefold torsion profile: 0.05 eV * (1 + cos 3 phi) on top of a large absolute offset."""
    return ABSOLUTE_OFFSET_EV + BARRIER_EV * (1.0 + np.cos(3.0 * np.radians(angle_degree)))


def morse_ev(distance_angstrom: np.ndarray, depth_ev: float = 4.0, width: float = 2.0, r0: float = 1.43) -> np.ndarray:
    return depth_ev * (1.0 - np.exp(-width * (np.asarray(distance_angstrom) - r0))) ** 2


class CoordinateCalculator(Calculator):
    """Tiny analytic ASE calculator: energy (eV) = profile(dihedral or distance of given atoms)."""

    implemented_properties = ["energy"]

    def __init__(self, indices: tuple[int, ...], profile) -> None:
        super().__init__()
        self.indices, self.profile = indices, profile

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        if len(self.indices) == 4:
            value = self.atoms.get_dihedral(*self.indices)
        else:
            value = self.atoms.get_distance(*self.indices)
        self.results["energy"] = float(self.profile(np.array(value)))


def periodic_scan(name: str, angles_degree: np.ndarray, energies_ev: np.ndarray) -> Scan:
    return Scan(name=name, kind="torsion", coordinate=angles_degree, energies_ev=energies_ev, periodic=True)


def wrapped_difference_degree(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


# ---------------------------------------------------------------- roughness on analytic curves

REFERENCE_ANGLES = np.linspace(-180.0, 180.0, 37)
COSINE_REFERENCE = periodic_scan("cosine", REFERENCE_ANGLES, 0.1 * np.cos(np.radians(REFERENCE_ANGLES)))


def test_dense_grid_is_one_period_without_endpoint():
    grid = dense_grid(COSINE_REFERENCE, 4)
    assert grid.size == 4 * 36  # -180 and 180 are one point
    assert grid[0] == -180.0 and np.isclose(grid[1] - grid[0], 2.5) and grid[-1] < 180.0


def test_same_cosine_has_no_spurious_extrema_and_no_error():
    grid = dense_grid(COSINE_REFERENCE)
    model = periodic_scan("model", grid, 0.1 * np.cos(np.radians(grid)))
    result = roughness(model, COSINE_REFERENCE)
    assert not result.model_interpolated
    assert result.spurious_extrema == 0 and result.reference_extrema == 2
    assert result.energy_rms_ev < 1e-5 and result.energy_max_ev < 1e-5
    assert result.second_derivative_rms_ev_per_unit2 < 1e-7


def test_model_off_the_grid_is_interpolated():
    result = roughness(COSINE_REFERENCE, COSINE_REFERENCE)
    assert result.model_interpolated
    assert result.spurious_extrema == 0 and result.energy_max_ev == pytest.approx(0.0, abs=1e-12)


def test_ripple_adds_the_derivable_number_of_extrema():
    # Model = 0.1 cos(phi) + 0.01 cos(24 phi). Its slope 0.1 sin(phi) + 0.24 sin(24 phi) changes
    # sign at each of the 48 ripple peaks because 0.01 * 24 > 0.1, so it has 2 * 24 = 48 extrema
    # per turn against the reference's 2: 46 spurious. On the 2.5 degree grid 24 * 2.5 = 60 degrees
    # of ripple phase per step, so every ripple peak is a grid point. The central second difference
    # of a cos(k x) has amplitude a * 4 sin^2(k h / 2) / h^2 = 0.01 * 4 * 0.25 / 2.5^2 = 0.0016
    # eV/degree^2, whose RMS over whole periods is 0.0016 / sqrt(2).
    grid = dense_grid(COSINE_REFERENCE)
    rippled = 0.1 * np.cos(np.radians(grid)) + 0.01 * np.cos(24.0 * np.radians(grid))
    smooth = roughness(periodic_scan("smooth", grid, 0.1 * np.cos(np.radians(grid))), COSINE_REFERENCE)
    rough = roughness(periodic_scan("rippled", grid, rippled), COSINE_REFERENCE)
    assert rough.model_extrema == 48 and rough.spurious_extrema == 46
    assert rough.second_derivative_rms_ev_per_unit2 == pytest.approx(0.0016 / np.sqrt(2.0), rel=1e-3)
    assert rough.second_derivative_rms_ev_per_unit2 > 1000 * smooth.second_derivative_rms_ev_per_unit2


def test_constant_offset_does_not_change_aligned_energy_error():
    grid = dense_grid(COSINE_REFERENCE)
    model_ev = 0.12 * np.cos(np.radians(grid))
    plain = roughness(periodic_scan("plain", grid, model_ev), COSINE_REFERENCE)
    shifted = roughness(periodic_scan("shifted", grid, model_ev + 3.7), COSINE_REFERENCE)
    assert plain.energy_rms_ev > 1e-3
    assert shifted.energy_rms_ev == pytest.approx(plain.energy_rms_ev, abs=1e-9)
    assert shifted.energy_max_ev == pytest.approx(plain.energy_max_ev, abs=1e-9)
    assert shifted.second_derivative_rms_ev_per_unit2 == pytest.approx(plain.second_derivative_rms_ev_per_unit2)


def test_morse_bond_stretch_is_not_periodic():
    distances = np.linspace(1.0, 2.5, 25)
    reference = Scan("morse", "bond", distances, morse_ev(distances))
    wider = Scan("wider", "bond", np.linspace(0.9, 2.6, 41), morse_ev(np.linspace(0.9, 2.6, 41), width=1.8) - 7.0)
    result = roughness(wider, reference)
    assert result.reference_extrema == 1 and result.model_extrema == 1 and result.spurious_extrema == 0
    assert result.model_interpolated and result.coordinate_unit == "angstrom"
    assert result.grid_points == 100 and 0.0 < result.energy_rms_ev < result.energy_max_ev
    same = roughness(Scan("same", "bond", dense_grid(reference), morse_ev(dense_grid(reference)) + 2.0), reference)
    # only the spline error of the reference remains (largest on the steep repulsive wall, ~7 eV high)
    assert same.spurious_extrema == 0 and same.energy_max_ev < 0.01 * result.energy_max_ev


def test_model_must_cover_the_reference_range():
    distances = np.linspace(1.0, 2.5, 25)
    reference = Scan("morse", "bond", distances, morse_ev(distances))
    short = Scan("short", "bond", distances[:10], morse_ev(distances[:10]))
    with pytest.raises(InputError, match="does not cover"):
        roughness(short, reference)


def test_extremum_count_ignores_noise_below_tolerance():
    rng = np.random.default_rng(0)
    noise_ev = 2e-5 * rng.standard_normal(200)
    assert count_extrema(np.full(200, 1.0) + noise_ev, periodic=True) == 0
    assert count_extrema(np.linspace(0.0, 1.0, 200) + noise_ev, periodic=False) == 0
    assert count_extrema(np.cos(np.linspace(0, 4 * np.pi, 200, endpoint=False)) + noise_ev, periodic=True) == 4
    assert count_extrema(np.cos(np.linspace(0, 4 * np.pi, 200, endpoint=False)), periodic=False) == 3


def test_full_turn_detection():
    assert is_full_turn(np.linspace(-180, 180, 37))
    assert is_full_turn(np.arange(0.0, 360.0, 10.0))
    assert not is_full_turn(np.linspace(-60, 60, 13))


# ---------------------------------------------------------------- geometries


@pytest.fixture
def ethanol() -> Atoms:
    return molecule("CH3CH2OH")


def test_torsion_geometries_hit_the_angles_and_keep_fragments_rigid(ethanol):
    angles = np.linspace(-180.0, 180.0, 13)
    moving = moving_fragment(ethanol, 2, 1)
    fixed = np.setdiff1d(np.arange(len(ethanol)), moving)
    assert set(moving.tolist()) == {0, 1, 4, 5, 6, 7, 8} and set(fixed.tolist()) == {2, 3}
    for angle, geometry in zip(angles, scan_geometries(ethanol, "torsion", ETHANOL_HOCC, angles)):
        assert wrapped_difference_degree(geometry.get_dihedral(*ETHANOL_HOCC), angle) < 1e-6
        assert geometry.info["scan_coordinate"] == angle and geometry.info["scan_kind"] == "torsion"
        np.testing.assert_allclose(geometry.positions[fixed], ethanol.positions[fixed], atol=1e-12)
        np.testing.assert_allclose(geometry[moving].get_all_distances(), ethanol[moving].get_all_distances(), atol=1e-9)


def test_bond_geometries_hit_the_distances_and_keep_fragments_rigid(ethanol):
    distances = np.linspace(1.1, 2.2, 6)
    moving = moving_fragment(ethanol, *ETHANOL_OC)
    fixed = np.setdiff1d(np.arange(len(ethanol)), moving)
    for distance, geometry in zip(distances, scan_geometries(ethanol, "bond", ETHANOL_OC, distances)):
        assert geometry.get_distance(*ETHANOL_OC) == pytest.approx(distance, abs=1e-10)
        np.testing.assert_allclose(geometry.positions[fixed], ethanol.positions[fixed], atol=1e-12)
        np.testing.assert_allclose(geometry[moving].get_all_distances(), ethanol[moving].get_all_distances(), atol=1e-9)


def test_ring_bonds_and_bad_indices_are_refused(ethanol):
    benzene = molecule("C6H6")
    with pytest.raises(InputError, match=r"atoms 0 and 1 .*ring"):
        scan_geometries(benzene, "bond", (0, 1), np.array([1.5]))
    with pytest.raises(InputError, match="ring"):
        scan_geometries(benzene, "torsion", (6, 0, 1, 7), np.array([10.0]))
    with pytest.raises(InputError, match="not bonded"):
        scan_geometries(ethanol, "bond", (0, 2), np.array([1.5]))
    with pytest.raises(InputError, match="out of range"):
        scan_geometries(ethanol, "torsion", (3, 2, 1, 99), np.array([0.0]))


def test_torsion_and_bond_scans_with_an_ase_calculator(ethanol):
    angles = np.linspace(-180.0, 180.0, 37)
    scan = torsion_scan(ethanol, CoordinateCalculator(ETHANOL_HOCC, torsion_energy_ev), ETHANOL_HOCC, angles)
    assert scan.periodic and scan.kind == "torsion" and scan.coordinate_unit == "degree"
    np.testing.assert_allclose(scan.energies_ev, torsion_energy_ev(angles), atol=1e-9)
    assert scan.relative_energies_ev.min() == 0.0
    distances = np.linspace(1.2, 2.0, 9)
    stretch = bond_scan(ethanol, CoordinateCalculator(ETHANOL_OC, morse_ev), ETHANOL_OC, distances)
    assert not stretch.periodic
    np.testing.assert_allclose(stretch.energies_ev, morse_ev(distances), atol=1e-9)


# ---------------------------------------------------------------- files and plots


def test_csv_round_trip_and_reference_column(tmp_path):
    grid = dense_grid(COSINE_REFERENCE, 2)
    model = periodic_scan("model", grid, 5.0 + 0.1 * np.cos(np.radians(grid)))
    path = write_scan_csv(tmp_path / "scan.csv", model, COSINE_REFERENCE)
    lines = path.read_text().splitlines()
    assert "coordinate_unit=degree" in lines[0] and lines[1] == "coordinate,energy_ev,reference_energy_ev"
    table = np.loadtxt(path, delimiter=",", skiprows=2)
    np.testing.assert_allclose(table[:, 1], table[:, 2], atol=1e-6)
    back = read_scan(path)
    assert back.kind == "torsion" and back.periodic and back.name == "model"
    np.testing.assert_allclose(back.energies_ev, model.relative_energies_ev, atol=1e-9)


def test_reference_from_extended_xyz_frames_is_sorted(tmp_path, ethanol):
    angles = np.array([60.0, -120.0, 0.0, 180.0, -60.0, 120.0])
    frames = scan_geometries(ethanol, "torsion", ETHANOL_HOCC, angles)
    for frame, angle in zip(frames, angles):
        frame.info["energy"] = float(torsion_energy_ev(angle))
    path = tmp_path / "reference.xyz"
    ase.io.write(path, frames, format="extxyz")
    reference = read_scan(path)
    assert reference.kind == "torsion" and reference.periodic
    np.testing.assert_allclose(reference.coordinate, np.sort(angles))
    np.testing.assert_allclose(reference.energies_ev, torsion_energy_ev(np.sort(angles)), atol=1e-8)


def test_bad_scan_files_name_the_line_or_frame(tmp_path, ethanol):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("# metamlip scan; kind=bond\ncoordinate,energy_ev\n1.0,0.5\n1.1,oops\n")
    with pytest.raises(InputError, match=r"bad.csv, line 4"):
        read_scan(bad_csv)
    frames = scan_geometries(ethanol, "bond", ETHANOL_OC, np.array([1.3, 1.4]))
    for frame in frames:
        frame.info["energy"] = 1.0
    del frames[1].info["scan_coordinate"]
    bad_xyz = tmp_path / "bad.xyz"
    ase.io.write(bad_xyz, frames, format="extxyz")
    with pytest.raises(InputError, match=r"bad.xyz, frame 1"):
        read_scan(bad_xyz)
    no_kind = tmp_path / "no_kind.csv"
    no_kind.write_text("coordinate,energy_ev\n1.0,0.5\n1.1,0.4\n")
    with pytest.raises(InputError, match="kind"):
        read_scan(no_kind)
    assert read_scan(no_kind, kind="bond").coordinate_unit == "angstrom"


def test_plot_overlays_scans_and_reference(tmp_path):
    grid = dense_grid(COSINE_REFERENCE)
    scans = {"a": periodic_scan("a", grid, np.cos(np.radians(grid))), "b": COSINE_REFERENCE}
    path = plot_scans(tmp_path / "plot.png", scans, COSINE_REFERENCE, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- run_scan and the CLI


def write_torsion_reference(path: Path) -> Path:
    angles = np.linspace(-180.0, 180.0, 37)
    reference = periodic_scan("reference", angles, torsion_energy_ev(angles))
    return write_scan_csv(path, reference)


def test_run_scan_end_to_end_with_ase_calculator(tmp_path, ethanol):
    reference = read_scan(write_torsion_reference(tmp_path / "reference.csv"))
    calculator = CoordinateCalculator(ETHANOL_HOCC, torsion_energy_ev)
    coordinates = scan_cli.default_coordinates(ethanol, "torsion", ETHANOL_HOCC, None, None)
    result = scan_cli.run_scan(calculator, ethanol, "torsion", ETHANOL_HOCC, coordinates, reference, tmp_path / "out")
    assert result.scan.coordinate.size == 37 and result.dense_scan.coordinate.size == 144
    assert result.png_path.is_file() and result.csv_path.is_file()
    record = json.loads(result.roughness_path.read_text())
    assert record["spurious_extrema"] == 0 and record["model_extrema"] == record["reference_extrema"] == 6
    assert record["model_interpolated"] is False and record["energy_max_ev"] < 1e-3
    assert "spurious extrema" in scan_cli.format_summary(result)

    bond = scan_cli.default_coordinates(ethanol, "bond", ETHANOL_OC, None, None)
    assert bond.size == 25 and bond[0] == pytest.approx(ethanol.get_distance(*ETHANOL_OC) - 0.3)
    plain = scan_cli.run_scan(CoordinateCalculator(ETHANOL_OC, morse_ev), ethanol, "bond", ETHANOL_OC, bond, None,
                              tmp_path / "bond")
    assert plain.roughness is None and not (tmp_path / "bond" / "roughness.json").exists()
    assert (tmp_path / "bond" / "scan.png").is_file()


def test_cli_loads_checkpoint_through_metamlip_calculator(tmp_path, ethanol, monkeypatch, capsys):
    loaded = {}

    class StandInCalculator:
        @classmethod
        def from_checkpoint(cls, path, level=None):
            loaded.update(path=Path(path), level=level)
            return CoordinateCalculator(ETHANOL_HOCC, torsion_energy_ev)

    monkeypatch.setitem(sys.modules, "metamlip.calculator", types.SimpleNamespace(MetamlipCalculator=StandInCalculator))
    structure = tmp_path / "ethanol.xyz"
    ase.io.write(structure, ethanol)
    reference = write_torsion_reference(tmp_path / "reference.csv")
    parser = argparse.ArgumentParser()
    scan_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["scan", str(tmp_path / "model.pt"), "--structure", str(structure), "--torsion", "3",
                              "2", "1", "0", "--level", "ccsd(t)", "--reference", str(reference), "--out",
                              str(tmp_path / "out")])
    assert args.run(args) == 0
    assert loaded == {"path": tmp_path / "model.pt", "level": "ccsd(t)"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"scan.csv", "scan.png", "roughness.json"}
    assert "spurious extrema" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["scan", "m.pt", "--structure", str(structure), "--out", "x"])  # no coordinate

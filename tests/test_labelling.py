"""`metamlip label`: levels, backends, units, resume, failures, and the output format."""

from __future__ import annotations

import json
import sys
from importlib.resources import as_file, files
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms

from metamlip.errors import InputError
from metamlip.labelling import calculate, label_structures, resolve_level
from metamlip.labelling import runner as labelling_runner
from metamlip.labelling.output import append_frame, failures_path

MD17_FRAMES = 4
FINITE_DIFFERENCE_STEP_ANGSTROM = 1.0e-3


@pytest.fixture(scope="module")
def ethanol(data_dir: Path) -> list[Atoms]:
    """The first MD17 ethanol geometries (Angstrom), without labels."""
    data = np.load(data_dir / "md17_ethanol_dft.npz")
    return [Atoms(numbers=data["z"], positions=data["R"][i]) for i in range(MD17_FRAMES)]


def _bundled_frames(file_name: str, count: int) -> list[Atoms]:
    resource = files("metamlip").joinpath("bundled", "ethanol_multilevel", file_name)
    if not resource.is_file():
        pytest.skip(f"bundled file {file_name} not generated yet")
    with as_file(resource) as path:
        return ase.io.read(path, f":{count}")


def _energies_by_index(path: Path) -> dict[int, float]:
    return {int(atoms.info["source_index"]): atoms.get_potential_energy() for atoms in ase.io.read(path, ":")}


@pytest.mark.parametrize(
    ("level", "file_name", "package"), [("hf/sto-3g", "hf_sto-3g.xyz", "pyscf"), ("gfn2-xtb", "gfn2-xtb.xyz", "tblite")]
)
def test_label_reproduces_bundled_values(tmp_path: Path, level: str, file_name: str, package: str) -> None:
    pytest.importorskip(package)
    bundled = _bundled_frames(file_name, 2)
    geometries = [Atoms(numbers=atoms.numbers, positions=atoms.positions) for atoms in bundled]
    report = label_structures(geometries, level, tmp_path / "out.xyz", progress=False)
    assert report.n_labelled == 2 and not report.failures
    labelled = sorted(ase.io.read(tmp_path / "out.xyz", ":"), key=lambda atoms: atoms.info["source_index"])
    for mine, reference in zip(labelled, bundled):
        assert mine.info["level_of_theory"] == level and mine.info["energy_unit"] == "eV"
        assert mine.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(mine.get_forces(), reference.get_forces(), atol=1e-5)


@pytest.mark.parametrize(("level", "package"), [("hf/sto-3g", "pyscf"), ("gfn2-xtb", "tblite")])
def test_forces_match_finite_differences_of_energies(ethanol: list[Atoms], level: str, package: str) -> None:
    pytest.importorskip(package)
    spec = resolve_level(level)
    atoms = ethanol[0]
    forces = calculate(spec, atoms.numbers, atoms.positions).forces_ev_per_angstrom
    for atom, axis in [(2, 0), (8, 1)]:  # the oxygen along x, the hydroxyl hydrogen along y
        energies = []
        for sign in (+1.0, -1.0):
            displaced = atoms.positions.copy()
            displaced[atom, axis] += sign * FINITE_DIFFERENCE_STEP_ANGSTROM
            energies.append(calculate(spec, atoms.numbers, displaced).energy_ev)
        finite_difference = -(energies[0] - energies[1]) / (2.0 * FINITE_DIFFERENCE_STEP_ANGSTROM)
        assert forces[atom, axis] == pytest.approx(finite_difference, abs=5e-4)


def test_resume_skips_finished_structures(
    ethanol: list[Atoms], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tblite")
    computed: list[int] = []
    real_calculate = labelling_runner.calculate

    def counting_calculate(spec, numbers, positions_angstrom, charge=0, multiplicity=1):
        computed.append(len(computed))
        if len(computed) in (3, 4):  # the first run stops after two structures, as a killed run would
            raise RuntimeError("interrupted")
        return real_calculate(spec, numbers, positions_angstrom, charge, multiplicity)

    monkeypatch.setattr(labelling_runner, "calculate", counting_calculate)
    out = tmp_path / "labels.xyz"
    first = label_structures(ethanol, "gfn2-xtb", out, progress=False)
    assert first.n_labelled == 2 and len(computed) == 4 and sorted(first.failures) == [2, 3]

    second = label_structures(ethanol, "gfn2-xtb", out, progress=False)
    assert len(computed) == 4 + (len(ethanol) - 2), "structures already in the output were recomputed"
    assert second.n_already_done == 2 and second.n_labelled == len(ethanol) - 2
    assert sorted(_energies_by_index(out)) == list(range(len(ethanol)))

    third = label_structures(ethanol, "gfn2-xtb", out, progress=False)
    assert third.n_labelled == 0 and len(computed) == len(ethanol) + 2


def test_torn_last_frame_is_cut_and_relabelled(ethanol: list[Atoms], tmp_path: Path) -> None:
    pytest.importorskip("tblite")
    out = tmp_path / "labels.xyz"
    label_structures(ethanol[:3], "gfn2-xtb", out, progress=False)
    complete = _energies_by_index(out)
    text = out.read_text()
    out.write_text(text[: len(text) - 40])  # a run killed while writing its last frame
    report = label_structures(ethanol[:3], "gfn2-xtb", out, progress=False)
    assert report.n_already_done == 2 and report.n_labelled == 1
    assert _energies_by_index(out) == pytest.approx(complete, abs=1e-10)


@pytest.mark.parametrize(("level", "package"), [("gfn2-xtb", "tblite"), ("hf/sto-3g", "pyscf")])
def test_failing_structure_is_reported_and_skipped(
    ethanol: list[Atoms], tmp_path: Path, level: str, package: str
) -> None:
    pytest.importorskip(package)
    broken = ethanol[1].copy()
    broken.positions[8] = broken.positions[2]  # hydroxyl H on top of the oxygen
    structures = [ethanol[0], broken, ethanol[2]]
    out = tmp_path / "labels.xyz"
    report = label_structures(structures, level, out, progress=False)
    assert list(report.failures) == [1] and report.n_labelled == 2
    assert sorted(_energies_by_index(out)) == [0, 2]
    recorded = json.loads(failures_path(out).read_text())
    assert [record["index"] for record in recorded] == [1] and recorded[0]["reason"]
    assert "1 (" in report.summary()


def test_impossible_multiplicity_fails_per_structure(ethanol: list[Atoms], tmp_path: Path) -> None:
    pytest.importorskip("pyscf")
    report = label_structures(ethanol[:1], "hf/sto-3g", tmp_path / "labels.xyz", multiplicity=2, progress=False)
    assert list(report.failures) == [0] and "spin" in report.failures[0].lower()


def test_parallel_workers_give_the_same_labels(ethanol: list[Atoms], tmp_path: Path) -> None:
    pytest.importorskip("tblite")
    serial = label_structures(ethanol, "gfn2-xtb", tmp_path / "serial.xyz", progress=False)
    parallel = label_structures(ethanol, "gfn2-xtb", tmp_path / "parallel.xyz", workers=2, progress=False)
    assert serial.n_labelled == parallel.n_labelled == len(ethanol)
    serial_ev, parallel_ev = _energies_by_index(tmp_path / "serial.xyz"), _energies_by_index(tmp_path / "parallel.xyz")
    assert parallel_ev == pytest.approx(serial_ev, abs=1e-8)


def test_interrupt_writes_the_structures_in_flight_then_resume_finishes(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C while two workers label: no new structure starts, the ones already running are still
    written (nothing computed is dropped), and a rerun labels the rest, each structure once."""
    pytest.importorskip("tblite")
    data = np.load(data_dir / "md17_ethanol_dft.npz")
    structures = [Atoms(numbers=data["z"], positions=data["R"][i]) for i in range(0, 400, 10)]  # 40
    out = tmp_path / "out.xyz"
    written = []

    def append_then_interrupt(path, atoms):
        append_frame(path, atoms)
        written.append(int(atoms.info["source_index"]))
        if len(written) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(labelling_runner, "append_frame", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        label_structures(structures, "gfn2-xtb", out, workers=2, progress=False)
    first_run = _energies_by_index(out)
    assert sorted(first_run) == sorted(written)
    assert len(first_run) == 2  # the other worker's structure was kept; no third one had been handed out
    monkeypatch.undo()
    report = label_structures(structures, "gfn2-xtb", out, workers=2, progress=False)
    assert report.n_already_done == len(first_run) and report.n_labelled == len(structures) - len(first_run)
    indices = [int(atoms.info["source_index"]) for atoms in ase.io.read(out, ":")]
    assert sorted(indices) == list(range(len(structures)))


@pytest.mark.parametrize(
    ("level", "package", "name"),
    [("hf/sto-3g", "pyscf", "PySCF"), ("b3lyp/6-31g*", "pyscf", "PySCF"), ("gfn2-xtb", "tblite", "tblite")],
)
def test_missing_optional_extra_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, level: str, package: str, name: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import of the package now fails
    with pytest.raises(InputError, match=rf"needs {name}: pip install 'metamlip\[qm\]'"):
        resolve_level(level)


@pytest.mark.parametrize("level", ["foo/sto-3g", "pbe+vdw-ts", "ccsdt/cc-pvdz"])
def test_unknown_method_is_an_input_error_listing_known_ones(level: str) -> None:
    with pytest.raises(InputError, match=r"unknown method .*known: .*hf.*gfn2-xtb"):
        resolve_level(level)


def test_level_checks() -> None:
    pytest.importorskip("pyscf")
    pytest.importorskip("tblite")
    assert resolve_level("HF/STO3G").name == "hf/sto-3g"
    assert resolve_level("wB97X/6-31G*").is_dft
    assert not resolve_level("ccsd(t)/cc-pvdz").has_forces
    assert resolve_level("mp2/cc-pvdz").has_forces
    bad_levels = [("hf", "needs a basis"), ("gfn2-xtb/sto-3g", "takes no basis"), ("hf/nonsense-basis", "unknown basis")]
    for level, message in bad_levels:
        with pytest.raises(InputError, match=message):
            resolve_level(level)


def test_cli_output_loads_with_the_readers(ethanol: list[Atoms], tmp_path: Path) -> None:
    pytest.importorskip("tblite")
    from metamlip.cli.main import main
    from metamlip.readers import read_level

    structures = tmp_path / "in.xyz"
    ase.io.write(structures, ethanol[:3])
    out = tmp_path / "out.xyz"
    assert main(["label", str(structures), "--level", "GFN2", "--out", str(out), "--quiet"]) == 0
    dataset = read_level(out)
    assert dataset.level == "gfn2-xtb" and len(dataset) == 3 and dataset.has_forces
    assert np.all(dataset.energies_ev < -300.0)  # eV, not Hartree (about -11.4 Eh)
    assert main(["label", str(structures), "--level", "foo/sto-3g", "--out", str(tmp_path / "x.xyz")]) == 2


def test_energy_only_method_writes_energies_without_forces(tmp_path: Path) -> None:
    pytest.importorskip("pyscf")
    from ase.build import molecule

    from metamlip.readers import read_level

    water = molecule("H2O")
    report = label_structures([water], "CCSD(T)/STO-3G", tmp_path / "cc.xyz", progress=False)
    assert report.level == "ccsd(t)/sto-3g" and report.n_labelled == 1
    dataset = read_level(tmp_path / "cc.xyz")
    assert dataset.level == "ccsd(t)/sto-3g" and not dataset.has_forces
    hf_energy_ev = calculate(resolve_level("hf/sto-3g"), water.numbers, water.positions).energy_ev
    assert dataset.energies_ev[0] < hf_energy_ev  # correlation energy is negative


def test_density_fitted_and_dispersion_corrected_levels() -> None:
    """``df-`` runs HF/DFT with density fitting (close to, not equal to, the exact SCF); ``-d3bj`` adds
    Grimme's D3(BJ) (pyscf-dispersion): both with forces = -gradient by finite differences."""
    pytest.importorskip("pyscf")
    from ase.build import molecule

    water = molecule("H2O")
    assert resolve_level("DF-HF/6-31G*").density_fitting and resolve_level("df-hf/6-31g(d)").name == "df-hf/6-31g(d)"
    exact = calculate(resolve_level("hf/6-31g(d)"), water.numbers, water.positions)
    fitted = calculate(resolve_level("df-hf/6-31g(d)"), water.numbers, water.positions)
    assert 1e-7 < abs(fitted.energy_ev - exact.energy_ev) < 1e-2  # eV: another level, a small difference
    np.testing.assert_allclose(fitted.forces_ev_per_angstrom, exact.forces_ev_per_angstrom, atol=1e-3)
    for level, message in [("df-mp2/6-31g(d)", "HF and DFT only"), ("df-gfn2-xtb", "HF and DFT only"),
                           ("hf-d3bj/6-31g(d)", "goes with a DFT functional")]:
        with pytest.raises(InputError, match=message):
            resolve_level(level)
    pytest.importorskip("pyscf.dispersion")
    spec = resolve_level("df-b3lyp-d3bj/sto-3g")
    assert spec.is_dft and spec.density_fitting and spec.has_forces
    plain = calculate(resolve_level("df-b3lyp/sto-3g"), water.numbers, water.positions)
    corrected = calculate(spec, water.numbers, water.positions)
    assert corrected.energy_ev < plain.energy_ev  # D3 dispersion is attractive
    step = FINITE_DIFFERENCE_STEP_ANGSTROM
    displaced = water.positions.copy()
    displaced[0, 2] += step
    plus = calculate(spec, water.numbers, displaced).energy_ev
    displaced[0, 2] -= 2 * step
    minus = calculate(spec, water.numbers, displaced).energy_ev
    assert corrected.forces_ev_per_angstrom[0, 2] == pytest.approx(-(plus - minus) / (2 * step), abs=2e-3)


def test_scf_that_diis_does_not_converge_falls_back_to_newton(monkeypatch) -> None:
    """An SCF stopped before convergence is finished by PySCF's second-order solver: the same energy."""
    pytest.importorskip("pyscf")
    from ase.build import molecule
    from pyscf import scf

    water = molecule("H2O")
    spec = resolve_level("hf/sto-3g")
    converged = calculate(spec, water.numbers, water.positions)
    monkeypatch.setattr(scf.hf.SCF, "max_cycle", 2)  # DIIS stops unconverged; Newton converges within 2 macro cycles
    rescued = calculate(spec, water.numbers, water.positions)
    assert rescued.energy_ev == pytest.approx(converged.energy_ev, abs=1e-6)
    # Newton stops on the orbital gradient (PySCF's default, sqrt of conv_tol): forces agree to 4e-5 eV/A here
    np.testing.assert_allclose(rescued.forces_ev_per_angstrom, converged.forces_ev_per_angstrom, atol=1e-4)

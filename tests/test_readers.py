"""Dataset readers on the real files in tests/data: counts, elements, units, levels, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import ase.data
import ase.db
import ase.io
import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from metamlip.errors import InputError
from metamlip.readers import read_dataset, read_level
from metamlip.units import BOHR_TO_ANGSTROM, HARTREE_TO_EV, KCAL_PER_MOL_TO_EV

DATA = Path(__file__).parent / "data"
MD17 = DATA / "md17_ethanol_dft.npz"
MD17_DB = DATA / "md17_ethanol_20.db"
QM7X_PADDED = DATA / "qm7x_small_200.npz"
QM7X_RAW = DATA / "qm7x_226_raw.npz"
ANI1X = DATA / "ani1x_release_sample.h5"
COMP6 = DATA / "comp6_s66x8_wb97x_631gd_4mol.h5"
SPICE = DATA / "spice_1.1.4_sample.h5"
QM7B = DATA / "qm7b_mp2_ccsd.xyz"


def raw_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def assert_message(error: pytest.ExceptionInfo, *parts: str) -> None:
    """The InputError's message contains every one of `parts` (file name, key, index)."""
    for part in parts:
        assert part in str(error.value), (part, str(error.value))


# ---------------------------------------------------------------- npz: MD17 / sGDML / QM7-X


def test_md17_npz_in_kcal_per_mol() -> None:
    raw = raw_npz(MD17)
    data = read_level(MD17, level="PBE+vdW-TS", energy_unit="kcal/mol")
    assert data.level == "pbe+vdw-ts"
    assert len(data) == 2000 and (data.n_atoms == 9).all()
    assert data.elements == [1, 6, 8]
    assert data.energies_ev.dtype == np.float64
    np.testing.assert_allclose(data.energies_ev, raw["E"][:, 0] * KCAL_PER_MOL_TO_EV, rtol=1e-14)
    np.testing.assert_allclose(data.forces_ev_per_angstrom[9:18], raw["F"][1] * KCAL_PER_MOL_TO_EV, rtol=1e-14)
    np.testing.assert_array_equal(data.positions_angstrom, raw["R"].reshape(-1, 3))
    assert data.source.endswith(MD17.name) and data.n_skipped == 0


def test_md17_npz_without_units_or_level_names_file_and_option() -> None:
    with pytest.raises(InputError) as error:
        read_level(MD17, level="pbe+vdw-ts")
    assert_message(error, MD17.name, "energy_unit")
    with pytest.raises(InputError) as error:
        read_level(MD17, energy_unit="kcal/mol")
    assert_message(error, MD17.name, "`level`")


def test_sgdml_npz_takes_units_and_level_from_file(tmp_path: Path) -> None:
    raw = raw_npz(MD17)
    path = tmp_path / "sgdml.npz"
    np.savez(
        path, R=raw["R"][:3] / BOHR_TO_ANGSTROM, z=raw["z"], E=raw["E"][:3], F=raw["F"][:3],
        e_unit=np.array("kcal/mol"), r_unit=np.array("bohr"), theory=np.array("PBE+vdW-TS"),
    )
    data = read_level(path)
    assert data.level == "pbe+vdw-ts" and len(data) == 3
    np.testing.assert_allclose(data.positions_angstrom, raw["R"][:3].reshape(-1, 3), rtol=1e-12)
    np.testing.assert_allclose(
        data.forces_ev_per_angstrom, raw["F"][:3].reshape(-1, 3) * KCAL_PER_MOL_TO_EV / BOHR_TO_ANGSTROM, rtol=1e-14
    )
    overridden = read_level(path, energy_unit="eV", level="mp2/def2-tzvp")
    assert overridden.level == "mp2/def2-tzvp"
    np.testing.assert_allclose(overridden.energies_ev, raw["E"][:3, 0], rtol=1e-14)


def test_qm7x_padded_npz_drops_padding_atoms() -> None:
    raw = raw_npz(QM7X_PADDED)
    real = raw["z"] > 0
    data = read_level(QM7X_PADDED, level="pbe0+mbd", energy_unit="eV")
    assert data.level == "pbe0+mbd" and len(data) == len(raw["E"])
    np.testing.assert_array_equal(data.n_atoms, real.sum(axis=1))
    assert data.elements == sorted(set(raw["z"][real].tolist()))
    np.testing.assert_array_equal(data.atomic_numbers, raw["z"][real])
    np.testing.assert_array_equal(data.forces_ev_per_angstrom, raw["F"][real])
    np.testing.assert_array_equal(data.energies_ev, raw["E"][:, 0])


def test_qm7x_raw_key_names_give_ev_and_pbe0_mbd() -> None:
    raw = raw_npz(QM7X_RAW)
    data = read_level(QM7X_RAW)
    assert data.level == "pbe0+mbd" and len(data) == 100 and data.elements == [1, 6]
    np.testing.assert_array_equal(data.energies_ev, raw["ePBE0+MBD"][:, 0])
    real = raw["atNUM"] > 0
    np.testing.assert_array_equal(data.forces_ev_per_angstrom, raw["totFOR"][real])


# ---------------------------------------------------------------- ANI-1x / ANI-1ccx release layout


def ani1x_expected(energy_keys: tuple[str, ...], forces_key: str | None = None) -> tuple[np.ndarray, int]:
    """Energies (Hartree) of the structures with finite labels, in file order, and the NaN count."""
    energies, skipped = [], 0
    with h5py.File(ANI1X, "r") as file:
        for name in file:
            group = file[name]
            values = sum(group[key][()] for key in energy_keys)
            keep = np.isfinite(values)
            if forces_key:
                keep &= np.isfinite(group[forces_key][()]).all(axis=(1, 2))
            energies.append(values[keep])
            skipped += int((~keep).sum())
    return np.concatenate(energies), skipped


def test_ani1x_release_every_label_is_a_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="metamlip.readers")
    datasets = {data.level: data for data in read_dataset(ANI1X)}
    assert set(datasets) == {
        "wb97x/6-31g(d)", "wb97x/def2-tzvpp", "ccsd(t)/cbs", "hf/cc-pvdz", "hf/cc-pvtz", "hf/cc-pvqz",
        "mp2/cc-pvdz", "mp2/cc-pvtz", "mp2/cc-pvqz", "npno_ccsd(t)/cc-pvdz", "npno_ccsd(t)/cc-pvtz",
        "tpno_ccsd(t)/cc-pvdz",
    }
    checks = {
        "ccsd(t)/cbs": ("ccsd(t)_cbs.energy",),
        "mp2/cc-pvtz": ("hf_tz.energy", "mp2_tz.corr_energy"),  # correlation energy on top of HF
        "wb97x/6-31g(d)": ("wb97x_dz.energy",),
    }
    for level, keys in checks.items():
        expected, skipped = ani1x_expected(keys, "wb97x_dz.forces" if level == "wb97x/6-31g(d)" else None)
        data = datasets[level]
        assert data.n_skipped == skipped and len(data) + skipped == 8
        np.testing.assert_allclose(data.energies_ev, expected * HARTREE_TO_EV, rtol=1e-14)
        assert data.elements == [1, 6, 7, 8]
    assert datasets["ccsd(t)/cbs"].n_skipped > 0  # the sample has NaN coupled-cluster labels
    assert datasets["wb97x/6-31g(d)"].has_forces and datasets["wb97x/def2-tzvpp"].has_forces
    assert not datasets["ccsd(t)/cbs"].has_forces and not datasets["hf/cc-pvdz"].has_forces
    skipped = datasets["ccsd(t)/cbs"].n_skipped
    assert f"ccsd(t)/cbs: skipped {skipped} of 8 structures with NaN labels in {ANI1X}" in caplog.text


def test_ani1x_release_forces_and_positions_in_ev_per_angstrom() -> None:
    data = read_level(ANI1X, levels=["wB97X/6-31G*"])
    with h5py.File(ANI1X, "r") as file:
        first = file[next(iter(file))]
        n = first["coordinates"].shape[1]
        np.testing.assert_allclose(data.positions_angstrom[:n], first["coordinates"][0], rtol=1e-7)
        np.testing.assert_allclose(
            data.forces_ev_per_angstrom[:n], first["wb97x_dz.forces"][0].astype(np.float64) * HARTREE_TO_EV, rtol=1e-14
        )


def test_ani1x_release_level_selection() -> None:
    selected = read_dataset(ANI1X, levels=["CCSD(T)*/CBS", "hf/ccpvqz"])
    assert [data.level for data in selected] == ["ccsd(t)/cbs", "hf/cc-pvqz"]
    assert read_level(ANI1X, level="ccsd(t)/cbs").level == "ccsd(t)/cbs"
    with pytest.raises(InputError) as error:
        read_level(ANI1X)
    assert_message(error, ANI1X.name, "ccsd(t)/cbs", "wb97x/6-31g(d)")
    with pytest.raises(InputError) as error:
        read_dataset(ANI1X, levels=["b3lyp/6-31g(d)"])
    assert_message(error, ANI1X.name, "b3lyp/6-31g(d)")


# ---------------------------------------------------------------- ANI / COMP6 layout


def test_comp6_layout_reads_lot_and_converts_hartree() -> None:
    data = read_level(COMP6)
    assert data.level == "wb97x/6-31g(d)"  # from the groups' `lot` (b'wb97x/6-31g*')
    with h5py.File(COMP6, "r") as file:
        groups = [file["s66x8"][name] for name in file["s66x8"]]
        energies = np.concatenate([group["energies"][()] for group in groups])
        forces = np.concatenate([group["forces"][()].reshape(-1, 3) for group in groups])
        symbols = {symbol.decode() for group in groups for symbol in group["species"][()]}
    assert len(data) == len(energies) == 32
    assert {ase.data.chemical_symbols[z] for z in data.elements} == symbols
    np.testing.assert_allclose(data.energies_ev, energies * HARTREE_TO_EV, rtol=1e-14)
    np.testing.assert_allclose(data.forces_ev_per_angstrom, forces.astype(np.float64) * HARTREE_TO_EV, rtol=1e-14)
    assert read_level(COMP6, level="wb97x/def2-tzvpp").level == "wb97x/def2-tzvpp"


def test_ani_layout_with_integer_species_needs_level(tmp_path: Path) -> None:
    path = tmp_path / "diatomics.h5"
    with h5py.File(COMP6, "r") as source, h5py.File(path, "w") as target:
        mol = source["s66x8/mol00"]
        group = target.create_group("006")
        numbers = np.array([ase.data.atomic_numbers[s.decode()] for s in mol["species"][()]])
        group["species"] = np.tile(numbers, (len(mol["energies"]), 1))
        for key in ("coordinates", "energies", "forces"):
            group[key] = mol[key][()]
    with pytest.raises(InputError) as error:
        read_level(path)
    assert_message(error, path.name, "`level`")
    data = read_level(path, level="wb97x/6-31g*")
    assert data.level == "wb97x/6-31g(d)" and len(data) == 8 and data.elements == [1, 8]


# ---------------------------------------------------------------- SPICE


def test_spice_units_from_attributes_and_forces_minus_gradient() -> None:
    data = read_level(SPICE)
    assert data.level == "wb97m-d3bj/def2-tzvppd"
    with h5py.File(SPICE, "r") as file:
        groups = [file[name] for name in file]
        assert file[next(iter(file))]["dft_total_gradient"].attrs["units"] == "hartree/bohr"
        energies = np.concatenate([group["dft_total_energy"][()] for group in groups])
        gradient = np.concatenate([group["dft_total_gradient"][()].reshape(-1, 3) for group in groups])
        positions = np.concatenate([group["conformations"][()].reshape(-1, 3) for group in groups])
        elements = sorted({int(z) for group in groups for z in group["atomic_numbers"][()]})
    assert len(data) == len(energies) == 55 and data.elements == elements
    np.testing.assert_allclose(data.energies_ev, energies * HARTREE_TO_EV, rtol=1e-14)
    np.testing.assert_allclose(
        data.forces_ev_per_angstrom, -gradient.astype(np.float64) * HARTREE_TO_EV / BOHR_TO_ANGSTROM, rtol=1e-14
    )
    np.testing.assert_allclose(data.positions_angstrom, positions.astype(np.float64) * BOHR_TO_ANGSTROM, rtol=1e-14)
    assert read_level(SPICE, level="wb97x/6-31g(d)", format="spice-hdf5").level == "wb97x/6-31g(d)"


# ---------------------------------------------------------------- ASE: database and extended XYZ


def test_ase_database_labels_from_row_data() -> None:
    rows = list(ase.db.connect(MD17_DB).select())
    data = read_level(MD17_DB, level="pbe+vdw-ts", energy_unit="kcal/mol")
    explicit = read_level(MD17_DB, level="pbe+vdw-ts", energy_unit="kcal/mol", energy_key="energy", forces_key="forces")
    assert len(data) == len(rows) == 20 and data.elements == [1, 6, 8]
    expected = np.array([row.data["energy"][0] for row in rows]) * KCAL_PER_MOL_TO_EV
    np.testing.assert_allclose(data.energies_ev, expected, rtol=1e-14)
    np.testing.assert_allclose(explicit.energies_ev, expected, rtol=1e-14)
    np.testing.assert_allclose(data.forces_ev_per_angstrom[:9], rows[0].data["forces"] * KCAL_PER_MOL_TO_EV, rtol=1e-14)
    np.testing.assert_allclose(data.positions_angstrom[:9], rows[0].positions)


def test_extended_xyz_energy_key_and_no_forces() -> None:
    frames = ase.io.read(QM7B, index=":")
    data = read_level(QM7B, energy_key="CCSD_energy_Ha", energy_unit="Hartree", level="CCSD/d-aug-cc-pVDZ")
    assert data.level == "ccsd/d-aug-cc-pvdz" and len(data) == 52 and not data.has_forces
    assert data.elements == sorted({int(z) for atoms in frames for z in atoms.numbers})
    np.testing.assert_allclose(data.energies_ev[3], frames[3].info["CCSD_energy_Ha"] * HARTREE_TO_EV, rtol=1e-14)
    assert data.cells_angstrom is None


def water(energy: float, forces: bool = True, **info: object) -> Atoms:
    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], info=dict(info))
    results = {"energy": energy, "forces": np.full((3, 3), 0.5)} if forces else {"energy": energy}
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def test_ase_level_and_unit_from_info_and_cells(tmp_path: Path) -> None:
    path = tmp_path / "water.extxyz"
    frames = [water(-10.0 - i, level_of_theory="MP2/aug-cc-pVTZ", energy_unit="kcal/mol") for i in range(3)]
    for atoms in frames:
        atoms.cell, atoms.pbc = np.eye(3) * 12.0, True
    ase.io.write(path, frames)
    data = read_level(path)
    assert data.level == "mp2/aug-cc-pvtz"
    np.testing.assert_allclose(data.energies_ev, [-10 * KCAL_PER_MOL_TO_EV, -11 * KCAL_PER_MOL_TO_EV, -12 * KCAL_PER_MOL_TO_EV])
    np.testing.assert_allclose(data.forces_ev_per_angstrom, 0.5 * KCAL_PER_MOL_TO_EV)
    np.testing.assert_allclose(data.cells_angstrom, np.broadcast_to(np.eye(3) * 12.0, (3, 3, 3)))
    assert data.pbc.all()
    assert np.allclose(read_level(path, energy_unit="eV").energies_ev, [-10, -11, -12])


def test_ase_mixed_forces_names_first_frame_without(tmp_path: Path) -> None:
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, [water(-1.0), water(-2.0), water(-3.0, forces=False), water(-4.0, forces=False)])
    with pytest.raises(InputError) as error:
        read_level(path, level="mp2/avtz")
    assert_message(error, path.name, "frame 2", "no forces")
    none_path = tmp_path / "no_forces.extxyz"
    ase.io.write(none_path, [water(-1.0, forces=False), water(-2.0, forces=False)])
    assert not read_level(none_path, level="mp2/avtz").has_forces


# ---------------------------------------------------------------- bad input


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InputError) as error:
        read_dataset(tmp_path / "absent.npz")
    assert_message(error, "absent.npz")
    with pytest.raises(InputError) as error:
        read_dataset(MD17, format="pdb-zip")
    assert_message(error, MD17.name, "pdb-zip", "npz", "ani-hdf5", "spice-hdf5", "ase")


def test_unknown_key_names_file_and_key() -> None:
    with pytest.raises(InputError) as error:
        read_level(MD17, level="pbe", energy_unit="kcal/mol", energy_key="E_total")
    assert_message(error, MD17.name, "'E_total'")
    with pytest.raises(InputError) as error:
        read_level(COMP6, energy_key="ccsd_energies")
    assert_message(error, COMP6.name, "s66x8/mol00", "'ccsd_energies'")
    with pytest.raises(InputError) as error:
        read_level(QM7B, energy_key="CCSDT_energy", energy_unit="hartree", level="ccsd")
    assert_message(error, QM7B.name, "frame 0", "'CCSDT_energy'")


def test_shape_mismatch_names_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "short.npz"
    raw = raw_npz(MD17)
    np.savez(path, R=raw["R"][:12], z=raw["z"], E=raw["E"][:10], F=raw["F"][:12])
    with pytest.raises(InputError) as error:
        read_level(path, level="pbe", energy_unit="kcal/mol")
    assert_message(error, path.name, "'E' has 10 rows but 'R' has 12")


def test_nan_positions_name_file_and_structure(tmp_path: Path) -> None:
    path = tmp_path / "nan.npz"
    raw = raw_npz(MD17)
    positions = raw["R"][:5].copy()
    positions[3, 2, 0] = np.nan
    np.savez(path, R=positions, z=raw["z"], E=raw["E"][:5], F=raw["F"][:5])
    with pytest.raises(InputError) as error:
        read_level(path, level="pbe", energy_unit="kcal/mol")
    assert_message(error, path.name, "structure 3", "NaN")


def test_unknown_element_symbol_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad_species.h5"
    with h5py.File(path, "w") as file:
        group = file.create_group("set/mol00")
        group["species"] = np.array([b"O", b"Xx"])
        group["coordinates"] = np.zeros((1, 2, 3)) + [[[0, 0, 0], [1, 0, 0]]]
        group["energies"] = np.zeros(1)
    with pytest.raises(InputError) as error:
        read_level(path, level="wb97x/631gd")
    assert_message(error, path.name, "set/mol00", "'Xx'")
    xyz = tmp_path / "bad.xyz"
    xyz.write_text("2\nenergy=1.0\nO 0 0 0\nXx 1 0 0\n")
    with pytest.raises(InputError) as error:
        read_level(xyz, level="pbe")
    assert_message(error, xyz.name, "Xx")


def test_format_detected_from_content(tmp_path: Path) -> None:
    renamed = tmp_path / "comp6.dat"
    renamed.write_bytes(COMP6.read_bytes())
    assert read_level(renamed).level == "wb97x/6-31g(d)"
    assert read_level(COMP6, format="ANI_HDF5").source == str(COMP6)


# ---------------------------------------------------------------- damaged files: an error, never a silent drop


def damaged_copy(source: Path, target: Path, offset: int, length: int, byte: bytes = b"\xff") -> Path:
    """A copy of `source` with `length` bytes from `offset` overwritten."""
    target.write_bytes(source.read_bytes())
    with open(target, "r+b") as handle:
        handle.seek(offset)
        handle.write(byte * length)
    return target


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_npz_names_the_file(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "truncated.npz"
    path.write_bytes(MD17.read_bytes()[: int(keep * MD17.stat().st_size)])
    with pytest.raises(InputError) as error:
        read_level(path, level="pbe", energy_unit="kcal/mol")
    assert_message(error, str(path), "truncated or damaged")


def test_damaged_npz_member_names_the_file_and_key(tmp_path: Path) -> None:
    with np.load(MD17) as archive:
        positions_bytes = archive["R"].nbytes
    middle = MD17.read_bytes().index(b"R.npy") + 200 + positions_bytes // 2  # inside the stored 'R' array
    path = damaged_copy(MD17, tmp_path / "damaged.npz", middle, 16)
    with pytest.raises(InputError) as error:
        read_level(path, level="pbe", energy_unit="kcal/mol")
    assert_message(error, str(path), "'R'")


def test_text_energies_in_npz_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "text.npz"
    raw = raw_npz(MD17)
    np.savez(path, R=raw["R"][:3], z=raw["z"], E=np.array(["-97000.1", "n/a", "-97000.3"]), F=raw["F"][:3])
    with pytest.raises(InputError) as error:
        read_level(path, level="pbe", energy_unit="kcal/mol")
    assert_message(error, str(path), "'E'", "expected numbers")


def test_damaged_hdf5_group_is_an_error_not_dropped(tmp_path: Path) -> None:
    with h5py.File(COMP6) as file:
        header = h5py.h5o.get_info(file["s66x8/mol01"].id).addr
        chunk = file["s66x8/mol02/coordinates"].id.get_chunk_info(0).byte_offset
    path = damaged_copy(COMP6, tmp_path / "header.h5", header, 64)
    with pytest.raises(InputError) as error:
        read_dataset(path)
    assert_message(error, str(path), "s66x8/mol01", "damaged")
    path = damaged_copy(COMP6, tmp_path / "chunk.h5", chunk, 32)
    with pytest.raises(InputError) as error:
        read_dataset(path)
    assert_message(error, str(path), "s66x8/mol02", "'coordinates'", "damaged")

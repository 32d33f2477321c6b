"""Nothing lost, nothing silent (issue 13): `pack` and `label` never write or delete outside their
output, and bad input is one line naming the file, key, flag or index, on small copies of real data."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest
from test_cli_errors import assert_one_line, run_cli

COMP6 = "comp6_s66x8_wb97x_631gd_4mol.h5"
COMP6_LEVEL = "wb97x/6-31g(d)"
COMP6_FOLDER = "wb97x_6-31g_d_"


def comp6_with_lots(data_dir: Path, tmp_path: Path, lots: list[str], name: str = "comp6_copy.h5") -> Path:
    """A copy of the COMP6 sample whose molecule groups store the levels `lots` (cycled) in `lot`."""
    path = tmp_path / name
    shutil.copy(data_dir / COMP6, path)
    with h5py.File(path, "r+") as file:
        for index, group in enumerate(file["s66x8"].values()):
            del group["lot"]
            group["lot"] = [lots[index % len(lots)].encode()]
    return path


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture
def workplace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder, holding a file and an (empty) output folder `out` that pack must keep."""
    place = tmp_path / "work"
    (place / "out").mkdir(parents=True)
    (place / "notes.txt").write_text("keep me\n")
    monkeypatch.chdir(place)
    return place


@pytest.mark.parametrize(("lot", "why"), [("..", "cannot name a folder"), (".", "cannot name a folder"),
                                          ("...", "cannot name a folder"), ("/", "no method before '/'")])
def test_pack_refuses_a_level_from_the_file_that_names_no_folder(data_dir, tmp_path, workplace, capsys, lot, why):
    path = comp6_with_lots(data_dir, tmp_path, [lot])
    before = files_under(tmp_path)
    assert_one_line(*run_cli(capsys, "pack", str(path), "--out", "out"), str(path), repr(lot), why)
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("level", [".", ".."])
def test_pack_refuses_a_level_option_that_names_no_folder(data_dir, tmp_path, workplace, capsys, level):
    before = files_under(tmp_path)
    code, error = run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "out", "--level", level)
    assert_one_line(code, error, "cannot name a folder")
    assert files_under(tmp_path) == before


def test_pack_keeps_a_level_with_slashes_and_dots_inside_out(data_dir, tmp_path, workplace, capsys):
    assert run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "out", "--level", "../hf/x")[0] == 0
    assert (workplace / "out" / ".._hf_x" / "meta.json").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["work"]
    assert sorted(path.name for path in workplace.iterdir()) == ["notes.txt", "out"]


def test_a_level_key_of_dots_in_the_ani1x_release_layout_is_refused(data_dir, tmp_path, workplace, capsys):
    path = tmp_path / "release_copy.h5"
    shutil.copy(data_dir / "ani1x_release_sample.h5", path)
    with h5py.File(path, "r+") as file:
        for group in file.values():
            group.move("hf_dz.energy", "...energy")  # prefix '..' is the level
    code, error = run_cli(capsys, "pack", str(path), "--out", "out")
    assert_one_line(code, error, str(path), "'..'", "cannot name a folder")
    assert sorted(path.name for path in workplace.iterdir()) == ["notes.txt", "out"]


def test_two_levels_in_one_folder_are_an_error(data_dir, tmp_path, workplace, capsys):
    path = comp6_with_lots(data_dir, tmp_path, ["mp2/cc-pvdz", "mp2_cc-pvdz"])
    code, error = run_cli(capsys, "pack", str(path), "--out", "out")
    assert_one_line(code, error, str(path), "'mp2/cc-pvdz'", "'mp2_cc-pvdz'", "mp2_cc-pvdz")


def test_pack_replaces_its_own_folder_but_not_foreign_files_or_links(data_dir, tmp_path, workplace, capsys):
    assert run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "out")[0] == 0
    assert run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "out")[0] == 0  # a rerun replaces its own files
    folder = Path("out", COMP6_FOLDER)
    (folder / "notes.txt").write_text("mine\n")
    assert_one_line(*run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "out"), str(folder), "'notes.txt'")
    assert (folder / "notes.txt").read_text() == "mine\n" and (folder / "meta.json").is_file()

    elsewhere = tmp_path / "elsewhere"
    shutil.move(folder, elsewhere)
    (elsewhere / "notes.txt").unlink()
    folder.symlink_to(elsewhere)
    before = files_under(elsewhere)
    assert_one_line(*run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "out"), str(folder), "outside the output folder")
    assert files_under(elsewhere) == before


def test_pack_into_another_levels_folder_of_an_earlier_run_is_an_error(data_dir, tmp_path, workplace, capsys):
    path = comp6_with_lots(data_dir, tmp_path, ["mp2/cc-pvdz"])
    assert run_cli(capsys, "pack", str(path), "--out", "out")[0] == 0
    other = comp6_with_lots(data_dir, tmp_path, ["mp2_cc-pvdz"], name="other.h5")
    assert_one_line(*run_cli(capsys, "pack", str(other), "--out", "out"), "'mp2/cc-pvdz'", "'mp2_cc-pvdz'")


def test_pack_out_that_is_a_file_is_an_error(data_dir, workplace, capsys):
    assert_one_line(*run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "notes.txt"), "notes.txt", "not a folder")
    assert (workplace / "notes.txt").read_text() == "keep me\n"

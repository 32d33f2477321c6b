"""Nothing lost, nothing silent (issue 13): `pack` and `label` never write or delete outside their
output, and bad input is one line naming the file, key, flag or index, on small copies of real data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import h5py
import numpy as np
import pytest
from ase import Atoms
from test_cli_errors import assert_one_line, run_cli

from metamlip.cli.main import main
from metamlip.data.references import EnergyReference
from metamlip.errors import OptionError
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.potential import build_potential
from metamlip.training.checkpoint import save_checkpoint
from metamlip.labelling.fingerprint import input_record_path

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


def test_pack_after_a_kill_while_writing_meta_json_packs_again(data_dir, workplace, capsys):
    """meta.json, written last, marks a folder complete and is written atomically: a pack killed while
    writing it leaves the folder without it plus the writer's temporary file, which a rerun clears."""
    assert run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "out")[0] == 0
    folder = Path("out", COMP6_FOLDER)
    complete = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").unlink()
    (folder / ".meta.json.k1ll3d_x.tmp").write_text('{"format": "metamlip-pa')
    assert run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "out")[0] == 0
    assert json.loads((folder / "meta.json").read_text()) == complete
    assert not list(folder.glob(".*.tmp"))


def test_pack_into_another_levels_folder_of_an_earlier_run_is_an_error(data_dir, tmp_path, workplace, capsys):
    path = comp6_with_lots(data_dir, tmp_path, ["mp2/cc-pvdz"])
    assert run_cli(capsys, "pack", str(path), "--out", "out")[0] == 0
    other = comp6_with_lots(data_dir, tmp_path, ["mp2_cc-pvdz"], name="other.h5")
    assert_one_line(*run_cli(capsys, "pack", str(other), "--out", "out"), "'mp2/cc-pvdz'", "'mp2_cc-pvdz'")


def test_pack_out_that_is_a_file_is_an_error(data_dir, workplace, capsys):
    assert_one_line(*run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "notes.txt"), "notes.txt", "not a folder")
    assert (workplace / "notes.txt").read_text() == "keep me\n"


# ---- label: an --out that is not this input's label output is refused, never truncated ----

@pytest.fixture
def ethanol_xyz(data_dir: Path, tmp_path: Path) -> Path:
    """Three MD17 ethanol geometries (no labels) as extended XYZ."""
    pytest.importorskip("tblite")
    data = np.load(data_dir / "md17_ethanol_dft.npz")
    path = tmp_path / "ethanol.xyz"
    ase.io.write(path, [Atoms(numbers=data["z"], positions=data["R"][i]) for i in range(3)])
    return path


def label(capsys, structures: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli(capsys, "label", str(structures), "--level", "gfn2-xtb", "--out", str(out), "--quiet", *extra)


def test_label_refuses_a_file_that_is_not_its_output(ethanol_xyz, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nnot structures\n")
    assert_one_line(*label(capsys, ethanol_xyz, notes), str(notes), "not a metamlip label output", "--out")
    assert notes.read_text() == "my notes\nnot structures\n"


def test_label_refuses_the_input_as_out(ethanol_xyz, capsys):
    before = ethanol_xyz.read_bytes()
    assert_one_line(*label(capsys, ethanol_xyz, ethanol_xyz), str(ethanol_xyz), "--out is the input file")
    assert ethanol_xyz.read_bytes() == before


def test_label_resumes_only_the_same_input_and_settings(ethanol_xyz, tmp_path, capsys):
    out = tmp_path / "labels.xyz"
    assert label(capsys, ethanol_xyz, out)[0] == 0
    labelled = out.read_bytes()
    assert main(["label", str(ethanol_xyz), "--level", "gfn2-xtb", "--out", str(out), "--quiet"]) == 0
    assert "0 labelled, 3 already in" in capsys.readouterr().out
    assert out.read_bytes() == labelled

    other = tmp_path / "other.xyz"
    frames = ase.io.read(ethanol_xyz, ":")
    frames[1].positions[0, 0] += 0.01
    ase.io.write(other, frames)
    assert_one_line(*label(capsys, other, out), str(out), "other input structures", "--out")
    assert_one_line(*label(capsys, ethanol_xyz, out, "--charge", "2"), str(out), "charge 0 (this run: 2)")
    code, error = run_cli(capsys, "label", str(ethanol_xyz), "--level", "gfn1-xtb", "--out", str(out), "--quiet")
    assert_one_line(code, error, str(out), "'gfn2-xtb' (this run: 'gfn1-xtb')")
    assert out.read_bytes() == labelled


def test_label_output_without_fingerprint_says_what_to_do(ethanol_xyz, tmp_path, capsys):
    out = tmp_path / "old.xyz"
    assert label(capsys, ethanol_xyz, out)[0] == 0
    input_record_path(out).unlink()  # as written before fingerprints existed
    labelled = out.read_bytes()
    assert_one_line(*label(capsys, ethanol_xyz, out), str(out), "without input fingerprints", "new --out")
    assert out.read_bytes() == labelled


def test_impossible_charge_names_the_flag_and_structure(ethanol_xyz, tmp_path, capsys):
    out = tmp_path / "labels.xyz"
    assert_one_line(*label(capsys, ethanol_xyz, out, "--charge", "30"), "structure 0", "--charge 30", "-4 electrons")
    assert_one_line(*label(capsys, ethanol_xyz, out, "--multiplicity", "40"), "structure 0", "--multiplicity 40")
    assert not out.exists()


def test_label_workers_end_when_the_parent_is_killed(data_dir, tmp_path):
    pytest.importorskip("pyscf")
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    data = np.load(data_dir / "md17_ethanol_dft.npz")
    structures = tmp_path / "ethanol.xyz"
    ase.io.write(structures, [Atoms(numbers=data["z"], positions=data["R"][i]) for i in range(8)])
    command = [sys.executable, "-m", "metamlip", "label", str(structures), "--level", "b3lyp/6-31g(d)",
               "--out", str(tmp_path / "out.xyz"), "--workers", "2", "--quiet"]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers = wait_for(lambda: pool_workers(parent.pid) if len(pool_workers(parent.pid)) == 2 else None, 120)
        assert workers and parent.poll() is None, "the label run ended before its workers could be seen"
    finally:
        parent.kill()
        parent.wait()
    ended = wait_for(lambda: not any(alive(pid) for pid in workers) or None, 10)
    for pid in [pid for pid in workers if alive(pid)]:  # leave no orphans behind a failing test
        os.kill(pid, signal.SIGKILL)
    assert ended, f"workers {workers} outlived their parent"


def test_ctrl_c_to_label_writes_the_structures_in_flight(data_dir, tmp_path):
    """SIGINT to `metamlip label` with 2 workers: exit 130, and the structures being computed are
    written before it exits (the workers ignore SIGINT; the parent starts no new one)."""
    pytest.importorskip("pyscf")
    data = np.load(data_dir / "md17_ethanol_dft.npz")
    structures = tmp_path / "ethanol.xyz"
    ase.io.write(structures, [Atoms(numbers=data["z"], positions=data["R"][i]) for i in range(0, 400, 10)])  # 40
    out = tmp_path / "out.xyz"
    command = [sys.executable, "-m", "metamlip", "label", str(structures), "--level", "hf/6-31g(d)",
               "--out", str(out), "--workers", "2", "--quiet"]
    # SIGINT back to its default in the child: a test run started in the background (`pytest &` in a
    # script) inherits it ignored, and Python then installs no KeyboardInterrupt handler
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = wait_for(lambda: out.exists() and len(ase.io.read(out, ":")) >= 1, 180)
        assert first and parent.poll() is None, "the label run ended before it could be interrupted"
        parent.send_signal(signal.SIGINT)
        code = parent.wait(timeout=180)
    finally:
        parent.kill()
        parent.wait()
    stderr = parent.stderr.read().decode()
    assert code == 130, stderr
    assert "in flight are finished and written first" in stderr
    assert 2 <= len(ase.io.read(out, ":")) < 40


def pool_workers(parent_pid: int) -> list[int]:
    """Process ids of the multiprocessing pool workers whose parent is `parent_pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent_pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for a reaper counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(condition, seconds: float):
    """The first truthy value of `condition()` within `seconds` (polled every 0.1 s), else None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return None


# ---- readers: a damaged file is one line naming the file and group, never silently shorter ----

def test_pack_of_a_damaged_hdf5_group_is_one_line(data_dir, tmp_path, workplace, capsys):
    path = tmp_path / "damaged.h5"
    shutil.copy(data_dir / COMP6, path)
    with h5py.File(path, "r") as file:
        header = h5py.h5o.get_info(file["s66x8/mol01"].id).addr
    with open(path, "r+b") as handle:
        handle.seek(header)
        handle.write(b"\xff" * 64)
    assert_one_line(*run_cli(capsys, "pack", str(path), "--out", "out"), f"{path}:s66x8/mol01", "damaged")


# ---- a folder where a file belongs, and messages that name the flags the user typed ----

@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A small untrained model for MD17 ethanol's elements at level pbe+vdw-ts."""
    model = build_potential([1, 6, 8], HipnnConfig(n_features=8, n_sensitivities=4, n_interaction_layers=1, n_atom_layers=1), seed=0)
    model.add_level(EnergyReference("pbe+vdw-ts", [1, 6, 8], np.zeros(3)))
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    return path


def test_evaluate_names_the_flags_not_the_keywords(checkpoint, data_dir, capsys):
    md17 = str(data_dir / "md17_ethanol_dft.npz")
    code, error = run_cli(capsys, "evaluate", str(checkpoint), md17, "--data-level", "pbe+vdw-ts")
    assert_one_line(code, error, "md17_ethanol_dft.npz", "pass --energy-unit (e.g. --energy-unit kcal/mol)")
    code, error = run_cli(capsys, "evaluate", str(checkpoint), md17, "--energy-unit", "kcal/mol")
    assert_one_line(code, error, "pass --data-level (e.g. --data-level wb97x/6-31g(d))")
    assert "energy_unit" not in error and "level=" not in error


def test_pack_names_its_flags(data_dir, workplace, capsys):
    code, error = run_cli(capsys, "pack", str(data_dir / COMP6), "--out", "out", "--levels", "/")
    assert_one_line(code, error, "--levels:", "no method before '/'")


def test_a_folder_given_as_a_file_says_so(checkpoint, data_dir, tmp_path, workplace, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for arguments in (["evaluate", str(checkpoint), str(folder)], ["pack", str(folder), "--out", "out"],
                      ["label", str(folder), "--level", "gfn2-xtb", "--out", "x.xyz"]):
        assert_one_line(*run_cli(capsys, *arguments), str(folder), "is a folder")
    assert_one_line(*run_cli(capsys, "label", str(data_dir / "qm7b_mp2_ccsd.xyz"), "--level", "gfn2-xtb", "--out", str(folder)),
                    str(folder), "is a folder")
    notes = str(workplace / "notes.txt")
    code, error = run_cli(capsys, "evaluate", str(checkpoint), str(data_dir / "md17_ethanol_dft.npz"), "--energy-unit",
                          "kcal/mol", "--data-level", "pbe+vdw-ts", "--out", notes + "/metrics")
    assert_one_line(code, error, "notes.txt/metrics", "is a file, not a folder")
    code, error = run_cli(capsys, "evaluate", str(checkpoint), str(data_dir / "md17_ethanol_dft.npz"), "--energy-unit",
                          "kcal/mol", "--data-level", "pbe+vdw-ts", "--out", notes)
    assert_one_line(code, error, "notes.txt: is a file, not a folder")


def test_pack_level_picks_a_level_of_an_ani1x_release_file(data_dir, workplace, capsys):
    release = str(data_dir / "ani1x_release_sample.h5")
    assert run_cli(capsys, "pack", release, "--out", "out", "--level", "wB97X/6-31G*")[0] == 0
    assert sorted(path.name for path in (workplace / "out").iterdir()) == [COMP6_FOLDER]
    assert_one_line(*run_cli(capsys, "pack", release, "--out", "out", "--level", "nope"), "no level 'nope'", "'hf/cc-pvdz'")


def test_option_error_words_keywords_and_flags_and_keeps_braces():
    error = OptionError("data{1}.npz: the file does not say its energy unit; pass {option} (e.g. {setting})", "energy_unit", "kcal/mol")
    assert str(error) == "data{1}.npz: the file does not say its energy unit; pass the option `energy_unit` (e.g. energy_unit='kcal/mol')"
    assert error.for_flag("--energy-unit") == "data{1}.npz: the file does not say its energy unit; pass --energy-unit (e.g. --energy-unit kcal/mol)"


def test_evaluate_names_the_energy_key_flag(checkpoint, data_dir, capsys):
    code, error = run_cli(capsys, "evaluate", str(checkpoint), str(data_dir / "qm7b_mp2_ccsd.xyz"), "--data-level", "mp2")
    assert_one_line(code, error, "qm7b_mp2_ccsd.xyz, frame 0", "pass --energy-key")
    code, error = run_cli(capsys, "evaluate", str(checkpoint), str(data_dir / "qm7b_mp2_ccsd.xyz"), "--data-level", "mp2",
                          "--energy-key", "MP2_energy_Ha", "--energy-unit", "hartree")
    assert_one_line(code, error, "qm7b_mp2_ccsd.xyz", "atomic number")  # read with the key; the model lacks N and S


def test_an_atomic_write_that_fails_keeps_the_old_file_and_leaves_nothing_else(tmp_path):
    """Every JSON and checkpoint metamlip writes goes through `metamlip.atomic_files`: a write that
    stops half way (here: an exception after some bytes) leaves the previous file whole."""
    import json

    from metamlip.atomic_files import write_atomically, write_json_atomically

    path = tmp_path / "scores" / "result.json"
    write_json_atomically(path, {"score": 1.0})
    assert json.loads(path.read_text()) == {"score": 1.0}

    def half_then_fail(stream):
        stream.write(b'{"score": 2.')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, half_then_fail)
    with pytest.raises(TypeError):
        write_json_atomically(path, {"score": object()})  # not serialisable: fails before any file is opened
    assert json.loads(path.read_text()) == {"score": 1.0}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]

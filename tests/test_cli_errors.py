"""Bad input through the command line: one line naming the key, file or index; exit code 2; no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from metamlip.cli.main import main
from metamlip.data.references import EnergyReference
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.potential import build_potential
from metamlip.training.checkpoint import save_checkpoint


def run_cli(capsys, *arguments: str) -> tuple[int, str]:
    code = main(list(arguments))
    error = capsys.readouterr().err.strip()
    return code, error


def ethanol_config(tmp_path: Path, data_dir: Path, **changes) -> Path:
    config = {
        "datasets": [{"path": str(data_dir / "md17_ethanol_dft.npz"), "energy_unit": "kcal/mol", "level": "pbe+vdw-ts"}],
        "split": {"train": 20, "validation": 5, "test": 5},
        "model": {"n_features": 8, "n_sensitivities": 4, "n_interaction_layers": 1, "n_atom_layers": 1},
        "training": {"max_epochs": 1, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    config.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def assert_one_line(code: int, error: str, *fragments: str) -> None:
    assert code == 2
    assert len(error.splitlines()) == 1, error
    assert "Traceback" not in error
    for fragment in fragments:
        assert fragment in error, error


def test_unknown_config_key(tmp_path, data_dir, capsys):
    config = ethanol_config(tmp_path, data_dir, training={"lerning_rate": 0.1})
    assert_one_line(*run_cli(capsys, "train", str(config)), "training.lerning_rate", "config.yaml")


def test_unknown_key_in_set_override(tmp_path, data_dir, capsys):
    config = ethanol_config(tmp_path, data_dir)
    assert_one_line(*run_cli(capsys, "train", str(config), "--set", "model.widht=3"), "model.widht")


def test_wrong_type_names_the_key(tmp_path, data_dir, capsys):
    config = ethanol_config(tmp_path, data_dir)
    assert_one_line(*run_cli(capsys, "train", str(config), "--set", "training.batch_size=many"), "training.batch_size")


def test_missing_config_and_data_files(tmp_path, data_dir, capsys):
    assert_one_line(*run_cli(capsys, "train", str(tmp_path / "absent.yaml")), "absent.yaml")
    config = ethanol_config(tmp_path, data_dir, datasets=[{"path": "nowhere.npz", "energy_unit": "eV", "level": "x"}])
    assert_one_line(*run_cli(capsys, "train", str(config)), "nowhere.npz", "datasets[0].path")


def test_shape_mismatch_names_the_file_and_key(tmp_path, data_dir, capsys):
    source = np.load(data_dir / "md17_ethanol_dft.npz")
    bad = tmp_path / "bad_shapes.npz"
    np.savez(bad, R=source["R"][:12], z=source["z"], E=source["E"][:10], F=source["F"][:12])
    config = ethanol_config(tmp_path, data_dir, datasets=[{"path": str(bad), "energy_unit": "kcal/mol", "level": "x"}])
    assert_one_line(*run_cli(capsys, "train", str(config)), "bad_shapes.npz", "E")


def test_nan_positions_name_the_structure(tmp_path, data_dir, capsys):
    source = np.load(data_dir / "md17_ethanol_dft.npz")
    positions = source["R"][:30].copy()
    positions[17, 4, 1] = np.nan
    bad = tmp_path / "nan_positions.npz"
    np.savez(bad, R=positions, z=source["z"], E=source["E"][:30], F=source["F"][:30])
    config = ethanol_config(tmp_path, data_dir, datasets=[{"path": str(bad), "energy_unit": "kcal/mol", "level": "x"}])
    assert_one_line(*run_cli(capsys, "train", str(config)), "nan_positions.npz", "17")


def test_unknown_element_at_evaluation(tmp_path, data_dir, capsys):
    model = build_potential([1, 6, 8], HipnnConfig(n_features=8, n_sensitivities=4, n_interaction_layers=1, n_atom_layers=1), seed=0)
    model.add_level(EnergyReference("pbe+vdw-ts", [1, 6, 8], np.zeros(3)))
    checkpoint = tmp_path / "model.pt"
    save_checkpoint(checkpoint, model)
    code, error = run_cli(capsys, "evaluate", str(checkpoint), str(data_dir / "qm7x_226_raw.npz"))
    assert code == 0, error  # C and H only: fine
    code, error = run_cli(
        capsys, "evaluate", str(checkpoint), str(data_dir / "qm7x_small_200.npz"), "--energy-unit", "eV", "--data-level", "pbe0+mbd"
    )
    assert_one_line(code, error, "qm7x_small_200.npz", "atomic number", "7")


def test_not_a_checkpoint(tmp_path, data_dir, capsys):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert_one_line(*run_cli(capsys, "evaluate", str(bogus), str(data_dir / "qm7x_226_raw.npz")), "model.pt")


def test_error_through_the_installed_command_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "metamlip", "train", str(tmp_path / "absent.yaml")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"metamlip train: error: {tmp_path / 'absent.yaml'}: no such config file"]


def test_commands_that_do_not_run_under_torchrun_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["experiment", str(tmp_path / "any.yaml")]) == 2
    message = capsys.readouterr().err.strip()
    assert message == "metamlip experiment: error: only train, pretrain, finetune run under torchrun"


def test_every_command_prints_its_help(capsys):
    """--help of every subcommand exits 0 with its usage (an empty exclusive group broke it on Python 3.11)."""
    from metamlip.cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"experiment", "select", "demo", "train"} <= set(commands)
    for command in commands:
        try:
            main([command, "--help"])
        except SystemExit as exit:
            assert exit.code == 0, command
        assert f"usage: metamlip {command}" in capsys.readouterr().out, command

"""Bad input, diverging runs, reruns, kills and interrupts of train/pretrain/finetune: one clear line,
a non-zero exit, nothing lost (issue 13); also the examples, --print-defaults, threads and TensorBoard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metamlip.cli.main import main
from metamlip.config import TrainConfig, default_mapping
from metamlip.data.batching import StructureBatcher
from metamlip.data.references import EnergyReference
from metamlip.errors import InputError
from metamlip.experiment.config import ExperimentConfig, FinetuneConfig, PretrainConfig
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.potential import build_potential
from metamlip.readers import read_level
from metamlip.training.checkpoint import load_potential, read_checkpoint, save_checkpoint
from metamlip.training.loop import MixedBatchEpochs, Task, TrainingDiverged, TrainingSettings, fit
from metamlip.training.run_training import default_threads

REPOSITORY = Path(__file__).resolve().parents[1]
TINY_MODEL = {"n_features": 8, "n_sensitivities": 4, "n_interaction_layers": 1, "n_atom_layers": 1}


def run_cli(capsys, *arguments: str) -> tuple[int, str]:
    code = main(list(arguments))
    return code, capsys.readouterr().err.strip()


def assert_one_line(code: int, error: str, *fragments: str, exit_code: int = 2) -> None:
    assert code == exit_code, error
    assert len(error.splitlines()) == 1, error
    assert "Traceback" not in error
    for fragment in fragments:
        assert fragment in error, error


def train_config(tmp_path: Path, data_dir: Path, name: str = "config", **training) -> Path:
    config = {
        "datasets": [{"path": str(data_dir / "md17_ethanol_dft.npz"), "energy_unit": "kcal/mol", "level": "pbe+vdw-ts"}],
        "split": {"train": 20, "validation": 5, "test": 5},
        "model": TINY_MODEL,
        "training": {"max_epochs": 2, "progress": False, "batch_size": 8, "checkpoint_interval_seconds": 0, **training},
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def small_npz(tmp_path: Path, data_dir: Path, n: int = 30) -> Path:
    source = np.load(data_dir / "md17_ethanol_dft.npz")
    path = tmp_path / f"ethanol_{n}.npz"
    np.savez(path, R=source["R"][:n], z=source["z"], E=source["E"][:n], F=source["F"][:n])
    return path


def pretrained_checkpoint(tmp_path: Path) -> Path:
    model = build_potential([1, 6, 8], HipnnConfig(**TINY_MODEL), seed=0)
    model.add_level(EnergyReference("gfn2-xtb", [1, 6, 8], np.zeros(3)))
    path = tmp_path / "pretrained.pt"
    save_checkpoint(path, model, extra={"strategy": "joint"})
    return path


def finetune_config(tmp_path: Path, data_dir: Path, **changes) -> Path:
    config = {
        "checkpoint": str(pretrained_checkpoint(tmp_path)),
        "dataset": {"path": str(small_npz(tmp_path, data_dir)), "energy_unit": "kcal/mol", "level": "pbe+vdw-ts"},
        "n_finetune": 10, "n_validation": 4, "n_test": 6,
        "training": {"max_epochs": 1, "batch_size": 4, "progress": False},
        "output_dir": str(tmp_path / "ft"),
        **changes,
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def strict_lines(path: Path) -> list[dict]:
    def refuse(token: str) -> None:
        raise AssertionError(f"{path}: non-standard JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text(encoding="utf-8").splitlines()]


# -- divergence, empty budgets and splits that do not fit ------------------------------------------


def test_diverged_run_stops_with_one_line_and_writes_no_model(tmp_path, data_dir, capsys):
    config = train_config(tmp_path, data_dir, learning_rate=1.0e6, max_epochs=5)
    assert_one_line(*run_cli(capsys, "train", str(config)), "diverged", "training.learning_rate")
    assert not (tmp_path / "run" / "model.pt").exists()
    records = strict_lines(tmp_path / "run" / "log.jsonl")  # NaN and infinity are written as null
    assert None in records[-1].values()


class _DivergesAtEpoch3(MixedBatchEpochs):
    def run_epoch(self, model, optimizer, epoch):
        metrics = super().run_epoch(model, optimizer, epoch)
        return metrics if epoch < 3 else {**metrics, "loss": float("nan")}


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    data = read_level(data_dir / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level="pbe+vdw-ts").subset(range(24))
    model = build_potential(data.elements, HipnnConfig(**TINY_MODEL), seed=0)
    model.add_level(EnergyReference.fit(data, model.species))
    task = Task("pbe+vdw-ts", StructureBatcher(data.subset(range(16)), model.species, 6.5), StructureBatcher(data.subset(range(16, 24)), model.species, 6.5))
    settings = TrainingSettings(batch_size=8, max_epochs=5, progress=False, checkpoint_interval_seconds=0)
    with pytest.raises(TrainingDiverged, match="epoch 3.*checkpoint.pt \\(epoch 2\\)"):
        fit(model, _DivergesAtEpoch3([task], settings), [task], settings, tmp_path)
    saved = read_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["training_state"]["epoch"] == 2
    assert all(torch.isfinite(tensor).all() for tensor in saved["state_dict"].values())
    assert not (tmp_path / "model.pt").exists()
    assert [record["train_loss"] is None for record in strict_lines(tmp_path / "log.jsonl")] == [False, False, True]


def test_zero_epochs_is_an_error(tmp_path, data_dir, capsys):
    config = train_config(tmp_path, data_dir)
    assert_one_line(*run_cli(capsys, "train", str(config), "--set", "training.max_epochs=0"), "training.max_epochs")
    assert not (tmp_path / "run").exists()


def test_split_larger_than_the_data_names_the_keys(tmp_path, data_dir, capsys):
    config = train_config(tmp_path, data_dir)
    code, error = run_cli(
        capsys, "train", str(config), "--set", f"datasets=[{{path: {small_npz(tmp_path, data_dir)}, energy_unit: kcal/mol, level: x}}]",
        "--set", "split={train: 100}",
    )
    assert_one_line(code, error, "split.train 100", "more than the 30")


def test_finetune_larger_than_the_data_names_n_finetune(tmp_path, data_dir, capsys):
    code, error = run_cli(capsys, "finetune", str(finetune_config(tmp_path, data_dir, n_finetune=1000, n_validation=None, n_test=None)))
    assert_one_line(code, error, "n_finetune 1000", "more than the 30")
    assert not (tmp_path / "ft").exists()


# -- config values, files and flags --------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.learning_rate=0", "training.learning_rate"),
        ("training.learning_rate=-0.01", "training.learning_rate"),
        ("training.batch_size=0", "training.batch_size"),
        ("training.threads=-2", "training.threads"),
        ("model.n_features=0", "model.n_features"),
        ("model.cutoff_angstrom=-1", "model.cutoff_angstrom"),
        ("training.device=gpu0", "training.device"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, data_dir, capsys, override, key):
    assert_one_line(*run_cli(capsys, "train", str(train_config(tmp_path, data_dir)), "--set", override), key, "config.yaml")


def test_out_of_range_values_in_nested_sections_and_lists(tmp_path, data_dir, capsys):
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump({"finetune": {"n_finetune": [10, 0]}}), encoding="utf-8")
    assert_one_line(*run_cli(capsys, "experiment", str(config)), "finetune.n_finetune")
    config.write_text(yaml.safe_dump({"pretrain": {"steps_per_epoch": 0}}), encoding="utf-8")
    assert_one_line(*run_cli(capsys, "pretrain", str(config)), "pretrain.steps_per_epoch")
    config.write_text(yaml.safe_dump({"pretrain": {"training": {"learning_rate": -1}}}), encoding="utf-8")
    assert_one_line(*run_cli(capsys, "pretrain", str(config)), "pretrain.training.learning_rate")


def test_binary_config_file(tmp_path, capsys):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    assert_one_line(*run_cli(capsys, "pretrain", str(binary)), "model.yaml", "UTF-8")


def test_invalid_yaml_in_set(tmp_path, data_dir, capsys):
    config = train_config(tmp_path, data_dir)
    assert_one_line(*run_cli(capsys, "train", str(config), "--set", "training.learning_rate=[0.1"), "--set", "training.learning_rate")


def test_output_dir_that_is_a_file(tmp_path, data_dir, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me", encoding="utf-8")
    config = train_config(tmp_path, data_dir)
    assert_one_line(*run_cli(capsys, "train", str(config), "--set", f"output_dir={notes}"), "output_dir", "notes.txt")
    assert notes.read_text(encoding="utf-8") == "keep me"


def test_hand_edited_checkpoints_are_named(tmp_path, data_dir, capsys):
    original = read_checkpoint(pretrained_checkpoint(tmp_path))
    edits = {
        "no_version.pt": lambda payload: payload.pop("format_version"),
        "bad_dtype.pt": lambda payload: payload.update(dtype="float7"),
        "wrong_shape.pt": lambda payload: payload["state_dict"].update(
            {name: torch.zeros(3, 3) for name in list(payload["state_dict"])[:1]}
        ),
        "bad_model.pt": lambda payload: payload["model"].pop("species"),
    }
    for name, edit in edits.items():
        payload = read_checkpoint(tmp_path / "pretrained.pt")
        edit(payload)
        torch.save(payload, tmp_path / name)
        with pytest.raises(InputError, match=f"{name}: damaged checkpoint"):
            load_potential(tmp_path / name)
        code, error = run_cli(capsys, "evaluate", str(tmp_path / name), str(data_dir / "qm7x_226_raw.npz"))
        assert_one_line(code, error, name, "damaged")
    assert original["format_version"] == 1
    assert_one_line(*run_cli(capsys, "evaluate", str(tmp_path), str(data_dir / "qm7x_226_raw.npz")), "a folder, not a checkpoint")


def test_damaged_training_state_cannot_be_resumed(tmp_path, data_dir, capsys):
    config = train_config(tmp_path, data_dir)
    assert main(["train", str(config)]) == 0
    payload = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    del payload["training_state"]["optimizer"]
    torch.save(payload, tmp_path / "run" / "checkpoint.pt")
    capsys.readouterr()
    assert_one_line(*run_cli(capsys, "train", str(config), "--resume"), "checkpoint.pt", "damaged training state")


# -- reruns, leftovers, interrupts ---------------------------------------------------------------


def test_rerun_needs_resume_or_overwrite(tmp_path, data_dir, capsys):
    config = train_config(tmp_path, data_dir)
    assert main(["train", str(config)]) == 0
    model_bytes = (tmp_path / "run" / "model.pt").read_bytes()
    capsys.readouterr()
    assert_one_line(*run_cli(capsys, "train", str(config)), "already holds a run", "--resume", "--overwrite")
    assert (tmp_path / "run" / "model.pt").read_bytes() == model_bytes
    assert main(["train", str(config), "--resume", "--set", "training.max_epochs=3"]) == 0
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["training_state"]["epoch"] == 3
    assert main(["train", str(config), "--overwrite"]) == 0
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["training_state"]["epoch"] == 2


def test_finetune_rerun_needs_overwrite_and_writes_test_metrics(tmp_path, data_dir, capsys):
    config = finetune_config(tmp_path, data_dir)
    assert main(["finetune", str(config)]) == 0
    metrics = json.loads((tmp_path / "ft" / "test_metrics.json").read_text(encoding="utf-8"))
    assert metrics["pbe+vdw-ts"]["n_structures"] == 6
    capsys.readouterr()
    assert_one_line(*run_cli(capsys, "finetune", str(config)), "already holds a run", "--resume", "--overwrite")
    assert main(["finetune", str(config), "--resume", "--set", "training.max_epochs=2"]) == 0
    assert read_checkpoint(tmp_path / "ft" / "checkpoint.pt")["training_state"]["epoch"] == 2
    assert main(["finetune", str(config), "--overwrite"]) == 0


def test_leftover_temporary_checkpoints_are_removed_on_start(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    leftovers = [run_dir / ".checkpoint.pt.k1ll3d.tmp", run_dir / ".model.pt.abc.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    assert main(["train", str(train_config(tmp_path, data_dir))]) == 0
    assert not any(path.exists() for path in leftovers)


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_a_checkpoint_before_exiting(tmp_path, data_dir, signal_number, exit_code):
    config = train_config(tmp_path, data_dir, max_epochs=10_000, checkpoint_interval_seconds=3600)
    command = [sys.executable, "-m", "metamlip", "train", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log_path = tmp_path / "run" / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not (log_path.exists() and log_path.read_text()):
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read()
    os.kill(process.pid, signal_number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"metamlip train: {signal.Signals(signal_number).name}: stopped after epoch") and "--resume" in last, stderr
    epoch = read_checkpoint(tmp_path / "run" / "checkpoint.pt")["training_state"]["epoch"]
    assert epoch >= 1 and epoch == len(strict_lines(log_path))


# -- threads, log, TensorBoard -------------------------------------------------------------------


def test_default_threads_follow_the_structure_size(tmp_path, data_dir, monkeypatch, caplog):
    assert default_threads(9.0) == 1
    assert 1 <= default_threads(200.0) <= 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "10000")
    assert default_threads(200.0) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    with caplog.at_level("INFO", logger="metamlip.training"):
        assert main(["train", str(train_config(tmp_path, data_dir, max_epochs=1))]) == 0
    assert asked == [1]
    assert "using 1 PyTorch thread (default for 9 atoms per structure" in caplog.text


def test_tensorboard_without_the_package_names_the_extra(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if tensorboard were missing
    config = train_config(tmp_path, data_dir, tensorboard=True)
    assert_one_line(*run_cli(capsys, "train", str(config)), "training.tensorboard", "metamlip[tensorboard]")


def test_tensorboard_logs_every_epoch_per_level(tmp_path, data_dir):
    pytest.importorskip("tensorboard", reason="the optional tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = {
        "datasets": [{"path": str(data_dir / "qm7x_226_raw.npz")}, {"path": str(data_dir / "comp6_s66x8_wb97x_631gd_4mol.h5")}],
        "strategy": "multihead", "model": {**TINY_MODEL, "cutoff_angstrom": 5.0}, "output_dir": str(tmp_path / "pre"),
        "pretrain": {"gradient_steps": 4, "steps_per_epoch": 2, "validation_fraction": 0.3,
                     "training": {"batch_size": 4, "progress": False, "tensorboard": True}},
    }
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["pretrain", str(tmp_path / "pretrain.yaml")]) == 0
    events = EventAccumulator(str(tmp_path / "pre" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train_loss", "val_loss", "learning_rate"} <= set(tags)
    per_level = [tag for tag in tags if tag.startswith("val_loss/")]
    assert len(per_level) == 2, tags
    assert [event.step for event in events.Scalars("train_loss")] == [1, 2]


# -- examples and --print-defaults ---------------------------------------------------------------


@pytest.mark.parametrize(
    "command, cls",
    [("train", TrainConfig), ("pretrain", PretrainConfig), ("finetune", FinetuneConfig), ("experiment", ExperimentConfig)],
)
def test_print_defaults_lists_every_key(capsys, command, cls):
    assert main([command, "--print-defaults"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == default_mapping(cls)
    training = printed["training"] if "training" in printed else printed["pretrain"]["training"]
    assert training["learning_rate"] == 1.0e-3 and training["tensorboard"] is False


def test_the_examples_run(tmp_path, capsys):
    examples = REPOSITORY / "examples"
    tiny = ["--set", "model.n_features=8", "--set", "model.n_sensitivities=4", "--set", "model.n_interaction_layers=1"]
    assert main(["pretrain", str(examples / "pretrain_ethanol.yaml"), *tiny, "--set", "pretrain.gradient_steps=4",
                 "--set", "pretrain.steps_per_epoch=2", "--set", f"output_dir={tmp_path / 'pre'}"]) == 0
    assert main(["finetune", str(examples / "finetune_ethanol.yaml"), "--set", f"checkpoint={tmp_path / 'pre' / 'model.pt'}",
                 "--set", "training.max_epochs=1", "--set", "n_finetune=5", "--set", f"output_dir={tmp_path / 'ft'}"]) == 0
    assert (tmp_path / "ft" / "test_metrics.json").is_file()
    assert main(["experiment", str(examples / "experiment_ethanol.yaml"), *tiny, "--set", "pretrain.gradient_steps=4",
                 "--set", "pretrain.steps_per_epoch=2", "--set", "finetune.n_finetune=[5]", "--set", "finetune.seeds=1",
                 "--set", "finetune.training.max_epochs=1", "--out", str(tmp_path / "experiment")]) == 0
    assert (tmp_path / "experiment" / "results.json").is_file()

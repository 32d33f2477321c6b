"""Training on real MD17 ethanol: the loss falls, seeds reproduce, killed runs resume exactly."""

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

from metamlip.config import TrainConfig, load_config
from metamlip.training.checkpoint import read_checkpoint
from metamlip.training.run_training import run_training

SMALL_CONFIG = {
    "datasets": [{"path": None, "energy_unit": "kcal/mol", "level": "pbe+vdw-ts"}],
    "split": {"seed": 0, "train": 120, "validation": 40, "test": 40},
    "model": {"n_features": 16, "n_sensitivities": 8, "n_interaction_layers": 1, "n_atom_layers": 1, "seed": 3},
    "training": {
        "batch_size": 16, "max_epochs": 6, "progress": False, "threads": 1, "learning_rate": 0.003,
        "checkpoint_interval_seconds": 0,
    },
}


def write_config(tmp_path: Path, data_dir: Path, name: str, **training) -> Path:
    config = json.loads(json.dumps(SMALL_CONFIG))
    config["datasets"][0]["path"] = str(data_dir / "md17_ethanol_dft.npz")
    config["training"].update(training)
    config["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "model.pt")["state_dict"]


def test_training_lowers_the_validation_loss(tmp_path, data_dir):
    report = run_training(load_config(write_config(tmp_path, data_dir, "run"), TrainConfig))
    losses = [record["val_loss"] for record in report.fit.history]
    assert len(losses) == 6
    assert min(losses[1:]) < 0.5 * losses[0]
    assert report.fit.best_validation_loss == min(losses)
    assert (tmp_path / "run" / "model.pt").is_file()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 6
    test = report.test_metrics["pbe+vdw-ts"]
    assert test.n_structures == 40 and test.force_mae_ev_per_angstrom is not None


def test_same_seed_gives_the_same_weights(tmp_path, data_dir):
    config = write_config(tmp_path, data_dir, "first", max_epochs=2)
    run_training(load_config(config, TrainConfig))
    run_training(load_config(config, TrainConfig, [f"output_dir={tmp_path / 'second'}"]))
    first, second = final_weights(tmp_path / "first"), final_weights(tmp_path / "second")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_best_validation_weights_are_restored(tmp_path, data_dir):
    report = run_training(load_config(write_config(tmp_path, data_dir, "run", learning_rate=0.05), TrainConfig))
    best = read_checkpoint(tmp_path / "run" / "model.pt")
    assert best["extra"]["best_epoch"] == report.fit.best_epoch
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pt")["training_state"]["best_state"]
    assert all(torch.equal(best["state_dict"][name], state[name]) for name in state)


def test_killed_run_resumes_to_the_same_result(tmp_path, data_dir):
    epochs = 16
    reference = write_config(tmp_path, data_dir, "uninterrupted", max_epochs=epochs, early_stopping_patience=1000)
    run_training(load_config(reference, TrainConfig))

    killed = write_config(tmp_path, data_dir, "killed", max_epochs=epochs, early_stopping_patience=1000)
    command = [sys.executable, "-m", "metamlip", "train", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = tmp_path / "killed" / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log_path.exists() and len(log_path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "training finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    epochs_done = read_checkpoint(tmp_path / "killed" / "checkpoint.pt")["training_state"]["epoch"]
    assert 1 <= epochs_done < epochs

    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    resumed_log = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [record["epoch"] for record in resumed_log] == list(range(1, epochs + 1))
    first, second = final_weights(tmp_path / "uninterrupted"), final_weights(tmp_path / "killed")
    assert all(torch.allclose(first[name], second[name], rtol=0, atol=1e-6) for name in first)


def test_reference_refit_removes_the_energy_offset_on_training_data(data_dir):
    from metamlip.data.batching import StructureBatcher
    from metamlip.data.references import EnergyReference
    from metamlip.evaluation.metrics import predict
    from metamlip.model.hipnn import HipnnConfig
    from metamlip.model.potential import build_potential
    from metamlip.readers import read_level
    from metamlip.training.refit import refit_reference

    data = read_level(data_dir / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level="pbe+vdw-ts").subset(range(40))
    model = build_potential(data.elements, HipnnConfig(n_features=8, n_sensitivities=4, n_interaction_layers=1, n_atom_layers=1), seed=0)
    offset = EnergyReference.fit(data, model.species)
    offset.energy_per_element_ev = offset.energy_per_element_ev + 0.3  # a wrong reference: 2.7 eV off per ethanol
    model.add_level(offset)
    batcher = StructureBatcher(data, model.species, model.config.cutoff_angstrom)
    before = predict(model, batcher).predicted_energies_ev - data.energies_ev
    refit_reference(model, batcher, "pbe+vdw-ts")
    after = predict(model, batcher).predicted_energies_ev - data.energies_ev
    assert abs(before.mean()) > 1.0
    assert abs(after.mean()) < 1e-6  # one composition: the refit zeroes the mean error exactly
    assert np.allclose(after - after.mean(), before - before.mean(), atol=1e-5)  # the shape is untouched


@pytest.mark.skipif(torch.cuda.is_available(), reason="this check is about machines without CUDA")
def test_asking_for_a_gpu_without_one_is_a_clear_error(tmp_path, data_dir, capsys):
    from metamlip.cli.main import main

    config = write_config(tmp_path, data_dir, "gpu", device="cuda")
    assert main(["train", str(config)]) == 2
    assert "training.device" in capsys.readouterr().err


def test_pretrain_and_finetune_honour_training_threads(tmp_path, data_dir, monkeypatch):
    from metamlip.cli.main import main

    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    model = {"n_features": 4, "n_sensitivities": 2, "n_interaction_layers": 1, "n_atom_layers": 1, "cutoff_angstrom": 5.0}
    pretrain = {
        "datasets": [{"path": str(data_dir / "qm7x_226_raw.npz")}, {"path": str(data_dir / "comp6_s66x8_wb97x_631gd_4mol.h5")}],
        "strategy": "joint", "model": model, "output_dir": str(tmp_path / "pre"),
        "pretrain": {"gradient_steps": 2, "steps_per_epoch": 2, "training": {"threads": 3, "batch_size": 4, "progress": False}},
    }
    finetune = {
        "checkpoint": str(tmp_path / "pre" / "model.pt"), "n_finetune": 4, "n_validation": 2, "n_test": 2, "output_dir": str(tmp_path / "ft"),
        "dataset": {"path": str(data_dir / "md17_ethanol_dft.npz"), "energy_unit": "kcal/mol", "level": "pbe+vdw-ts"},
        "training": {"threads": 5, "batch_size": 4, "max_epochs": 1, "progress": False},
    }
    for name, config in (("pretrain", pretrain), ("finetune", finetune)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        assert main([name, str(tmp_path / f"{name}.yaml")]) == 0
    assert asked == [3, 5]

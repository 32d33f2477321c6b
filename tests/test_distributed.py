"""Distributed pre-training on 2 CPU processes (gloo) gives the single-process weights.

The test launches this file under torchrun (2 processes); each process pre-trains with
`joint`, `multihead` (data parallel with DistributedDataParallel, uneven shards: batches of
7 cut 4 + 3, and batches of 1 that leave one rank an empty shard) and `reptile` (task
parallel, m = 2 tasks per meta-step), fine-tunes (data parallel; with and without a frozen backbone), and resumes a 1-epoch joint run to 2 epochs.
Rank 0's checkpoints must match serial runs with the same seeds to float64 round-off.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metamlip import distributed
from metamlip.config import ModelSection
from metamlip.data.references import EnergyReference
from metamlip.finetune import FinetuneOptions, finetune
from metamlip.pretrain import pretrain
from metamlip.readers import read_level
from metamlip.strategies import PretrainBudget, ReptileSettings, get_strategy
from metamlip.training.checkpoint import read_checkpoint
from metamlip.training.loop import TrainingSettings
from metamlip.training.run_training import LevelSplit, new_potential

DATA_DIR = Path(__file__).parent / "data"
MODEL = ModelSection(n_features=8, n_sensitivities=4, n_interaction_layers=1, n_atom_layers=1, cutoff_angstrom=5.0, dtype="float64", seed=1)
SETTINGS = TrainingSettings(batch_size=7, learning_rate=1e-3, progress=False, checkpoint_interval_seconds=0)
REPTILE = ReptileSettings(inner_steps=2, tasks_per_meta_step=2, inner_learning_rate=3e-3, epsilon_start=0.9, epsilon_end=0.3)
RUNS = {  # name: (strategy, gradient steps, steps per epoch, batch size)
    "joint": ("joint", 8, 4, 7),
    "multihead": ("multihead", 8, 4, 7),
    "reptile": ("reptile", 16, 8, 7),
    # 30 structures a level in batches of 29: every second batch has 1 structure, and rank 1's shard is empty
    "joint-empty-shards": ("joint", 6, 3, 29),
}
FINETUNES = {"finetune": False, "finetune-frozen-backbone": True}  # name: freeze_backbone


def level_splits() -> dict[str, LevelSplit]:
    """Two small real levels: MD17 ethanol (forces) and a QM7-X isomer."""
    ethanol = read_level(DATA_DIR / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level="pbe+vdw-ts")
    qm7x = read_level(DATA_DIR / "qm7x_226_raw.npz")
    return {d.level: LevelSplit(d.subset(range(0, 30)), d.subset(range(30, 37)), d.subset(range(37, 38))) for d in (ethanol, qm7x)}


def run(name: str, run_dir: Path, epochs: int | None = None, resume: bool = False, device: str = "cpu") -> None:
    strategy, steps, per_epoch, batch_size = RUNS[name]
    torch.manual_seed(7)  # new heads (multihead) draw from the global generator
    budget = PretrainBudget(gradient_steps=steps if epochs is None else epochs * per_epoch, steps_per_epoch=per_epoch, reptile=REPTILE)
    settings = dataclasses.replace(SETTINGS, batch_size=batch_size, device=device)
    pretrain(get_strategy(strategy), level_splits(), [1, 6, 8], MODEL, settings, budget, run_dir, resume=resume)


def finetune_run(name: str, run_dir: Path, device: str = "cpu") -> None:
    """Fine-tune an untrained QM7-X-level model to ethanol (2 epochs of batches of 7: shards 4 + 3)."""
    splits = level_splits()
    model = new_potential(MODEL, [1, 6, 8])
    model.add_level(EnergyReference.fit(splits["pbe0+mbd"].train, model.species))
    target = splits["pbe+vdw-ts"]
    settings = dataclasses.replace(SETTINGS, max_epochs=2, device=device)
    finetune(model, get_strategy("joint"), target.train, target.validation, settings, run_dir, FinetuneOptions(freeze_backbone=FINETUNES[name]))


def train_named(name: str, run_dir: Path, device: str = "cpu") -> None:
    finetune_run(name, run_dir, device) if name in FINETUNES else run(name, run_dir, device=device)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "checkpoint.pt")["state_dict"]


def main(out: Path, device: str = "cpu") -> None:
    """The torchrun side: every process runs the same calls on `device`; rank 0 writes the checkpoints."""
    torch.set_num_threads(1)
    assert distributed.init_from_environment() and distributed.world_size() == 2
    for name in [*RUNS, *FINETUNES]:
        train_named(name, out / name, device)
    run("joint", out / "resumed", epochs=1, device=device)
    run("joint", out / "resumed", epochs=2, resume=True, device=device)
    distributed.shutdown()


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("name", [*RUNS, *FINETUNES])
def test_two_processes_match_one(distributed_runs, tmp_path, name):
    train_named(name, tmp_path / name)
    serial, parallel = weights(tmp_path / name), weights(distributed_runs / name)
    assert serial.keys() == parallel.keys()
    for key in serial:
        torch.testing.assert_close(parallel[key], serial[key], rtol=1e-9, atol=1e-11, msg=f"{name}: {key}")
    history = read_checkpoint(distributed_runs / name / "checkpoint.pt")["training_state"]["history_json"]
    assert '"epoch": 2' in history and "val_loss" in history
    logs = [[json.loads(line) for line in (folder / name / "log.jsonl").read_text().splitlines()] for folder in (tmp_path, distributed_runs)]
    assert len(logs[0]) == len(logs[1])
    for serial_epoch, parallel_epoch in zip(*logs):  # the logged losses are the global batches' too
        for key in ("train_loss", "train_energy_mse_per_atom_ev2", "train_force_mse_ev2_per_angstrom2", "val_loss"):
            assert parallel_epoch.get(key) == pytest.approx(serial_epoch.get(key), rel=1e-8), key


def test_distributed_resume_matches_uninterrupted(distributed_runs):
    resumed, uninterrupted = weights(distributed_runs / "resumed"), weights(distributed_runs / "joint")
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-12, atol=1e-14)
    log = (distributed_runs / "resumed" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2


def test_train_command_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m metamlip train` writes the single-process model and test metrics."""
    import json

    import yaml

    config = {
        "datasets": [{"path": str(DATA_DIR / "md17_ethanol_dft.npz"), "energy_unit": "kcal/mol", "level": "pbe+vdw-ts"}],
        "split": {"seed": 0, "train": 30, "validation": 10, "test": 20},
        "model": {"n_features": 8, "n_sensitivities": 4, "n_interaction_layers": 1, "n_atom_layers": 1, "cutoff_angstrom": 5.0, "dtype": "float64"},
        "training": {"batch_size": 7, "max_epochs": 2, "progress": False},
    }
    for name, launcher in (("serial", []), ("torchrun", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**config, "output_dir": str(tmp_path / name)}), encoding="utf-8")
        command = [sys.executable, *launcher, "-m", "metamlip", "train", str(path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert result.returncode == 0, result.stderr[-4000:]
        assert result.stdout.count("best epoch") == 1  # rank 0 alone prints
    serial, parallel = (read_checkpoint(tmp_path / name / "model.pt") for name in ("serial", "torchrun"))
    assert serial["model"]["references"].keys() == parallel["model"]["references"].keys()
    for key, tensor in serial["state_dict"].items():
        torch.testing.assert_close(parallel["state_dict"][key], tensor, rtol=1e-9, atol=1e-11, msg=key)
    metrics = [json.loads((tmp_path / name / "test_metrics.json").read_text())["pbe+vdw-ts"] for name in ("serial", "torchrun")]
    assert metrics[0]["n_structures"] == 20
    for key, value in metrics[0].items():
        assert metrics[1][key] == pytest.approx(value, rel=1e-8), key


def test_every_task_of_a_meta_step_starts_from_the_shared_optimiser_state():
    """The serial reference: with m = 2, k = 2 each task takes its k steps from the same Adam state."""
    from metamlip.pretrain import level_tasks
    from metamlip.strategies.reptile import ReptileEpochs

    splits = level_splits()
    model = new_potential(MODEL, [1, 6, 8])
    for split in splits.values():
        model.add_level(EnergyReference.fit(split.train, model.species))
    plan = ReptileEpochs(level_tasks(model, splits, MODEL.cutoff_angstrom, torch.float64), SETTINGS, REPTILE, meta_steps_per_epoch=2)
    optimizer = plan.make_optimizer(list(model.parameters()), SETTINGS)
    plan.run_epoch(model, optimizer, epoch=1)
    steps = {float(state["step"]) for state in optimizer.state_dict()["state"].values()}
    assert steps == {2.0 * REPTILE.inner_steps}


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])

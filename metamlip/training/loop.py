"""The training loop, readable top to bottom.

`train_steps` is the unit every strategy uses: k optimiser steps of a model on a
stream of batches. `fit` runs epochs of an `EpochPlan` (which decides what one
epoch of training is: mixed batches of all levels for joint training, meta-steps
for Reptile), validates, schedules the learning rate, stops early, logs every
epoch, checkpoints atomically, resumes, and restores the best weights at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from metamlip import distributed
from metamlip.data.batching import Batch, StructureBatcher
from metamlip.errors import InputError
from metamlip.model.potential import Potential
from metamlip.training.checkpoint import read_checkpoint, save_checkpoint
from metamlip.training.loss import LossWeights, batch_loss

log = logging.getLogger("metamlip.training")

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
LOG_NAME = "log.jsonl"


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation settings (see the README for each key). `restore_best` False keeps the last
    weights; the resumable checkpoint is written after an epoch when `checkpoint_interval_seconds`
    have passed since the last one, and always after the last epoch."""

    batch_size: int = 32
    learning_rate: float = 1.0e-3
    loss: LossWeights = field(default_factory=LossWeights)
    max_epochs: int = 1000
    max_wall_seconds: float | None = None
    early_stopping_patience: int = 60
    scheduler_patience: int = 15
    scheduler_factor: float = 0.5
    min_learning_rate: float = 1.0e-5
    seed: int = 0
    progress: bool = True
    restore_best: bool = True
    checkpoint_interval_seconds: float = 10.0
    device: str = "cpu"


@dataclass
class Task:
    """One level of theory as the loop sees it: training and validation batches."""

    level: str
    train: StructureBatcher
    validation: StructureBatcher | None = None


@dataclass
class FitResult:
    """What a finished `fit` returns."""

    model: Potential
    best_epoch: int
    best_validation_loss: float
    epochs_run: int
    wall_seconds: float
    stop_reason: str
    history: list[dict]


def train_steps(
    model: Potential,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    weights: LossWeights,
    parallel_model: DistributedDataParallel | None = None,
) -> dict[str, float]:
    """One optimiser step per batch; returns the mean loss parts over the steps.

    With `parallel_model` (`model` wrapped by `metamlip.distributed.data_parallel_model`)
    each batch is this process's shard of a global batch, and the gradients (and the
    returned loss parts, summed over processes at the end) are those of the global batches.
    """
    model.train()
    totals = {"loss": 0.0, "energy_mse_per_atom_ev2": 0.0, "force_mse_ev2_per_angstrom2": 0.0}
    steps = force_steps = 0
    for batch in batches:
        if parallel_model is not None:
            optimizer.zero_grad(set_to_none=True)
            loss = distributed.data_parallel_backward(parallel_model, batch, weights)
        else:
            loss = batch_loss(model, batch, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
        optimizer.step()
        totals["loss"] += float(loss.total.detach())
        totals["energy_mse_per_atom_ev2"] += loss.energy_mse_per_atom_ev2
        if loss.force_mse_ev2_per_angstrom2 is not None:
            totals["force_mse_ev2_per_angstrom2"] += loss.force_mse_ev2_per_angstrom2
            force_steps += 1
        steps += 1
    if parallel_model is not None:
        summed = distributed.sum_across_processes(torch.tensor(list(totals.values()), dtype=torch.float64))
        totals = dict(zip(totals, summed.tolist()))
    means = {"loss": totals["loss"] / max(steps, 1), "energy_mse_per_atom_ev2": totals["energy_mse_per_atom_ev2"] / max(steps, 1)}
    if force_steps:
        means["force_mse_ev2_per_angstrom2"] = totals["force_mse_ev2_per_angstrom2"] / force_steps
    return means


def endless_batches(batcher: StructureBatcher, batch_size: int, seed: int | tuple[int, ...]) -> Iterator[Batch]:
    """Shuffled passes over a dataset, one after another, each pass with its own seed."""
    seed = seed if isinstance(seed, tuple) else (seed,)
    for repeat in range(2**62):
        yield from batcher.batches(batch_size, seed=(*seed, repeat))


class EpochPlan(Protocol):
    """What one epoch of training does; strategies provide their own."""

    def make_optimizer(self, parameters: list[torch.nn.Parameter], settings: TrainingSettings) -> torch.optim.Optimizer:
        """The optimiser whose learning rate the loop schedules and whose state it checkpoints."""
        ...

    def run_epoch(self, model: Potential, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]: ...


def sample_task_order(generator: np.random.Generator, task_sizes: list[int], n_draws: int, sampling: str) -> np.ndarray:
    """Indices of `n_draws` tasks drawn with replacement, uniformly or in proportion to size."""
    if sampling not in ("size", "uniform"):
        raise InputError(f"task sampling must be 'size' or 'uniform', got {sampling!r}")
    weights = np.asarray(task_sizes, dtype=np.float64) if sampling == "size" else np.ones(len(task_sizes))
    return generator.choice(len(task_sizes), size=n_draws, p=weights / weights.sum())


@dataclass
class MixedBatchEpochs:
    """Batches of all tasks, one level per batch (each batch uses its own level's reference and head).

    With `steps_per_epoch` None an epoch is one shuffled pass over every task's training set,
    tasks interleaved at random; otherwise an epoch is `steps_per_epoch` batches, each from a
    task drawn by `task_sampling` ('size': in proportion to training-set size, or 'uniform').
    The batch order depends only on (seed, epoch), so a resumed run sees the same batches.
    Under torchrun each process trains on its shard of every batch (data parallel, see
    `metamlip.distributed`); the global batches are the single-process ones.
    """

    tasks: list[Task]
    settings: TrainingSettings
    steps_per_epoch: int | None = None
    task_sampling: str = "size"
    parallel_model: DistributedDataParallel | None = field(default=None, init=False, repr=False)

    def make_optimizer(self, parameters: list[torch.nn.Parameter], settings: TrainingSettings) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=settings.learning_rate, fused=True)

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        generator = np.random.default_rng([self.settings.seed, epoch])
        batch_size = self.settings.batch_size
        streams = [
            endless_batches(distributed.sharded(task.train), batch_size, (self.settings.seed, epoch, index))
            for index, task in enumerate(self.tasks)
        ]
        if self.steps_per_epoch is None:
            counts = [math.ceil(len(task.train) / batch_size) for task in self.tasks]
            order = generator.permutation(np.repeat(np.arange(len(self.tasks)), counts))
        else:
            sizes = [len(task.train) for task in self.tasks]
            order = sample_task_order(generator, sizes, self.steps_per_epoch, self.task_sampling)
        for task_index in order:
            yield next(streams[task_index])

    def run_epoch(self, model: Potential, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        if distributed.world_size() > 1 and (self.parallel_model is None or self.parallel_model.module is not model):
            self.parallel_model = distributed.data_parallel_model(model)
        return train_steps(model, optimizer, self.epoch_batches(epoch), self.settings.loss, self.parallel_model)


def validation_loss(model: Potential, tasks: list[Task], weights: LossWeights, batch_size: int = 64) -> dict[str, float]:
    """Structure-weighted mean loss over the validation sets of all tasks.

    Under torchrun the processes share out the batches and sum their totals.
    """
    model.eval()
    total = energy = force = 0.0
    structures = force_structures = 0
    share = 0
    for task in tasks:
        if task.validation is None:
            continue
        for indices in task.validation.batch_orders(batch_size):
            share += 1
            if (share - 1) % distributed.world_size() != distributed.rank():
                continue
            batch = task.validation.batch(indices)
            loss = batch_loss(model, batch, weights, create_graph=False)
            total += float(loss.total.detach()) * batch.n_structures
            energy += loss.energy_mse_per_atom_ev2 * batch.n_structures
            if loss.force_mse_ev2_per_angstrom2 is not None:
                force += loss.force_mse_ev2_per_angstrom2 * batch.n_structures
                force_structures += batch.n_structures
            structures += batch.n_structures
    if distributed.world_size() > 1:
        sums = torch.tensor([total, energy, force, structures, force_structures], dtype=torch.float64)
        total, energy, force, structures, force_structures = distributed.sum_across_processes(sums).tolist()
    if structures == 0:
        return {}
    result = {"val_loss": total / structures, "val_energy_rmse_per_atom_ev": math.sqrt(energy / structures)}
    if force_structures:
        result["val_force_rmse_ev_per_angstrom"] = math.sqrt(force / force_structures)
    return result


def fit(
    model: Potential,
    plan: EpochPlan,
    validation_tasks: list[Task],
    settings: TrainingSettings,
    run_dir: str | Path,
    resume: bool = False,
    parameters: Iterable[torch.nn.Parameter] | None = None,
) -> FitResult:
    """Train `model` epoch by epoch with `plan`; checkpoint to `run_dir` and restore the best weights.

    Under torchrun every process runs this loop in lockstep; only rank 0 writes the log and
    checkpoints, and every rank reads the checkpoint on `resume` (`run_dir` must be shared).
    """
    main = distributed.is_main_process()
    model.to(distributed.training_device(settings.device))
    distributed.copy_from_main_process(model)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trained = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    optimizer = plan.make_optimizer(trained, settings)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=settings.scheduler_factor, patience=settings.scheduler_patience
    )
    state = _TrainingState(best_state=copy.deepcopy(model.state_dict()))
    if resume:
        state = _resume(run_dir / CHECKPOINT_NAME, model, optimizer, scheduler)
    if main:
        (run_dir / LOG_NAME).write_text("".join(json.dumps(record) + "\n" for record in state.history), encoding="utf-8")

    started = time.perf_counter() - state.wall_seconds
    last_checkpoint = time.perf_counter()
    stop_reason = "max_epochs"
    epochs = range(state.epoch + 1, settings.max_epochs + 1)
    # disable=None: tqdm draws only on a terminal; log.jsonl records every epoch anyway
    bar = tqdm(epochs, desc="training", unit="epoch", disable=None if settings.progress and main else True, dynamic_ncols=True)
    for epoch in bar:
        train_metrics = plan.run_epoch(model, optimizer, epoch)
        val_metrics = validation_loss(model, validation_tasks, settings.loss, settings.batch_size * 2)
        monitored = val_metrics.get("val_loss", train_metrics["loss"])
        scheduler.step(monitored)
        if monitored < state.best_loss:
            state.best_loss, state.best_epoch = monitored, epoch
            state.best_state = copy.deepcopy(model.state_dict())
        state.epoch = epoch
        state.wall_seconds = distributed.value_of_main_process(time.perf_counter() - started)
        record = {"epoch": epoch, "wall_seconds": round(state.wall_seconds, 3), "learning_rate": optimizer.param_groups[0]["lr"]}
        record.update({f"train_{name}" if name != "loss" else "train_loss": value for name, value in train_metrics.items()})
        record.update(val_metrics)
        state.history.append(record)
        if main:
            _append_jsonl(run_dir / LOG_NAME, record)
        bar.set_postfix(_postfix(record), refresh=False)
        stop_reason = _stop_reason(state, settings, optimizer)
        last_epoch = bool(stop_reason) or epoch == settings.max_epochs
        if main and (last_epoch or time.perf_counter() - last_checkpoint >= settings.checkpoint_interval_seconds):
            save_checkpoint(run_dir / CHECKPOINT_NAME, model, state.to_dict(optimizer, scheduler))
            last_checkpoint = time.perf_counter()
        if stop_reason:
            break
    bar.close()
    stop_reason = stop_reason or "max_epochs"
    if settings.restore_best:
        model.load_state_dict(state.best_state)
    if main:
        save_checkpoint(run_dir / MODEL_NAME, model, extra={"best_epoch": state.best_epoch, "stop_reason": stop_reason})
    distributed.barrier()
    log.info(
        "stopped after epoch %d (%s); best epoch %d, validation loss %.4g",
        state.epoch, stop_reason, state.best_epoch, state.best_loss,
    )
    return FitResult(model, state.best_epoch, state.best_loss, state.epoch, state.wall_seconds, stop_reason, state.history)


@dataclass
class _TrainingState:
    epoch: int = 0
    best_epoch: int = 0
    best_loss: float = math.inf
    wall_seconds: float = 0.0
    best_state: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def to_dict(self, optimizer: torch.optim.Optimizer, scheduler) -> dict:
        return {
            "epoch": self.epoch,
            "best_epoch": self.best_epoch,
            "best_loss": self.best_loss,
            "wall_seconds": self.wall_seconds,
            "best_state": {name: tensor.detach().cpu().clone() for name, tensor in self.best_state.items()},
            "history_json": json.dumps(self.history),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }


def _resume(path: Path, model: Potential, optimizer: torch.optim.Optimizer, scheduler) -> _TrainingState:
    payload = read_checkpoint(path)
    saved = payload["training_state"]
    if saved is None:
        raise InputError(f"{path}: holds no training state to resume from")
    if payload["model"] != model.describe():
        raise InputError(f"{path}: was written for a different model or data; start a new run instead of --resume")
    model.load_state_dict(payload["state_dict"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    log.info("resuming from %s after epoch %d", path, saved["epoch"])
    return _TrainingState(
        epoch=saved["epoch"],
        best_epoch=saved["best_epoch"],
        best_loss=saved["best_loss"],
        wall_seconds=saved["wall_seconds"],
        best_state=saved["best_state"],
        history=json.loads(saved["history_json"]),
    )


def _stop_reason(state: _TrainingState, settings: TrainingSettings, optimizer: torch.optim.Optimizer) -> str:
    if state.epoch - state.best_epoch >= settings.early_stopping_patience:
        return "early_stopping"
    if optimizer.param_groups[0]["lr"] < settings.min_learning_rate:
        return "min_learning_rate"
    if settings.max_wall_seconds is not None and state.wall_seconds >= settings.max_wall_seconds:
        return "max_wall_seconds"
    return ""


def _postfix(record: dict) -> dict[str, str]:
    shown = {"loss": record["train_loss"], "lr": record["learning_rate"]}
    for key, short in (("val_energy_rmse_per_atom_ev", "val_E/atom"), ("val_force_rmse_ev_per_angstrom", "val_F")):
        if key in record:
            shown[short] = record[key]
    return {name: f"{value:.3g}" for name, value in shown.items()}


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")

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
import signal
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
from metamlip.training.run_dir import prepare_run_dir
from metamlip.training.signals import StopRequests, TrainingInterrupted
from metamlip.training.tensorboard import EpochBoard

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
    tensorboard: bool = False
    compile: bool = False
    native: bool = False  # HIP-NN's kernels as compiled C++ (Potential.use_native)


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


def adam_optimizer(parameters: Iterable[torch.nn.Parameter], learning_rate: float) -> torch.optim.Adam:
    """The Adam of every training loop: fused, one kernel for all weights (torch's default on CPU
    runs a loop of small kernels per weight; BENCHMARKS.md measures the difference)."""
    return torch.optim.Adam(parameters, lr=learning_rate, fused=True)


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
        return adam_optimizer(parameters, settings.learning_rate)

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


def validation_loss(
    model: Potential, tasks: list[Task], weights: LossWeights, batch_size: int = 64, per_level: dict | None = None
) -> dict[str, float]:
    """Structure-weighted mean loss over the validation sets of all tasks; with `per_level` (a dict)
    each level's own metrics are stored in it as well.

    Under torchrun the processes share out the batches and sum their totals.
    """
    model.eval()
    sums = torch.zeros(len(tasks), 5, dtype=torch.float64)  # loss, energy MSE, force MSE (x structures), structures, force structures
    share = 0
    for row, task in enumerate(tasks):
        if task.validation is None:
            continue
        for indices in task.validation.batch_orders(batch_size):
            share += 1
            if (share - 1) % distributed.world_size() != distributed.rank():
                continue
            batch = task.validation.batch(indices)
            loss = batch_loss(model, batch, weights, create_graph=False)
            n = batch.n_structures
            sums[row, 0] += float(loss.total.detach()) * n
            sums[row, 1] += loss.energy_mse_per_atom_ev2 * n
            if loss.force_mse_ev2_per_angstrom2 is not None:
                sums[row, 2] += loss.force_mse_ev2_per_angstrom2 * n
                sums[row, 4] += n
            sums[row, 3] += n
    sums = distributed.sum_across_processes(sums.flatten()).reshape(len(tasks), 5)
    if per_level is not None and len(tasks) > 1:
        per_level.update({task.level: _validation_means(row) for task, row in zip(tasks, sums) if row[3] > 0})
    return _validation_means(sums.sum(dim=0))


def _validation_means(sums: torch.Tensor) -> dict[str, float]:
    """Validation metrics from the five sums of `validation_loss` (empty without structures)."""
    total, energy, force, structures, force_structures = sums.tolist()
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

    A loss that becomes NaN or infinite stops the run with `TrainingDiverged`, leaving the last
    checkpoint (of finite weights) in place and writing no model. SIGINT/SIGTERM finish the epoch,
    write the checkpoint and raise `TrainingInterrupted` (`metamlip.training.signals`).
    Under torchrun every process runs this loop in lockstep; only rank 0 writes the log and
    checkpoints, and every rank reads the checkpoint on `resume` (`run_dir` must be shared).
    """
    if settings.max_epochs < 1:
        raise InputError(f"training.max_epochs must be at least 1, got {settings.max_epochs}")
    main = distributed.is_main_process()
    model.to(distributed.training_device(settings.device))
    if settings.compile:
        model.use_compile()
    if settings.native:
        model.use_native()
    distributed.copy_from_main_process(model)
    run_dir = prepare_run_dir(run_dir) if main else Path(run_dir)
    trained = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    optimizer = plan.make_optimizer(trained, settings)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=settings.scheduler_factor, patience=settings.scheduler_patience
    )
    state = _TrainingState(best_state=copy.deepcopy(model.state_dict()))
    if resume:
        state = _resume(run_dir / CHECKPOINT_NAME, model, optimizer, scheduler)
    files = _RunFiles.open(run_dir, main, settings, state.history, state.epoch if resume else None)

    started = time.perf_counter() - state.wall_seconds
    stop_reason = ""
    epochs = range(state.epoch + 1, settings.max_epochs + 1)
    # disable=None: tqdm draws only on a terminal; log.jsonl records every epoch anyway
    bar = tqdm(epochs, desc="training", unit="epoch", disable=None if settings.progress and main else True, dynamic_ncols=True)
    try:
        with StopRequests() as stop_requests:
            for epoch in bar:
                train_metrics = plan.run_epoch(model, optimizer, epoch)
                per_level: dict[str, dict[str, float]] = {}
                val_metrics = validation_loss(model, validation_tasks, settings.loss, settings.batch_size * 2, per_level)
                monitored = val_metrics.get("val_loss", train_metrics["loss"])
                state.wall_seconds = distributed.value_of_main_process(time.perf_counter() - started)
                record = _epoch_record(epoch, state.wall_seconds, optimizer, train_metrics, val_metrics)
                files.log(record, per_level)
                if not (math.isfinite(train_metrics["loss"]) and math.isfinite(monitored)):
                    raise _diverged(record, run_dir, files.checkpoint_epoch)
                scheduler.step(monitored)
                state.record_epoch(epoch, monitored, record, model)
                bar.set_postfix(_postfix(record), refresh=False)
                stop_reason = _stop_reason(state, settings, optimizer)
                signal_number = _pending_signal(stop_requests)
                last = bool(stop_reason) or epoch == settings.max_epochs or signal_number is not None
                files.checkpoint(model, state, optimizer, scheduler, now=last)
                if signal_number is not None:
                    raise _interrupted(signal_number, epoch, run_dir)
                if stop_reason:
                    break
    finally:
        bar.close()
        files.close()
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


def _epoch_record(epoch: int, wall_seconds: float, optimizer: torch.optim.Optimizer, train: dict, validation: dict) -> dict:
    """One line of log.jsonl: epoch, wall time (s), learning rate, train_* and val_* metrics."""
    record = {"epoch": epoch, "wall_seconds": round(wall_seconds, 3), "learning_rate": optimizer.param_groups[0]["lr"]}
    record.update({f"train_{name}" if name != "loss" else "train_loss": value for name, value in train.items()})
    record.update(validation)
    return record


class TrainingDiverged(InputError):
    """The loss became NaN or infinite; the message names the epoch and the last good checkpoint."""


def _diverged(record: dict, run_dir: Path, checkpoint_epoch: int | None) -> TrainingDiverged:
    kept = (
        f"the last good checkpoint is {run_dir / CHECKPOINT_NAME} (epoch {checkpoint_epoch}); "
        if checkpoint_epoch is not None else "no checkpoint was written yet; "
    )
    loss = record["train_loss"] if not math.isfinite(record["train_loss"]) else record.get("val_loss")
    again = " and start again with --overwrite" if checkpoint_epoch is not None else ""
    return TrainingDiverged(
        f"training diverged at epoch {record['epoch']} (loss {loss}); no model was written; {kept}"
        f"lower training.learning_rate (now {record['learning_rate']:g}){again}"
    )


def _pending_signal(stop_requests: StopRequests) -> int | None:
    """The signal that asks to stop; under torchrun rank 0's, so that all processes stop after the same epoch."""
    if distributed.world_size() == 1:
        return stop_requests.signal_number
    return int(distributed.value_of_main_process(float(stop_requests.signal_number or 0))) or None


def _interrupted(signal_number: int, epoch: int, run_dir: Path) -> TrainingInterrupted:
    distributed.barrier()  # the checkpoint is written before any process exits
    return TrainingInterrupted(
        f"{signal.Signals(signal_number).name}: stopped after epoch {epoch}; checkpoint: {run_dir / CHECKPOINT_NAME} "
        "(continue with --resume)",
        signal_number,
    )


@dataclass
class _RunFiles:
    """What the main process writes to the run folder during `fit`: log.jsonl, TensorBoard and the
    resumable checkpoint (every `interval_seconds`, and when asked to write `now`)."""

    run_dir: Path
    main: bool
    interval_seconds: float
    board: EpochBoard | None
    checkpoint_epoch: int | None  # epoch of the last checkpoint written (or resumed from)
    last_checkpoint: float = field(default_factory=time.perf_counter)

    @classmethod
    def open(cls, run_dir: Path, main: bool, settings: TrainingSettings, history: list[dict], resumed_epoch: int | None) -> _RunFiles:
        board = EpochBoard(run_dir) if settings.tensorboard and main else None
        if main:
            (run_dir / LOG_NAME).write_text("".join(strict_json(record) + "\n" for record in history), encoding="utf-8")
        return cls(run_dir, main, settings.checkpoint_interval_seconds, board, resumed_epoch)

    def log(self, record: dict, per_level: dict[str, dict[str, float]]) -> None:
        if self.main:
            _append_jsonl(self.run_dir / LOG_NAME, record)
            if self.board is not None:
                self.board.write(record, per_level)

    def checkpoint(self, model: Potential, state: _TrainingState, optimizer: torch.optim.Optimizer, scheduler, now: bool) -> None:
        if self.main and (now or time.perf_counter() - self.last_checkpoint >= self.interval_seconds):
            save_checkpoint(self.run_dir / CHECKPOINT_NAME, model, state.to_dict(optimizer, scheduler))
            self.last_checkpoint, self.checkpoint_epoch = time.perf_counter(), state.epoch

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


@dataclass
class _TrainingState:
    epoch: int = 0
    best_epoch: int = 0
    best_loss: float = math.inf
    wall_seconds: float = 0.0
    best_state: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def record_epoch(self, epoch: int, monitored: float, record: dict, model: Potential) -> None:
        """Epoch `epoch` done: keep its log record, and the weights when `monitored` is the best loss so far."""
        if monitored < self.best_loss:
            self.best_loss, self.best_epoch = monitored, epoch
            self.best_state = copy.deepcopy(model.state_dict())
        self.epoch = epoch
        self.history.append(record)

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
    try:
        model.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = _TrainingState(
            epoch=int(saved["epoch"]),
            best_epoch=int(saved["best_epoch"]),
            best_loss=float(saved["best_loss"]),
            wall_seconds=float(saved["wall_seconds"]),
            best_state=dict(saved["best_state"]),
            history=json.loads(saved["history_json"]),
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        raise InputError(f"{path}: damaged training state, cannot resume ({type(error).__name__}: {first_line})") from None
    log.info("resuming from %s after epoch %d", path, state.epoch)
    return state


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


def strict_json(record: dict) -> str:
    """`record` as one line of strict JSON: NaN and infinities become null."""
    finite = {name: value if not isinstance(value, float) or math.isfinite(value) else None for name, value in record.items()}
    return json.dumps(finite, allow_nan=False)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(strict_json(record) + "\n")

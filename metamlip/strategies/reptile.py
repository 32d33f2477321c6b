"""Reptile meta-learning (Nichol, Achiam, Schulman, arXiv:1803.02999) over levels of theory.

One meta-step: draw m tasks; each starts from the shared weights theta (and the shared
inner-optimiser state) and takes k optimiser steps on its own batches, giving theta'_i;
then theta <- theta + epsilon * mean_i(theta'_i - theta). Epsilon anneals linearly from
`epsilon_start` to `epsilon_end` over the planned meta-steps. The inner optimiser's
state is carried from meta-step to meta-step (averaged over the m tasks), so with
k = 1, m = 1 and epsilon = 1 Reptile is exactly joint training on the same batches.

Task-specific parameters (with `per_level_heads`: the energy heads, one per level) are
not interpolated: a task's head keeps its adapted weights theta'_i, and a parameter is
averaged only over the tasks that trained it (a task trains the shared backbone and its
own head). The optimiser state is averaged the same way.

Bookkeeping is a few flat tensor copies per meta-step (no deep copies of state dicts); with
one task per meta-step on one process the optimiser state is not copied at all.

Under torchrun the meta-step is task parallel: every process draws the same m tasks (same
seed); process r adapts tasks r, r + W, ... (W processes, m >= W), and one all-reduce per
meta-step sums the (theta'_i - theta), the optimiser states, the counts of tasks that
trained each parameter and the losses: the same arithmetic as the serial meta-step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from metamlip import distributed
from metamlip.data.batching import Batch
from metamlip.errors import InputError
from metamlip.model.potential import Potential
from metamlip.training.loop import Task, TrainingSettings, adam_optimizer, endless_batches, sample_task_order, train_steps

LOSS_NAMES = ("loss", "energy_mse_per_atom_ev2", "force_mse_ev2_per_angstrom2")


@dataclass(frozen=True)
class ReptileSettings:
    """Knobs of the meta-learners (see the module docstring; `fomaml` uses the same ones)."""

    inner_steps: int = 5
    tasks_per_meta_step: int = 1
    inner_optimizer: str = "adam"
    inner_learning_rate: float = 1.0e-3
    epsilon_start: float = 1.0
    epsilon_end: float = 0.1
    task_sampling: str = "uniform"

    def __post_init__(self) -> None:
        if self.inner_steps < 1 or self.tasks_per_meta_step < 1:
            raise InputError("reptile.inner_steps and reptile.tasks_per_meta_step must be at least 1")
        if self.inner_optimizer not in ("adam", "sgd"):
            raise InputError(f"reptile.inner_optimizer must be 'adam' or 'sgd', got {self.inner_optimizer!r}")


def annealed_epsilon(settings: ReptileSettings, meta_step: int, total_meta_steps: int) -> float:
    """Linear schedule from epsilon_start (meta-step 0) to epsilon_end (the last meta-step)."""
    fraction = min(meta_step / max(total_meta_steps - 1, 1), 1.0)
    return settings.epsilon_start + (settings.epsilon_end - settings.epsilon_start) * fraction


def reptile_update(theta: torch.Tensor, adapted: list[torch.Tensor], epsilon: float) -> torch.Tensor:
    """theta + epsilon * mean_i(adapted_i - theta), on flat parameter vectors."""
    return theta + epsilon * torch.stack([weights - theta for weights in adapted]).mean(dim=0)


@dataclass
class MetaEpochs:
    """Epochs of meta-steps: each draws m tasks and k batches per task; batches depend only on (seed, epoch)."""

    tasks: list[Task]
    settings: TrainingSettings
    reptile: ReptileSettings
    meta_steps_per_epoch: int

    def total_meta_steps(self) -> int:
        return self.settings.max_epochs * self.meta_steps_per_epoch

    def epoch_meta_steps(self, epoch: int) -> Iterator[tuple[int, list[tuple[Task, list[Batch]]]]]:
        """(global meta-step index, [(task, its k batches), ...]) for every meta-step of `epoch`."""
        generator = np.random.default_rng([self.settings.seed, epoch])
        streams = {
            index: endless_batches(task.train, self.settings.batch_size, (self.settings.seed, epoch, index))
            for index, task in enumerate(self.tasks)
        }
        sizes = [len(task.train) for task in self.tasks]
        m = min(self.reptile.tasks_per_meta_step, len(self.tasks))
        for step in range(self.meta_steps_per_epoch):
            if m == 1:
                chosen = sample_task_order(generator, sizes, 1, self.reptile.task_sampling)
            else:
                weights = np.asarray(sizes, float) if self.reptile.task_sampling == "size" else np.ones(len(sizes))
                chosen = generator.choice(len(self.tasks), size=m, replace=False, p=weights / weights.sum())
            work = [(self.tasks[i], [next(streams[i]) for _ in range(self.reptile.inner_steps)]) for i in chosen]
            yield (epoch - 1) * self.meta_steps_per_epoch + step, work


@dataclass
class ReptileEpochs(MetaEpochs):
    """Reptile epochs; `per_level_heads` makes the energy heads task specific (see the module docstring)."""

    per_level_heads: bool = False

    def make_optimizer(self, parameters: list[torch.nn.Parameter], settings: TrainingSettings) -> torch.optim.Optimizer:
        if self.reptile.inner_optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=self.reptile.inner_learning_rate)
        return adam_optimizer(parameters, self.reptile.inner_learning_rate)

    def run_epoch(self, model: Potential, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        specific = task_specific_mask(model, parameters) if self.per_level_heads else None
        losses = []
        for meta_step, work in self.epoch_meta_steps(epoch):
            epsilon = annealed_epsilon(self.reptile, meta_step, self.total_meta_steps())
            losses.append(meta_step_update(model, parameters, optimizer, work, epsilon, self.settings, specific))
        return mean_losses(losses) | {"epsilon": epsilon}


def task_specific_mask(model: Potential, parameters: list[torch.nn.Parameter]) -> list[bool]:
    """One flag per parameter tensor: True for energy-head weights."""
    head_ids = {id(parameter) for parameter in model.heads.parameters()}
    return [id(parameter) in head_ids for parameter in parameters]


def meta_step_update(
    model: Potential,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    work: list[tuple[Task, list[Batch]]],
    epsilon: float,
    settings: TrainingSettings,
    task_specific: list[bool] | None = None,
) -> dict[str, float]:
    """One Reptile meta-step in place on `model` and `optimizer` (see the module docstring)."""
    work = this_process_tasks(work)
    specific = task_specific or [False] * len(parameters)
    theta = [parameter.detach().clone() for parameter in parameters]
    if distributed.world_size() == 1 and len(work) == 1:  # the inner optimiser's end state is the new state: nothing to copy
        losses = train_steps(model, optimizer, work[0][1], settings.loss)
        step = torch._foreach_sub([parameter.detach() for parameter in parameters], theta)
        move_parameters(parameters, theta, step, [1.0 if own else epsilon for own in specific])
        return losses
    names = state_names(optimizer)
    start = [{name: optimizer.state[p][name].clone() for name in names} if p in optimizer.state else None for p in parameters]
    sums = TaskSums.zeros(parameters, names)
    losses = []
    for _, batches in work:
        with torch.no_grad():
            torch._foreach_copy_(parameters, theta)
        restore_states(optimizer, parameters, start)
        losses.append(train_steps(model, optimizer, batches, settings.loss))
        sums.add(optimizer, parameters, theta)
    sums, totals = sums.across_processes(loss_totals(losses))
    scales = [(1.0 if own else epsilon) / max(count, 1.0) for own, count in zip(specific, sums.counts)]
    move_parameters(parameters, theta, sums.differences, scales)
    restore_states(optimizer, parameters, start)
    for index, parameter in enumerate(parameters):
        if sums.counts[index] > 0:
            optimizer.state[parameter] = {
                name: (sums.states[name][index] / sums.counts[index]).to(torch.float32 if name == "step" else parameter.dtype)
                for name in names
            }
    return losses_from_totals(totals)


def this_process_tasks(work: list) -> list:
    """The tasks of a meta-step this process adapts: all of them on one process, else every W-th."""
    processes = distributed.world_size()
    if processes == 1:
        return work
    if len(work) < processes:
        raise InputError(f"reptile.tasks_per_meta_step ({len(work)}) must be at least the number of processes ({processes})")
    return work[distributed.rank() :: processes]


def state_names(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The per-parameter state tensors the meta-step copies: Adam's; none for plain SGD."""
    return ("step", "exp_avg", "exp_avg_sq") if isinstance(optimizer, torch.optim.Adam) else ()


def restore_states(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], states: list[dict | None]) -> None:
    """Put captured per-parameter states back (a parameter captured without state gets none);
    existing state tensors are overwritten in place, in one foreach copy."""
    targets, sources = [], []
    for parameter, state in zip(parameters, states):
        current = optimizer.state.get(parameter)
        if state is None:
            optimizer.state.pop(parameter, None)
        elif current is not None and current.keys() == state.keys():
            for name, value in state.items():
                targets.append(current[name])
                sources.append(value)
        else:
            optimizer.state[parameter] = {name: value.clone() for name, value in state.items()}
    if targets:
        torch._foreach_copy_(targets, sources)


def move_parameters(parameters: list[torch.nn.Parameter], theta: list[torch.Tensor], step: list[torch.Tensor], scales: list[float]) -> None:
    """parameters <- theta + scale * step, per tensor."""
    with torch.no_grad():
        torch._foreach_copy_(parameters, torch._foreach_add(theta, torch._foreach_mul(step, scales)))


@dataclass
class TaskSums:
    """Sums over the tasks of a meta-step, per parameter tensor: weight changes (theta'_i - theta),
    optimiser states, and the number of tasks that trained the parameter (its gradient was set)."""

    differences: list[torch.Tensor]
    states: dict[str, list[torch.Tensor]]
    counts: list[float]

    @classmethod
    def zeros(cls, parameters: list[torch.nn.Parameter], names: tuple[str, ...]) -> TaskSums:
        states = {name: [torch.zeros((), dtype=p.dtype, device=p.device) if name == "step" else torch.zeros_like(p) for p in parameters] for name in names}
        return cls([torch.zeros_like(p) for p in parameters], states, [0.0] * len(parameters))

    def add(self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], theta: list[torch.Tensor]) -> None:
        trained = [index for index, parameter in enumerate(parameters) if parameter.grad is not None]
        changes = torch._foreach_sub([parameters[i].detach() for i in trained], [theta[i] for i in trained])
        torch._foreach_add_([self.differences[i] for i in trained], changes)
        for name, sums in self.states.items():
            values = [optimizer.state[parameters[i]][name] for i in trained]
            if name == "step":  # a float32 scalar; the sums are in the parameters' dtype
                values = [value.to(sums[i].dtype) for i, value in zip(trained, values)]
            torch._foreach_add_([sums[i] for i in trained], values)
        for index in trained:
            self.counts[index] += 1.0

    def across_processes(self, loss_totals_: torch.Tensor) -> tuple[TaskSums, torch.Tensor]:
        """The sums (and loss totals) of all processes: one all-reduce; unchanged on one process."""
        if distributed.world_size() == 1:
            return self, loss_totals_
        tensors = self.differences + [value for name in self.states for value in self.states[name]]
        reference = self.differences[0]
        counts = torch.tensor(self.counts, dtype=reference.dtype, device=reference.device)
        flat = torch.cat([t.reshape(-1) for t in tensors] + [counts, loss_totals_.to(reference.device, reference.dtype)])
        flat = distributed.sum_across_processes(flat)
        pieces = list(torch.split(flat, [t.numel() for t in tensors] + [len(self.counts), loss_totals_.numel()]))
        shaped = [piece.view_as(t) for piece, t in zip(pieces, tensors)]
        n = len(self.differences)
        states = {name: shaped[n + k * n : n + (k + 1) * n] for k, name in enumerate(self.states)}
        return TaskSums(shaped[:n], states, pieces[-2].tolist()), pieces[-1].double().cpu()


def loss_totals(losses: list[dict[str, float]]) -> torch.Tensor:
    """[sum, count] of every loss part over tasks, as one float64 vector (for the all-reduce)."""
    return torch.tensor(
        [value for name in LOSS_NAMES for value in (sum(loss.get(name, 0.0) for loss in losses), sum(name in loss for loss in losses))],
        dtype=torch.float64,
    )


def losses_from_totals(totals: torch.Tensor) -> dict[str, float]:
    values = totals.tolist()
    return {name: values[2 * i] / values[2 * i + 1] for i, name in enumerate(LOSS_NAMES) if values[2 * i + 1] > 0}


def mean_losses(losses: list[dict[str, float]]) -> dict[str, float]:
    return {name: float(np.mean([loss[name] for loss in losses if name in loss])) for name in losses[0]}


def copy_into_parameters(vector: torch.Tensor, parameters: list[torch.nn.Parameter]) -> None:
    """Write a flat vector into the parameters in place (they never alias the vector)."""
    with torch.no_grad():
        offset = 0
        for parameter in parameters:
            parameter.copy_(vector[offset : offset + parameter.numel()].view_as(parameter))
            offset += parameter.numel()

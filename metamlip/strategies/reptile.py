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
from torch.nn.utils import parameters_to_vector

from metamlip import distributed
from metamlip.data.batching import Batch
from metamlip.errors import InputError
from metamlip.model.potential import Potential
from metamlip.training.loop import Task, TrainingSettings, endless_batches, sample_task_order, train_steps

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
        return torch.optim.Adam(parameters, lr=self.reptile.inner_learning_rate, fused=True)

    def run_epoch(self, model: Potential, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        specific = task_specific_mask(model, parameters) if self.per_level_heads else None
        losses = []
        for meta_step, work in self.epoch_meta_steps(epoch):
            epsilon = annealed_epsilon(self.reptile, meta_step, self.total_meta_steps())
            losses.append(meta_step_update(model, parameters, optimizer, work, epsilon, self.settings, specific))
        return mean_losses(losses) | {"epsilon": epsilon}


def task_specific_mask(model: Potential, parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """Flat boolean vector over `parameters`: True for the entries of energy-head weights."""
    head_ids = {id(parameter) for parameter in model.heads.parameters()}
    return torch.cat([torch.full((p.numel(),), id(p) in head_ids, dtype=torch.bool, device=p.device) for p in parameters])


def meta_step_update(
    model: Potential,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    work: list[tuple[Task, list[Batch]]],
    epsilon: float,
    settings: TrainingSettings,
    task_specific: torch.Tensor | None = None,
) -> dict[str, float]:
    """One Reptile meta-step in place on `model` and `optimizer` (see the module docstring)."""
    processes = distributed.world_size()
    if processes > 1:
        if len(work) < processes:
            raise InputError(f"reptile.tasks_per_meta_step ({len(work)}) must be at least the number of processes ({processes})")
        work = work[distributed.rank() :: processes]
    theta = parameters_to_vector(parameters).detach().clone()
    if processes == 1 and len(work) == 1:  # the inner optimiser's end state is the new state: nothing to copy
        losses = train_steps(model, optimizer, work[0][1], settings.loss)
        step = parameters_to_vector(parameters).detach() - theta
        copy_into_parameters(theta + step_scale(epsilon, task_specific, theta) * step, parameters)
        return losses
    start = OptimizerStates.capture(optimizer, parameters)
    difference = torch.zeros_like(theta)
    trained = torch.zeros(len(parameters), dtype=theta.dtype, device=theta.device)
    states = start.zeros()
    losses = []
    for _, batches in work:
        copy_into_parameters(theta, parameters)
        start.restore(optimizer, parameters)
        losses.append(train_steps(model, optimizer, batches, settings.loss))
        difference += parameters_to_vector(parameters).detach() - theta
        was_trained = torch.tensor([p.grad is not None for p in parameters], dtype=theta.dtype, device=theta.device)
        trained += was_trained
        states += OptimizerStates.capture(optimizer, parameters).vector * start.expand(was_trained)
    totals = loss_totals(losses).to(theta.device, theta.dtype)
    flat = distributed.sum_across_processes(torch.cat([difference, trained, states, totals]))
    difference, trained, states, totals = torch.split(flat, [theta.numel(), len(parameters), states.numel(), totals.numel()])
    per_entry_count = torch.repeat_interleave(trained, torch.tensor([p.numel() for p in parameters], device=theta.device))
    mean_difference = difference / per_entry_count.clamp(min=1.0)
    copy_into_parameters(theta + step_scale(epsilon, task_specific, theta) * mean_difference, parameters)
    start.restore(optimizer, parameters)
    start.write_averages(optimizer, parameters, states, trained)
    return losses_from_totals(totals)


def step_scale(epsilon: float, task_specific: torch.Tensor | None, theta: torch.Tensor) -> torch.Tensor | float:
    """Epsilon for shared entries, 1 (keep the adapted weights) for task-specific ones."""
    if task_specific is None:
        return epsilon
    return torch.where(task_specific, torch.ones_like(theta), torch.full_like(theta, epsilon))


@dataclass
class OptimizerStates:
    """The optimiser's per-parameter state as one flat vector (Adam: step, exp_avg, exp_avg_sq per
    parameter; zeros where a parameter has no state yet; SGD without momentum: empty)."""

    names: tuple[str, ...]
    sizes: list[int]  # entries per parameter
    present: list[bool]
    vector: torch.Tensor

    @classmethod
    def capture(cls, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter]) -> OptimizerStates:
        names = ("step", "exp_avg", "exp_avg_sq") if isinstance(optimizer, torch.optim.Adam) else ()
        reference = parameters[0]
        parts, sizes, present = [], [], []
        for parameter in parameters:
            state = optimizer.state.get(parameter, {})
            present.append(bool(state))
            for name in names:
                value = state.get(name)
                shape = () if name == "step" else parameter.shape
                parts.append(torch.zeros(shape, dtype=reference.dtype, device=reference.device).reshape(-1) if value is None
                             else value.detach().reshape(-1).to(reference.device, reference.dtype))
            sizes.append(sum(1 if name == "step" else parameter.numel() for name in names))
        vector = torch.cat(parts) if parts else reference.new_zeros(0)
        return cls(names, sizes, present, vector.clone())

    def zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.vector)

    def expand(self, per_parameter: torch.Tensor) -> torch.Tensor:
        """A per-parameter vector repeated over each parameter's state entries."""
        return torch.repeat_interleave(per_parameter, torch.tensor(self.sizes, device=per_parameter.device))

    def restore(self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter]) -> None:
        """Put this captured state back (parameters without state then have none)."""
        self._write(optimizer, parameters, self.vector, self.present)

    def write_averages(self, optimizer, parameters, sums: torch.Tensor, trained: torch.Tensor) -> None:
        """State of each parameter trained by at least one task: its sum over those tasks / their count."""
        averages = sums / self.expand(trained).clamp(min=1.0)
        self._write(optimizer, parameters, averages, [bool(count > 0) for count in trained], keep_others=True)

    def _write(self, optimizer, parameters, vector: torch.Tensor, which: list[bool], keep_others: bool = False) -> None:
        offset = 0
        for parameter, size, chosen in zip(parameters, self.sizes, which):
            if not chosen:
                if not keep_others:
                    optimizer.state.pop(parameter, None)
                offset += size
                continue
            state = optimizer.state[parameter]
            for name in self.names:
                count = 1 if name == "step" else parameter.numel()
                value = vector[offset : offset + count]
                offset += count
                if name == "step":
                    state[name] = value.reshape(()).to(torch.float32).clone()
                else:
                    state[name] = value.view_as(parameter).clone()


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

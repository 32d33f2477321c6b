"""Reptile meta-learning (Nichol, Achiam, Schulman, arXiv:1803.02999) over levels of theory.

One meta-step: draw m tasks; each starts from the shared weights theta (and the shared
inner-optimiser state) and takes k optimiser steps on its own batches, giving theta'_i;
then theta <- theta + epsilon * mean_i(theta'_i - theta). Epsilon anneals linearly from
`epsilon_start` to `epsilon_end` over the planned meta-steps. The inner optimiser's
state is carried from meta-step to meta-step (averaged over the m tasks), so with
k = 1, m = 1 and epsilon = 1 Reptile is exactly joint training on the same batches.

Under torchrun the meta-step is task parallel: every process draws the same m tasks (same
seed); process r adapts tasks r, r + W, ... (W processes, m >= W), and one all-reduce per
meta-step sums the (theta'_i - theta), the inner optimiser states and the losses, which
are then divided by m: the same arithmetic as the serial meta-step.
"""

from __future__ import annotations

import copy
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


@dataclass(frozen=True)
class ReptileSettings:
    """Reptile's own knobs (see the module docstring)."""

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
class ReptileEpochs:
    """An epoch of Reptile: `meta_steps_per_epoch` meta-steps; batches depend only on (seed, epoch)."""

    tasks: list[Task]
    settings: TrainingSettings
    reptile: ReptileSettings
    meta_steps_per_epoch: int

    def make_optimizer(self, parameters: list[torch.nn.Parameter], settings: TrainingSettings) -> torch.optim.Optimizer:
        if self.reptile.inner_optimizer == "sgd":
            return torch.optim.SGD(parameters, lr=self.reptile.inner_learning_rate)
        return torch.optim.Adam(parameters, lr=self.reptile.inner_learning_rate, fused=True)

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

    def run_epoch(self, model: Potential, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        losses = []
        for meta_step, work in self.epoch_meta_steps(epoch):
            epsilon = annealed_epsilon(self.reptile, meta_step, self.total_meta_steps())
            losses.append(meta_step_update(model, parameters, optimizer, work, epsilon, self.settings))
        mean = {name: float(np.mean([loss[name] for loss in losses if name in loss])) for name in losses[0]}
        return mean | {"epsilon": epsilon}


def meta_step_update(
    model: Potential,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    work: list[tuple[Task, list[Batch]]],
    epsilon: float,
    settings: TrainingSettings,
) -> dict[str, float]:
    """One Reptile meta-step in place on `model` and `optimizer` (see the module docstring)."""
    theta = parameters_to_vector(parameters).detach().clone()
    start_state = copy.deepcopy(optimizer.state_dict())
    adapted, end_states, losses = [], [], []
    processes = distributed.world_size()
    if processes > 1:
        if len(work) < processes:
            raise InputError(f"reptile.tasks_per_meta_step ({len(work)}) must be at least the number of processes ({processes})")
        work = work[distributed.rank() :: processes]
    for _, batches in work:
        copy_into_parameters(theta, parameters)
        optimizer.load_state_dict(copy.deepcopy(start_state))  # load_state_dict aliases the tensors it is given
        losses.append(train_steps(model, optimizer, batches, settings.loss))
        adapted.append(parameters_to_vector(parameters).detach().clone())
        end_states.append(copy.deepcopy(optimizer.state_dict()))
    if processes > 1:
        return _all_reduce_meta_step(theta, adapted, end_states, losses, parameters, optimizer, epsilon)
    copy_into_parameters(reptile_update(theta, adapted, epsilon), parameters)
    optimizer.load_state_dict(average_optimizer_states(end_states))
    return {name: float(np.mean([loss[name] for loss in losses if name in loss])) for name in losses[0]}


def _all_reduce_meta_step(
    theta: torch.Tensor,
    adapted: list[torch.Tensor],
    end_states: list[dict],
    losses: list[dict[str, float]],
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    epsilon: float,
) -> dict[str, float]:
    """Finish a task-parallel meta-step: sum this process's parts with the others' in one all-reduce."""
    summed_state = copy.deepcopy(end_states[0])
    state_keys = [
        (key, name)
        for key, parameter_state in sorted(summed_state["state"].items())
        for name, value in sorted(parameter_state.items())
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    ]
    state_sums = [sum(state["state"][key][name] for state in end_states) for key, name in state_keys]
    names = ["loss", "energy_mse_per_atom_ev2", "force_mse_ev2_per_angstrom2"]
    loss_sums = [value for name in names for value in (sum(loss.get(name, 0.0) for loss in losses), sum(name in loss for loss in losses))]
    parts = [
        torch.stack([weights - theta for weights in adapted]).sum(dim=0),
        *(value.reshape(-1).to(theta.device, theta.dtype) for value in state_sums),
        torch.tensor([float(len(adapted)), *loss_sums], dtype=theta.dtype, device=theta.device),
    ]
    flat = distributed.sum_across_processes(torch.cat(parts))
    n_tasks = float(flat[-1 - len(loss_sums)])
    copy_into_parameters(theta + epsilon * (flat[: theta.numel()] / n_tasks), parameters)
    offset = theta.numel()
    for (key, name), value in zip(state_keys, state_sums):
        summed_state["state"][key][name] = (flat[offset : offset + value.numel()].view_as(value) / n_tasks).to(value.device, value.dtype)
        offset += value.numel()
    optimizer.load_state_dict(summed_state)
    totals = flat[-len(loss_sums) :].tolist()
    return {name: totals[2 * i] / totals[2 * i + 1] for i, name in enumerate(names) if totals[2 * i + 1] > 0}


def copy_into_parameters(vector: torch.Tensor, parameters: list[torch.nn.Parameter]) -> None:
    """Write a flat vector into the parameters in place (they never alias the vector)."""
    with torch.no_grad():
        offset = 0
        for parameter in parameters:
            parameter.copy_(vector[offset : offset + parameter.numel()].view_as(parameter))
            offset += parameter.numel()


def average_optimizer_states(states: list[dict]) -> dict:
    """Element-wise mean of the tensors of several optimiser states of the same parameters."""
    if len(states) == 1:
        return states[0]
    averaged = copy.deepcopy(states[0])
    for key, parameter_state in averaged["state"].items():
        for name, value in parameter_state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                parameter_state[name] = torch.stack([state["state"][key][name] for state in states]).mean(dim=0)
    return averaged

"""`fomaml`: first-order MAML (Finn, Abbeel, Levine, ICML 2017, section 5.2; Nichol et al. 2018).

One meta-step: draw m tasks; each starts from the shared weights theta, takes k - 1 plain SGD
steps on its first batches (learning rate `reptile.inner_learning_rate`), and takes the
gradient of the loss on its last batch at the adapted weights. The outer optimiser (Adam at
`training.learning_rate`, scheduled by the loop) then steps theta along the mean of those
gradients. Where Reptile moves theta toward the adapted weights, FOMAML moves it along the
gradient *after* adaptation: it asks for weights from which a few steps reach a low loss on
fresh data of the same level. Every inner step and every outer gradient counts against the
budget (k per task), as for Reptile. With k = 1 it is joint training on the same batches.
Under torchrun the tasks of a meta-step are shared out and one all-reduce sums the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils import parameters_to_vector

from metamlip import distributed
from metamlip.data.batching import Batch
from metamlip.model.potential import Potential
from metamlip.strategies.base import PretrainBudget
from metamlip.strategies.reptile import MetaEpochs, copy_into_parameters, loss_totals, losses_from_totals, mean_losses, this_process_tasks
from metamlip.strategies.reptile_strategy import Reptile
from metamlip.training.loop import EpochPlan, Task, TrainingSettings, adam_optimizer, train_steps
from metamlip.training.loss import batch_loss


@dataclass
class FomamlEpochs(MetaEpochs):
    """FOMAML epochs: the loop's optimiser is the outer one; the inner one is plain SGD."""

    def make_optimizer(self, parameters: list[torch.nn.Parameter], settings: TrainingSettings) -> torch.optim.Optimizer:
        return adam_optimizer(parameters, settings.learning_rate)

    def run_epoch(self, model: Potential, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        inner = torch.optim.SGD(parameters, lr=self.reptile.inner_learning_rate)
        losses = [fomaml_step(model, parameters, optimizer, inner, work, self.settings) for _, work in self.epoch_meta_steps(epoch)]
        return mean_losses(losses)


def fomaml_step(
    model: Potential,
    parameters: list[torch.nn.Parameter],
    outer: torch.optim.Optimizer,
    inner: torch.optim.Optimizer,
    work: list[tuple[Task, list[Batch]]],
    settings: TrainingSettings,
) -> dict[str, float]:
    """One FOMAML meta-step in place on `model` and the outer optimiser."""
    work = this_process_tasks(work)
    theta = parameters_to_vector(parameters).detach().clone()
    gradient = torch.zeros_like(theta)
    losses = []
    for _, batches in work:
        *support, query = batches
        copy_into_parameters(theta, parameters)
        if support:
            train_steps(model, inner, support, settings.loss)
        model.train()
        loss = batch_loss(model, query, settings.loss)
        inner.zero_grad(set_to_none=True)
        loss.total.backward()
        gradient += torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
        losses.append({"loss": float(loss.total.detach()), "energy_mse_per_atom_ev2": loss.energy_mse_per_atom_ev2}
                      | ({} if loss.force_mse_ev2_per_angstrom2 is None else {"force_mse_ev2_per_angstrom2": loss.force_mse_ev2_per_angstrom2}))
    totals = loss_totals(losses).to(theta.device, theta.dtype)
    counts = torch.tensor([float(len(work))], dtype=theta.dtype, device=theta.device)
    flat = distributed.sum_across_processes(torch.cat([gradient, counts, totals]))
    gradient, n_tasks, totals = flat[: theta.numel()], flat[theta.numel()], flat[theta.numel() + 1 :]
    copy_into_parameters(theta, parameters)
    offset = 0
    for parameter in parameters:
        parameter.grad = (gradient[offset : offset + parameter.numel()] / n_tasks).view_as(parameter).clone()
        offset += parameter.numel()
    outer.step()
    outer.zero_grad(set_to_none=True)
    return losses_from_totals(totals)


class Fomaml(Reptile):
    """First-order MAML over levels, one shared head; fine-tunes like `joint`."""

    name = "fomaml"

    def epoch_plan(self, tasks: list[Task], settings: TrainingSettings, budget: PretrainBudget) -> EpochPlan:
        return FomamlEpochs(tasks, settings, budget.reptile, self.meta_steps_per_epoch(tasks, budget))

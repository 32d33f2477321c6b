"""`joint`: one energy head on the mixture of all levels, each level with its own reference
(the k = 1 baseline of Allen et al.)."""

from metamlip.strategies.base import PretrainBudget, Strategy
from metamlip.training.loop import EpochPlan, MixedBatchEpochs, Task, TrainingSettings


class Joint(Strategy):
    name = "joint"

    def epoch_plan(self, tasks: list[Task], settings: TrainingSettings, budget: PretrainBudget) -> EpochPlan:
        return MixedBatchEpochs(tasks, settings, steps_per_epoch=budget.steps_per_epoch, task_sampling=budget.task_sampling)

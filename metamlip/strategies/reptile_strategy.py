"""`reptile`: meta-learning over levels with one shared head (see `metamlip.strategies.reptile`)."""

from metamlip.strategies.base import PretrainBudget, Strategy
from metamlip.strategies.reptile import ReptileEpochs
from metamlip.training.loop import EpochPlan, Task, TrainingSettings


class Reptile(Strategy):
    name = "reptile"

    def epoch_plan(self, tasks: list[Task], settings: TrainingSettings, budget: PretrainBudget) -> EpochPlan:
        reptile = budget.reptile
        steps_per_meta_step = reptile.inner_steps * min(reptile.tasks_per_meta_step, len(tasks))
        meta_steps = max(1, budget.steps_per_epoch // steps_per_meta_step)
        return ReptileEpochs(tasks, settings, reptile, meta_steps)

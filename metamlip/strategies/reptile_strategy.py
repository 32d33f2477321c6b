"""`reptile` and `reptile_multihead`: meta-learning over levels (see `metamlip.strategies.reptile`).

`reptile` shares one energy head between levels. `reptile_multihead` gives every level its own
head and reference: the inner loop trains the shared backbone plus that level's head, the
meta-update interpolates the backbone only, each head keeps its adapted weights, and a new
level's head starts from the mean of the heads (multi-head's gain, with meta-learning on the
backbone).
"""

from metamlip.model.potential import Potential
from metamlip.strategies.base import PretrainBudget, Strategy
from metamlip.strategies.multihead import head_from_mean, level_head_name
from metamlip.strategies.reptile import ReptileEpochs
from metamlip.training.loop import EpochPlan, Task, TrainingSettings


class Reptile(Strategy):
    name = "reptile"
    per_level_heads = False

    def meta_steps_per_epoch(self, tasks: list[Task], budget: PretrainBudget) -> int:
        """Meta-steps that spend about `steps_per_epoch` gradient steps (k per task, m tasks)."""
        reptile = budget.reptile
        return max(1, budget.steps_per_epoch // (reptile.inner_steps * min(reptile.tasks_per_meta_step, len(tasks))))

    def gradient_steps_per_epoch(self, tasks: list[Task], budget: PretrainBudget) -> int:
        reptile = budget.reptile
        return self.meta_steps_per_epoch(tasks, budget) * reptile.inner_steps * min(reptile.tasks_per_meta_step, len(tasks))

    def epoch_plan(self, tasks: list[Task], settings: TrainingSettings, budget: PretrainBudget) -> EpochPlan:
        meta_steps = self.meta_steps_per_epoch(tasks, budget)
        return ReptileEpochs(tasks, settings, budget.reptile, meta_steps, per_level_heads=self.per_level_heads)


class ReptileMultiHead(Reptile):
    name = "reptile_multihead"
    per_level_heads = True

    def head_for_level(self, level: str, level_index: int) -> str:
        return level_head_name(level_index)

    def finetune_head(self, model: Potential, target_level: str, head_source: str | None) -> str:
        return head_from_mean(model, head_source)

"""The strategy interface: how a model learns from several levels of theory before fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field

from metamlip.model.potential import SHARED_HEAD, Potential
from metamlip.strategies.reptile import ReptileSettings
from metamlip.training.loop import EpochPlan, Task, TrainingSettings


@dataclass(frozen=True)
class PretrainBudget:
    """Pre-training budget, the same for every strategy.

    Attributes:
        gradient_steps: optimiser steps in all (Reptile counts every inner step of every task).
        wall_seconds: optional wall-time limit, seconds.
        steps_per_epoch: gradient steps between two validations/checkpoints.
        task_sampling: 'size' (tasks drawn in proportion to their training-set size) or 'uniform'.
    """

    gradient_steps: int = 3000
    wall_seconds: float | None = None
    steps_per_epoch: int = 100
    task_sampling: str = "size"
    reptile: ReptileSettings = field(default_factory=ReptileSettings)

    @property
    def epochs(self) -> int:
        return max(1, -(-self.gradient_steps // self.steps_per_epoch))


class Strategy:
    """Base strategy: one shared head; subclasses override what differs."""

    name = "base"
    pretrains = True

    def head_for_level(self, level: str, level_index: int) -> str:
        """Name of the energy head a pre-training level trains."""
        return SHARED_HEAD

    def epoch_plan(self, tasks: list[Task], settings: TrainingSettings, budget: PretrainBudget) -> EpochPlan:
        raise NotImplementedError

    def finetune_head(self, model: Potential, target_level: str, head_source: str | None) -> str:
        """Name of the head the target level uses (created here when new)."""
        return SHARED_HEAD

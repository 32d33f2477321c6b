"""The strategy interface: how a model learns from several levels of theory before fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field

from metamlip.config import ModelSection
from metamlip.errors import InputError
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
        until: 'steps' (spend `gradient_steps`, keep the last weights) or 'converged' (stop when the
            validation loss has not improved for `patience` epochs, `gradient_steps` at most, and
            keep the best weights); the same rule for every strategy.
    """

    gradient_steps: int = 3000
    wall_seconds: float | None = None
    steps_per_epoch: int = 100
    task_sampling: str = "size"
    reptile: ReptileSettings = field(default_factory=ReptileSettings)
    until: str = "steps"
    patience: int = 10

    def __post_init__(self) -> None:
        if self.until not in ("steps", "converged"):
            raise InputError(f"config key 'pretrain.until' must be 'steps' or 'converged', got {self.until!r}")
        if self.gradient_steps < 1 or self.steps_per_epoch < 1 or self.patience < 1:
            raise InputError("config keys 'pretrain.gradient_steps', 'pretrain.steps_per_epoch' and 'pretrain.patience' must be at least 1")

    @property
    def epochs(self) -> int:
        return max(1, -(-self.gradient_steps // self.steps_per_epoch))


class Strategy:
    """Base strategy: one shared head; subclasses override what differs."""

    name = "base"
    pretrains = True

    def model_section(self, section: ModelSection) -> ModelSection:
        """The model shape this strategy trains (the config's, unless the strategy needs more)."""
        return section

    def pretraining_splits(self, splits: dict) -> dict:
        """The pre-training levels this strategy uses (all of them, unless it says otherwise)."""
        return splits

    def head_for_level(self, level: str, level_index: int) -> str:
        """Name of the energy head a pre-training level trains."""
        return SHARED_HEAD

    def epoch_plan(self, tasks: list[Task], settings: TrainingSettings, budget: PretrainBudget) -> EpochPlan:
        raise NotImplementedError

    def gradient_steps_per_epoch(self, tasks: list[Task], budget: PretrainBudget) -> int:
        """Optimiser steps (every inner step for meta-learners) one pre-training epoch takes."""
        return budget.steps_per_epoch

    def finetune_head(self, model: Potential, target_level: str, head_source: str | None) -> str:
        """Name of the head the target level uses (created here when new)."""
        return SHARED_HEAD

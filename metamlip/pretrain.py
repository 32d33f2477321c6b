"""Pre-training a potential on several levels of theory with a chosen strategy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from metamlip import distributed
from metamlip.config import ModelSection
from metamlip.data.batching import Batcher
from metamlip.data.lazy_batching import LevelData, make_batcher
from metamlip.data.references import EnergyReference
from metamlip.data.sources import read_sources
from metamlip.experiment.config import PretrainConfig
from metamlip.model.potential import Potential
from metamlip.strategies import PretrainBudget, Strategy, get_strategy
from metamlip.training.checkpoint import save_checkpoint
from metamlip.training.loop import FitResult, Task, TrainingSettings, fit
from metamlip.training.run_training import LevelSplit, model_dtype, new_potential, training_settings, use_threads, validation_splits


def level_tasks(model: Potential, splits: dict[str, LevelSplit], cutoff_angstrom: float, dtype) -> list[Task]:
    """Training and validation batchers of each level (in memory or packed), for `model`'s species."""

    def batcher(dataset: LevelData) -> Batcher:
        return make_batcher(dataset, model.species, cutoff_angstrom, dtype)

    return [
        Task(level, batcher(split.train), batcher(split.validation) if len(split.validation) else None)
        for level, split in splits.items()
    ]


def pretrain(
    strategy: Strategy,
    splits: dict[str, LevelSplit],
    elements: list[int],
    model_section: ModelSection,
    settings: TrainingSettings,
    budget: PretrainBudget,
    run_dir: str | Path,
    resume: bool = False,
) -> tuple[Potential, FitResult | None]:
    """A potential for `elements` pre-trained on every level of `splits` (untrained for `scratch`).

    Every strategy gets the same budget of gradient steps (and optional wall time); early
    stopping is off and the last weights are kept, so no strategy stops sooner than another.
    """
    model = new_potential(model_section, elements)
    if not strategy.pretrains:
        return model, None
    for index, (level, split) in enumerate(splits.items()):
        model.add_level(EnergyReference.fit(split.train, model.species), strategy.head_for_level(level, index))
    tasks = level_tasks(model, splits, model_section.cutoff_angstrom, model_dtype(model_section))
    settings = dataclasses.replace(
        settings,
        max_epochs=budget.epochs,
        max_wall_seconds=budget.wall_seconds,
        early_stopping_patience=budget.epochs + 1,
        min_learning_rate=0.0,
        restore_best=False,
    )
    result = fit(model, strategy.epoch_plan(tasks, settings, budget), tasks, settings, run_dir, resume=resume)
    return model, result


def run_pretraining(config: PretrainConfig, resume: bool = False) -> Path:
    """`metamlip pretrain`: read (or open packed) levels, split off validation, pre-train, save OUTPUT_DIR/model.pt."""
    strategy = get_strategy(config.strategy)
    use_threads(config.pretrain.training.threads)
    levels = read_sources(config.datasets, config.levels)
    splits = validation_splits(levels, config.pretrain.validation_fraction, config.split_seed)
    elements = sorted({z for dataset in levels.values() for z in dataset.elements})
    settings = training_settings(config.pretrain.training)
    run_dir = Path(config.output_dir)
    model, _ = pretrain(strategy, splits, elements, config.model, settings, config.pretrain.budget(), run_dir, resume)
    path = run_dir / "model.pt"
    if distributed.is_main_process():
        save_checkpoint(path, model, extra={"strategy": strategy.name})
    distributed.barrier()
    return path

"""Pre-training a potential on several levels of theory with a chosen strategy."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from metamlip import distributed
from metamlip.config import ModelSection
from metamlip.data.batching import Batcher
from metamlip.data.lazy_batching import LevelData, make_batcher
from metamlip.data.references import EnergyReference
from metamlip.data.sources import read_sources
from metamlip.errors import InputError
from metamlip.evaluation.metrics import evaluate
from metamlip.experiment.config import PretrainConfig
from metamlip.levels import normalise_level
from metamlip.model.potential import Potential
from metamlip.strategies import PretrainBudget, Strategy, get_strategy
from metamlip.training.checkpoint import save_checkpoint
from metamlip.training.loop import FitResult, Task, TrainingSettings, fit
from metamlip.training.run_training import LevelSplit, new_potential, training_settings, use_threads, validation_splits


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
    reference_anchors: dict[str, str] | None = None,
) -> tuple[Potential, FitResult | None]:
    """A potential for `elements` pre-trained on the strategy's levels of `splits` (untrained for `scratch`).

    Every strategy gets the same budget of gradient steps (and optional wall time). With
    `budget.until` 'steps' early stopping is off and the last weights are kept, so no strategy
    stops sooner than another; with 'converged' every strategy stops by the same patience rule
    on its validation loss and keeps its best weights. `reference_anchors` (level: anchor level) as
    in `level_reference`.
    """
    model = new_potential(strategy.model_section(model_section), elements)
    if not strategy.pretrains:
        return model, None
    tasks = pretraining_tasks(strategy, model, splits, reference_anchors or {})
    converged = budget.until == "converged"
    settings = dataclasses.replace(
        settings,
        max_epochs=budget.epochs,
        max_wall_seconds=budget.wall_seconds,
        early_stopping_patience=budget.patience if converged else budget.epochs + 1,
        min_learning_rate=0.0,
        restore_best=converged,
    )
    result = fit(model, strategy.epoch_plan(tasks, settings, budget), tasks, settings, run_dir, resume=resume)
    return model, result


def pretraining_tasks(
    strategy: Strategy, model: Potential, splits: dict[str, LevelSplit], reference_anchors: dict[str, str]
) -> list[Task]:
    """Register the strategy's levels on `model` (`level_reference`, head) and return their tasks."""
    reference_anchors = checked_reference_anchors(reference_anchors, splits)
    trained_splits = strategy.pretraining_splits(splits)
    for index, level in enumerate(trained_splits):
        model.add_level(level_reference(level, splits, model.species, reference_anchors), strategy.head_for_level(level, index))
    return level_tasks(model, trained_splits, model.config.cutoff_angstrom, next(model.parameters()).dtype)


def level_reference(level: str, splits: dict[str, LevelSplit], elements: list[int], reference_anchors: dict[str, str]) -> EnergyReference:
    """The level's energy reference, fitted on its training part; for a level with an anchor
    (`pretrain.reference_anchors`), anchored to that level's reference on the training
    structures both share (`EnergyReference.fit_anchored`)."""
    anchor = reference_anchors.get(level)
    if anchor is None:
        return EnergyReference.fit(splits[level].train, elements)
    anchor_reference = EnergyReference.fit(splits[anchor].train, elements)
    return EnergyReference.fit_anchored(splits[level].train, elements, anchor_reference, splits[anchor].train)


def checked_reference_anchors(reference_anchors: dict[str, str], splits: dict[str, LevelSplit]) -> dict[str, str]:
    """`pretrain.reference_anchors` with normalised level names; InputError naming the key when an
    anchored level or its anchor is not read, or an anchor has one itself."""
    reference_anchors = {normalise_level(level): normalise_level(anchor) for level, anchor in reference_anchors.items()}
    for level, anchor in reference_anchors.items():
        for name in (level, anchor):
            if name not in splits:
                raise InputError(f"pretrain.reference_anchors: level {name!r} is not among the pre-training levels {sorted(splits)}")
        if anchor in reference_anchors:
            raise InputError(f"pretrain.reference_anchors: the anchor {anchor!r} of {level!r} is anchored itself; an anchor fits its own reference")
    return reference_anchors


def pretraining_summary(
    strategy: Strategy, model: Potential, splits: dict[str, LevelSplit], result: FitResult | None, budget: PretrainBudget
) -> dict:
    """What a pre-training cost and reached: gradient steps, epochs, wall seconds, stop reason, and the
    validation energy and force MAE of every level it trained on (eV, eV/Angstrom)."""
    if result is None:
        return {"gradient_steps": 0, "epochs": 0, "wall_seconds": 0.0, "stop_reason": "not pre-trained", "validation": {}}
    splits = strategy.pretraining_splits(splits)
    tasks = level_tasks(model, splits, model.config.cutoff_angstrom, next(model.parameters()).dtype)
    validation = {}
    for task in tasks:
        if task.validation is not None:
            metrics = evaluate(model, task.validation)
            validation[task.level] = {"energy_mae_ev": metrics.energy_mae_ev, "force_mae_ev_per_angstrom": metrics.force_mae_ev_per_angstrom}
    return {
        "gradient_steps": result.epochs_run * strategy.gradient_steps_per_epoch(tasks, budget),
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "wall_seconds": round(result.wall_seconds, 2),
        "stop_reason": result.stop_reason,
        "validation": validation,
    }


def run_pretraining(config: PretrainConfig, resume: bool = False) -> Path:
    """`metamlip pretrain`: read (or open packed) levels, split off validation, pre-train, save OUTPUT_DIR/model.pt."""
    strategy = get_strategy(config.strategy)
    levels = read_sources(config.datasets, config.levels)
    use_threads(config.pretrain.training.threads, levels.values())
    splits = validation_splits(levels, config.pretrain.validation_fraction, config.split_seed)
    elements = sorted({z for dataset in levels.values() for z in dataset.elements})
    settings = training_settings(config.pretrain.training)
    run_dir = Path(config.output_dir)
    budget = config.pretrain.budget()
    model, result = pretrain(strategy, splits, elements, config.model, settings, budget, run_dir, resume, config.pretrain.reference_anchors)
    path = run_dir / "model.pt"
    summary = pretraining_summary(strategy, model, splits, result, budget)
    if distributed.is_main_process():
        save_checkpoint(path, model, extra={"strategy": strategy.name, "pretraining": json.dumps(summary)})
    distributed.barrier()
    return path

"""`metamlip train` as a library call: read, split, fit references, train, test."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from metamlip import distributed
from metamlip.config import ModelSection, SplitConfig, TrainConfig, TrainingSection
from metamlip.data.batching import Batcher
from metamlip.data.lazy_batching import LevelData, make_batcher
from metamlip.data.references import EnergyReference
from metamlip.data.sources import read_sources
from metamlip.errors import InputError
from metamlip.evaluation.metrics import ErrorMetrics, error_metrics, predict
from metamlip.evaluation.parity import plot_parity
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.potential import Potential, build_potential
from metamlip.training.loop import FitResult, MixedBatchEpochs, Task, TrainingSettings, fit
from metamlip.training.checkpoint import save_checkpoint
from metamlip.training.loss import LossWeights
from metamlip.training.refit import refit_reference

log = logging.getLogger("metamlip.training")


@dataclass
class LevelSplit:
    """The three parts of one level's data."""

    train: LevelData
    validation: LevelData
    test: LevelData


@dataclass
class TrainReport:
    """What `run_training` produced: the fit, and test metrics per level."""

    fit: FitResult
    test_metrics: dict[str, ErrorMetrics]
    run_dir: Path


def split_counts(n_structures: int, split: SplitConfig) -> tuple[int, int, int]:
    """Numbers of train, validation and test structures (fractions < 1 are of `n_structures`)."""

    def count(value: float | None, default: int) -> int:
        if value is None:
            return default
        return int(round(value * n_structures)) if 0 < value < 1 else int(value)

    n_train = count(split.train, 0)
    n_validation = count(split.validation, 0)
    n_test = count(split.test, n_structures - n_train - n_validation)
    if n_train < 1 or n_train + n_validation + n_test > n_structures:
        raise InputError(
            f"split: train {n_train} + validation {n_validation} + test {n_test} does not fit {n_structures} structures"
        )
    return n_train, n_validation, n_test


def split_dataset(dataset: LevelData, split: SplitConfig) -> LevelSplit:
    """Seeded permutation; the first structures train, the next validate, the rest test."""
    n_train, n_validation, n_test = split_counts(len(dataset), split)
    order = np.random.RandomState(split.seed).permutation(len(dataset))
    return LevelSplit(
        train=dataset.subset(order[:n_train]),
        validation=dataset.subset(order[n_train : n_train + n_validation]),
        test=dataset.subset(order[n_train + n_validation : n_train + n_validation + n_test]),
    )


def training_settings(section: TrainingSection) -> TrainingSettings:
    """The loop's settings from the config section: every field of the same name, and the loss weights."""
    shared = {field.name: getattr(section, field.name) for field in fields(TrainingSettings) if hasattr(section, field.name)}
    return TrainingSettings(**shared, loss=LossWeights(energy=section.energy_weight, forces=section.force_weight))


def use_threads(threads: int | None) -> None:
    """Set PyTorch's intra-op threads from config key `training.threads` (None: PyTorch's default)."""
    if threads:
        torch.set_num_threads(threads)


def model_dtype(section: ModelSection) -> torch.dtype:
    if section.dtype not in ("float32", "float64"):
        raise InputError(f"config key 'model.dtype' must be float32 or float64, got {section.dtype!r}")
    return getattr(torch, section.dtype)


def new_potential(section: ModelSection, elements: list[int]) -> Potential:
    """A fresh potential shaped by the config's model section."""
    shape = {field.name: getattr(section, field.name) for field in fields(HipnnConfig)}
    return build_potential(elements, HipnnConfig(**shape), seed=section.seed, dtype=model_dtype(section))


def validation_splits(levels: dict[str, LevelData], fraction: float, seed: int) -> dict[str, LevelSplit]:
    """Each level split into training and validation parts only (pre-training levels)."""
    split = SplitConfig(seed=seed, train=1 - fraction, validation=fraction, test=0)
    return {level: split_dataset(dataset, split) for level, dataset in levels.items()}


def run_training(config: TrainConfig, resume: bool = False) -> TrainReport:
    """Train one potential (one shared head) on all configured levels and test it."""
    use_threads(config.training.threads)
    run_dir = Path(config.output_dir)
    splits = {level: split_dataset(dataset, config.split) for level, dataset in read_sources(config.datasets).items()}
    elements = sorted({z for split in splits.values() for z in split.train.elements + split.validation.elements + split.test.elements})
    model = new_potential(config.model, elements)
    for level, split in splits.items():
        model.add_level(EnergyReference.fit(split.train, model.species))
        log.info("%s: %d train, %d validation, %d test structures", level, len(split.train), len(split.validation), len(split.test))

    def batcher(dataset: LevelData) -> Batcher:
        return make_batcher(dataset, model.species, config.model.cutoff_angstrom, model_dtype(config.model))

    tasks = [Task(level, batcher(split.train), batcher(split.validation) if len(split.validation) else None) for level, split in splits.items()]
    settings = training_settings(config.training)
    result = fit(model, MixedBatchEpochs(tasks, settings), tasks, settings, run_dir, resume=resume)
    if config.training.refit_reference:
        for task in tasks:
            refit_reference(model, task.train, task.level)  # on every process: the same weights, the same fit
        if distributed.is_main_process():
            save_checkpoint(run_dir / "model.pt", model, extra={"best_epoch": result.best_epoch, "stop_reason": result.stop_reason})
    test_metrics = _test(model, splits, batcher, run_dir) if distributed.is_main_process() else {}
    distributed.barrier()
    return TrainReport(result, test_metrics, run_dir)


def _test(model: Potential, splits: dict[str, LevelSplit], batcher: Callable[[LevelData], Batcher], run_dir: Path) -> dict[str, ErrorMetrics]:
    """Test metrics of every level with a test set; writes test_metrics.json and parity plots."""
    test_metrics = {}
    for level, split in splits.items():
        if len(split.test):
            predictions = predict(model, batcher(split.test))
            test_metrics[level] = error_metrics(predictions)
            plot_parity(predictions, run_dir / f"parity_{_slug(level)}.png", title=f"{level}: test set")
    (run_dir / "test_metrics.json").write_text(
        json.dumps({level: metrics.to_dict() for level, metrics in test_metrics.items()}, indent=2), encoding="utf-8"
    )
    return test_metrics


def _slug(level: str) -> str:
    return "".join(character if character.isalnum() or character in "-+" else "_" for character in level)

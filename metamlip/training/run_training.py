"""`metamlip train` as a library call: read, split, fit references, train, test."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
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
from metamlip.model.mace_config import MaceConfig
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


SPLIT_KEYS: tuple[str, str, str] = ("split.train", "split.validation", "split.test")


def split_counts(n_structures: int, split: SplitConfig, keys: tuple[str, str, str] = SPLIT_KEYS, where: str = "data") -> tuple[int, int, int]:
    """Numbers of train, validation and test structures (fractions < 1 are of `n_structures`);
    InputError naming the config `keys` when they ask for more structures than `where` has."""

    def count(value: float | None, default: int) -> int:
        if value is None:
            return default
        return int(round(value * n_structures)) if 0 < value < 1 else int(value)

    counts = [count(split.train, 0), count(split.validation, 0)]
    counts.append(count(split.test, n_structures - sum(counts)))
    asked = [(key, n) for key, n, value in zip(keys, counts, (split.train, split.validation, split.test)) if value is not None]
    if sum(n for _, n in asked) > n_structures:
        wanted = " + ".join(f"{key} {n}" for key, n in asked)
        raise InputError(f"{wanted} = {sum(n for _, n in asked)} structures, more than the {n_structures} of {where}")
    if counts[0] < 1 or min(counts) < 0:
        raise InputError(f"{', '.join(f'{key} {n}' for key, n in zip(keys, counts))}: at least 1 structure of {where} must train, none may be negative")
    return counts[0], counts[1], counts[2]


def split_dataset(dataset: LevelData, split: SplitConfig, keys: tuple[str, str, str] = SPLIT_KEYS) -> LevelSplit:
    """Seeded permutation; the first structures train, the next validate, the rest test."""
    n_train, n_validation, n_test = split_counts(len(dataset), split, keys, f"level {dataset.level!r} ({dataset.source})")
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


SMALL_STRUCTURE_ATOMS = 50  # below this mean size one thread per process is fastest (threads only add overhead)
MAX_DEFAULT_THREADS = 4


def default_threads(mean_atoms: float) -> int:
    """Threads when `training.threads` is not set: 1 for structures of fewer than
    `SMALL_STRUCTURE_ATOMS` atoms on average, else min(4, this process's share of the cores)."""
    if mean_atoms < SMALL_STRUCTURE_ATOMS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun processes on this node share the cores
    return max(1, min(MAX_DEFAULT_THREADS, cores // processes))


def use_threads(threads: int | None, levels: Iterable[LevelData] = ()) -> int:
    """Set PyTorch's intra-op threads: config key `training.threads`, or else `default_threads`
    of the mean structure size of `levels`; logs and returns the count."""
    sizes = [np.asarray(level.n_atoms) for level in levels]
    mean_atoms = float(np.concatenate(sizes).mean()) if sum(len(size) for size in sizes) else 0.0
    chosen = threads or default_threads(mean_atoms)
    torch.set_num_threads(chosen)
    why = "training.threads" if threads else f"default for {mean_atoms:.0f} atoms per structure; set training.threads to change"
    log.info("using %d PyTorch thread%s (%s)", chosen, "" if chosen == 1 else "s", why)
    return chosen


def model_dtype(section: ModelSection) -> torch.dtype:
    if section.dtype not in ("float32", "float64"):
        raise InputError(f"config key 'model.dtype' must be float32 or float64, got {section.dtype!r}")
    return getattr(torch, section.dtype)


def new_potential(section: ModelSection, elements: list[int]) -> Potential:
    """A fresh potential shaped by the config's model section (`model.backbone` picks HIP-NN or MACE)."""
    return build_potential(elements, backbone_shape(section), seed=section.seed, dtype=model_dtype(section))


def backbone_shape(section: ModelSection) -> HipnnConfig | MaceConfig:
    """The chosen backbone's shape: the HIP-NN keys of `model`, or `model.mace`; either with
    `model.n_level_features`."""
    if section.backbone == "mace":
        return MaceConfig(**asdict(section.mace), n_level_features=section.n_level_features)
    return HipnnConfig(**{field.name: getattr(section, field.name) for field in fields(HipnnConfig)})


def validation_splits(levels: dict[str, LevelData], fraction: float, seed: int) -> dict[str, LevelSplit]:
    """Each level split into training and validation parts only (pre-training levels)."""
    split = SplitConfig(seed=seed, train=1 - fraction, validation=fraction, test=0)
    return {level: split_dataset(dataset, split) for level, dataset in levels.items()}


def run_training(config: TrainConfig, resume: bool = False) -> TrainReport:
    """Train one potential (one shared head) on all configured levels and test it."""
    run_dir = Path(config.output_dir)
    levels = read_sources(config.datasets)
    use_threads(config.training.threads, levels.values())
    splits = {level: split_dataset(dataset, config.split) for level, dataset in levels.items()}
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
    write_test_metrics(run_dir, test_metrics)
    return test_metrics


def write_test_metrics(run_dir: Path, test_metrics: dict[str, ErrorMetrics]) -> None:
    """RUN_DIR/test_metrics.json: {level: metrics} (energies in eV, forces in eV/Angstrom)."""
    (run_dir / "test_metrics.json").write_text(
        json.dumps({level: metrics.to_dict() for level, metrics in test_metrics.items()}, indent=2), encoding="utf-8"
    )


def _slug(level: str) -> str:
    return "".join(character if character.isalnum() or character in "-+" else "_" for character in level)

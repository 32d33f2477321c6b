"""`metamlip experiment`: pre-train every strategy with one budget, fine-tune each on N target
structures for every N and seed, and test on a held-out target set no training ever sees."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path

import numpy as np
import torch

from metamlip import __version__
from metamlip.data.lazy_batching import LevelData, make_batcher
from metamlip.data.sources import read_sources
from metamlip.errors import InputError
from metamlip.evaluation.metrics import evaluate
from metamlip.experiment.config import ExperimentConfig
from metamlip.experiment.records import FinetuneRecord, summarise
from metamlip.experiment.report import write_report
from metamlip.experiment.scans import ScanReference, load_scan_references, scan_model
from metamlip.finetune import FinetuneOptions, finetune
from metamlip.levels import normalise_level
from metamlip.model.potential import Potential
from metamlip.pretrain import pretrain
from metamlip.strategies import Strategy, get_strategy
from metamlip.training.checkpoint import load_potential, save_checkpoint
from metamlip.training.run_training import LevelSplit, training_settings, validation_splits

log = logging.getLogger("metamlip.experiment")


def read_experiment_levels(config: ExperimentConfig) -> dict[str, LevelData]:
    """Every level named by the config, read from its datasets; errors before any training."""
    for name in config.strategies:
        get_strategy(name)
    if not config.target_level:
        raise InputError("config key 'target_level' is missing")
    if not config.pretrain_levels and any(get_strategy(name).pretrains for name in config.strategies):
        raise InputError("config key 'pretrain_levels' is empty but pre-training strategies are listed")
    wanted = [normalise_level(level) for level in config.pretrain_levels] + [normalise_level(config.target_level)]
    if len(set(wanted)) != len(wanted):
        raise InputError(f"config keys 'pretrain_levels' and 'target_level' repeat a level: {wanted}")
    return read_sources(config.datasets, wanted)


def hold_out_target(target: LevelData, n_test: int, seed: int) -> tuple[LevelData, LevelData]:
    """(test set, pool for fine-tuning): a seeded permutation, the first `n_test` structures test."""
    if not 0 < n_test < len(target):
        raise InputError(f"n_test {n_test} must be between 1 and {len(target) - 1} for {len(target)} target structures")
    order = np.random.RandomState(seed).permutation(len(target))
    return target.subset(order[:n_test]), target.subset(order[n_test:])


def finetune_subsets(pool: LevelData, n_finetune: int, n_validation: int, seed: int) -> tuple[LevelData, LevelData]:
    """N training and V validation structures drawn from the pool with `seed` (same for every strategy)."""
    if n_finetune + n_validation > len(pool):
        raise InputError(f"n_finetune {n_finetune} + validation {n_validation} exceed the {len(pool)} target structures left for fine-tuning")
    order = np.random.default_rng([seed, n_finetune]).permutation(len(pool))
    return pool.subset(order[:n_finetune]), pool.subset(order[n_finetune : n_finetune + n_validation])


def pretrain_cache_key(config: ExperimentConfig, strategy: Strategy, elements: list[int]) -> str:
    """Hash of everything that determines a pre-trained model (not the fine-tuning settings)."""
    relevant = {
        "version": __version__,
        "strategy": strategy.name,
        "elements": elements,
        "datasets": [asdict(source) | {"bytes": Path(source.path).stat().st_size} for source in config.datasets],
        "levels": config.pretrain_levels,
        "split_seed": config.split_seed,
        "model": asdict(config.model),
        "pretrain": asdict(config.pretrain),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def pretrained_model(
    config: ExperimentConfig, strategy: Strategy, splits: dict[str, LevelSplit], elements: list[int], out_dir: Path
) -> Potential:
    """The strategy's pre-trained model, from the cache when the same config trained it before."""
    path = out_dir / "pretrained" / f"{strategy.name}-{pretrain_cache_key(config, strategy, elements)}.pt"
    if path.exists():
        log.info("%s: reusing pre-trained model %s", strategy.name, path)
        return load_potential(path).train()
    started = time.perf_counter()
    settings = training_settings(config.pretrain.training)
    model, _ = pretrain(
        strategy, splits, elements, config.model, settings, config.pretrain.budget(), out_dir / "runs" / f"pretrain-{strategy.name}"
    )
    save_checkpoint(path, model, extra={"strategy": strategy.name, "pretrain_seconds": time.perf_counter() - started})
    log.info("%s: pre-trained in %.0f s", strategy.name, time.perf_counter() - started)
    return model


@dataclass
class ExperimentData:
    """Everything the strategies share: the held-out test set, the fine-tuning pool, the
    pre-training splits, the elements and the reference scans."""

    target_level: str
    test: LevelData
    pool: LevelData
    pretrain_splits: dict[str, LevelSplit]
    elements: list[int]
    scan_references: list[ScanReference]


def prepare_experiment(config: ExperimentConfig) -> ExperimentData:
    """Read and split all data; every error in the config or the data surfaces here, before training."""
    levels = read_experiment_levels(config)
    target_level = normalise_level(config.target_level)
    scan_references = load_scan_references(config.scans)
    test, pool = hold_out_target(levels[target_level], config.n_test, config.split_seed)
    pretraining_levels = {level: dataset for level, dataset in levels.items() if level != target_level}
    pretrain_splits = validation_splits(pretraining_levels, config.pretrain.validation_fraction, config.split_seed)
    for n_finetune in config.finetune.n_finetune:
        finetune_subsets(pool, n_finetune, config.finetune.n_validation(n_finetune), 0)
    elements = sorted({z for dataset in levels.values() for z in dataset.elements})
    return ExperimentData(target_level, test, pool, pretrain_splits, elements, scan_references)


def run_strategy(config: ExperimentConfig, data: ExperimentData, name: str) -> list[FinetuneRecord]:
    """Pre-train one strategy (or reuse its cache), fine-tune it for every N and seed, test each model."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(config.output_dir)
    strategy = get_strategy(name)
    base = pretrained_model(config, strategy, data.pretrain_splits, data.elements, out_dir)
    settings = training_settings(config.finetune.training)
    options = FinetuneOptions(config.finetune.freeze_backbone, config.finetune.head_source, config.finetune.training.refit_reference)
    records = []
    for n_finetune in config.finetune.n_finetune:
        for seed in range(config.finetune.seeds):
            train, validation = finetune_subsets(data.pool, n_finetune, config.finetune.n_validation(n_finetune), seed)
            run_dir = out_dir / "runs" / f"finetune-{name}-n{n_finetune}-seed{seed}"
            model, fit_result = finetune(base, strategy, train, validation, settings, run_dir, options)
            dtype = next(model.parameters()).dtype
            metrics = evaluate(model, make_batcher(data.test, model.species, model.config.cutoff_angstrom, dtype))
            scans = {reference.name: scan_model(model, reference, data.target_level) for reference in data.scan_references}
            records.append(FinetuneRecord(name, n_finetune, seed, metrics, scans, fit_result.epochs_run, fit_result.wall_seconds))
            log.info("%s N=%d seed=%d: test energy MAE %.4f eV", name, n_finetune, seed, metrics.energy_mae_ev)
    return records


def run_experiment(config: ExperimentConfig) -> dict:
    """Run the whole comparison; writes results.json, report.md and plots; returns the results.

    With `workers` > 1 the strategies run in parallel processes; every run is seeded, so the
    results do not depend on the number of workers."""
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    data = prepare_experiment(config)
    if config.workers > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(config.workers, mp_context=context, initializer=_quiet_worker) as pool:
            per_strategy = list(pool.map(run_strategy, repeat(config), repeat(data), config.strategies))
    else:
        per_strategy = [run_strategy(config, data, name) for name in config.strategies]
    records = [record for strategy_records in per_strategy for record in strategy_records]
    results = {
        "metamlip_version": __version__,
        "target_level": data.target_level,
        "pretrain_levels": list(data.pretrain_splits),
        "n_test": len(data.test),
        "records": summarise(records),
        "runs": [record.to_dict() for record in records],
    }
    (Path(config.output_dir) / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    write_report(config, results, records, data.scan_references)
    return results


def _quiet_worker() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")

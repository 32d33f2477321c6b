"""`metamlip experiment`: pre-train every strategy with one budget, fine-tune each on N target
structures for every N and seed, and test on a held-out target set no training ever sees."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from metamlip import __version__
from metamlip.atomic_files import write_json_atomically
from metamlip.config import DataSource, from_mapping, set_dotted_key
from metamlip.data.lazy_batching import LevelData, make_batcher
from metamlip.data.sources import read_sources
from metamlip.errors import InputError
from metamlip.evaluation.metrics import evaluate
from metamlip.experiment.config import ExperimentConfig
from metamlip.experiment.records import FinetuneRecord, summarise
from metamlip.experiment.report import pretraining_section, write_report
from metamlip.experiment.scans import ScanReference, load_scan_references, scan_model
from metamlip.experiment.statistics import claim_check, pairwise_comparisons
from metamlip.finetune import FinetuneOptions, finetune
from metamlip.levels import level_slug, normalise_level
from metamlip.model.potential import Potential
from metamlip.parent_watch import end_with_parent, stop_pool
from metamlip.pretrain import checked_reference_anchors, pretrain, pretraining_summary
from metamlip.strategies import META_LEARNERS, SINGLE_LEVEL_PREFIX, Strategy, get_strategy
from metamlip.training.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from metamlip.training.loop import CHECKPOINT_NAME
from metamlip.training.signals import TrainingInterrupted
from metamlip.training.run_training import LevelSplit, training_settings, validation_splits

OVERRIDABLE_SECTIONS = ("pretrain", "finetune", "model")
SHARED_KEYS = ("finetune.n_finetune", "finetune.seeds", "finetune.validation_fraction", "finetune.min_validation", "pretrain.validation_fraction")

log = logging.getLogger("metamlip.experiment")


def strategy_names(config: ExperimentConfig) -> list[str]:
    """The configured strategies, `single` expanded to one `single:LEVEL` per pre-training level."""
    names = []
    for name in config.strategies:
        if name == "single":
            names += [SINGLE_LEVEL_PREFIX + normalise_level(level) for level in config.pretrain_levels]
        else:
            names.append(name)
    return names


def config_for_strategy(config: ExperimentConfig, name: str) -> ExperimentConfig:
    """The config with the strategy's `strategy_settings` applied (dotted keys of `pretrain.`,
    `finetune.` or `model.`); `single` settings apply to every `single:LEVEL`."""
    overrides = config.strategy_settings.get(name)
    if overrides is None and name.startswith(SINGLE_LEVEL_PREFIX):
        overrides = config.strategy_settings.get("single")
    if not overrides:
        return config
    mapping = asdict(config)
    where = f"config key 'strategy_settings.{name}'"
    for key, value in overrides.items():
        if key.split(".")[0] not in OVERRIDABLE_SECTIONS or key in SHARED_KEYS:
            raise InputError(
                f"{where}: {key!r} cannot differ between strategies (allowed: keys of {', '.join(OVERRIDABLE_SECTIONS)} "
                f"except {', '.join(SHARED_KEYS)}, which fix the data every strategy shares)"
            )
        set_dotted_key(mapping, key, value, where)
    return from_mapping(ExperimentConfig, mapping, where=where)


def check_strategies(config: ExperimentConfig) -> None:
    """Every strategy known, every `single:LEVEL` a pre-training level, every setting valid."""
    pretraining = {normalise_level(level) for level in config.pretrain_levels}
    for name in strategy_names(config):
        strategy = get_strategy(name)
        if name.startswith(SINGLE_LEVEL_PREFIX) and strategy.level not in pretraining:
            raise InputError(f"strategy {name!r}: {strategy.level!r} is not one of 'pretrain_levels' {sorted(pretraining)}")
        config_for_strategy(config, name)
    unused = set(config.strategy_settings) - set(strategy_names(config)) - {"single"}
    if unused:
        raise InputError(f"config key 'strategy_settings' names strategies that are not run: {sorted(unused)}")


def read_selection(config: ExperimentConfig) -> tuple[ExperimentConfig, dict | None]:
    """The config with the settings chosen in `selection_file` added to `strategy_settings` (entries
    there win), and the selection restricted to the strategies run (None without a file)."""
    if config.selection_file is None:
        return config, None
    path = Path(config.selection_file)
    try:
        selection = json.loads(path.read_text(encoding="utf-8"))
        chosen, scores, proxies = selection["chosen"], selection["scores"], selection["proxy_levels"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"config key 'selection_file': {path}: not a selection.json of `metamlip select` ({error!r})") from None
    names = set(strategy_names(config))
    taken = {name: settings for name, settings in chosen.items() if name in names and name not in config.strategy_settings}
    settings = {**taken, **config.strategy_settings}
    config = from_mapping(ExperimentConfig, asdict(config) | {"strategy_settings": settings}, where=str(path))
    kept = {
        "file": str(path),
        "proxy_levels": proxies,
        "target_level_read": selection.get("target_level_read", False),
        "chosen": {name: chosen[name] for name in chosen if name in names},
        "scores": [item for item in scores if item["strategy"] in names],
    }
    return config, kept


def read_experiment_levels(config: ExperimentConfig) -> dict[str, LevelData]:
    """Every level named by the config, read from its datasets; errors before any training."""
    check_strategies(config)
    if not config.target_level:
        raise InputError("config key 'target_level' is missing")
    if not config.pretrain_levels and any(get_strategy(name).pretrains for name in strategy_names(config)):
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
    """Hash of everything that determines a pre-trained model (not the fine-tuning settings).

    A `datasets` entry declared to hold only the target level is left out: target data that grows
    (a labelling still running) keeps the finished pre-trainings."""
    relevant = {
        "version": __version__,
        "strategy": strategy.name,
        "elements": elements,
        "datasets": pretraining_data_identity(config),
        "levels": config.pretrain_levels,
        "split_seed": config.split_seed,
        "model": asdict(config.model),
        "pretrain": pretrain_section_identity(config),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def pretrain_section_identity(config: ExperimentConfig) -> dict:
    """`pretrain` as the cache key sees it: no `reference_anchors` key when there are none, so
    pre-trainings cached before the option existed are found again."""
    section = asdict(config.pretrain)
    if not section["reference_anchors"]:
        del section["reference_anchors"]
    return section


def declared_levels(source: DataSource) -> set[str] | None:
    """The levels a source's config entry names (``level`` or ``levels``), None when it names none."""
    names = source.levels or ([source.level] if source.level else None)
    return {normalise_level(name) for name in names} if names else None


def non_target_sources(config: ExperimentConfig) -> list[DataSource]:
    """The datasets minus those declared to hold only the target level (`select` never opens them)."""
    target = normalise_level(config.target_level)
    return [source for source in config.datasets if declared_levels(source) != {target}]


def pretraining_data_identity(config: ExperimentConfig) -> list[dict]:
    """`data_identity` of every `non_target_sources` entry."""
    return [data_identity(asdict(source)) for source in non_target_sources(config)]


def data_identity(source: dict) -> dict:
    """A `datasets` entry as the cache key sees it: its settings, its file's name and the SHA-256 of
    its contents (of every file, by name, for a packed level's folder), not where it lies, so a
    copied or moved study finds its cache."""
    path = Path(source.pop("path"))
    if path.is_dir():
        return source | {"file": path.name, "sha256": [(child.name, file_sha256(child)) for child in sorted(path.iterdir()) if child.is_file()]}
    return source | {"file": path.name, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, computed once per process while its size and modification time stay."""
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """`file_sha256`, cached on the path, size and time."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def pretrained_model(
    config: ExperimentConfig, strategy: Strategy, splits: dict[str, LevelSplit], elements: list[int], out_dir: Path
) -> tuple[Potential, dict]:
    """The strategy's pre-trained model and its `pretraining_summary`, from the cache when the same
    config trained it before. A pre-training that was stopped (signal, killed process) resumes from
    its last checkpoint, kept in a run folder named by the same cache key."""
    name = f"{level_slug(strategy.name)}-{pretrain_cache_key(config, strategy, elements)}"
    path = out_dir / "pretrained" / f"{name}.pt"
    if path.exists():
        log.info("%s: reusing pre-trained model %s", strategy.name, path)
        payload = read_checkpoint(path)
        return model_from_checkpoint(payload).train(), json.loads(payload["extra"]["pretraining"])
    settings = training_settings(config.pretrain.training)
    budget = config.pretrain.budget()
    run_dir = out_dir / "runs" / f"pretrain-{name}"
    resume = (run_dir / CHECKPOINT_NAME).exists()
    if resume:
        log.info("%s: resuming the stopped pre-training in %s", strategy.name, run_dir)
    model, result = pretrain(strategy, splits, elements, config.model, settings, budget, run_dir, resume, config.pretrain.reference_anchors)
    summary = pretraining_summary(strategy, model, splits, result, budget)
    save_checkpoint(path, model, extra={"strategy": strategy.name, "pretraining": json.dumps(summary)})
    log.info("%s: pre-trained in %.0f s (%s)", strategy.name, summary["wall_seconds"], summary["stop_reason"])
    return model, summary


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
    return split_experiment_levels(config, read_experiment_levels(config))


def split_experiment_levels(config: ExperimentConfig, levels: dict[str, LevelData]) -> ExperimentData:
    """The target's test set and fine-tuning pool, and the pre-training levels' splits, from read levels."""
    target_level = normalise_level(config.target_level)
    scan_references = load_scan_references(config.scans)
    test, pool = hold_out_target(levels[target_level], config.n_test, config.split_seed)
    pretrain_splits, elements = pretraining_data(config, levels)
    for n_finetune in config.finetune.n_finetune:
        finetune_subsets(pool, n_finetune, config.finetune.n_validation(n_finetune), 0)
    return ExperimentData(target_level, test, pool, pretrain_splits, elements, scan_references)


def pretraining_data(config: ExperimentConfig, levels: dict[str, LevelData]) -> tuple[dict[str, LevelSplit], list[int]]:
    """The pre-training levels' train/validation splits and the elements of every level (the model's species)."""
    target_level = normalise_level(config.target_level)
    pretraining_levels = {level: dataset for level, dataset in levels.items() if level != target_level}
    pretrain_splits = validation_splits(pretraining_levels, config.pretrain.validation_fraction, config.split_seed)
    checked_reference_anchors(config.pretrain.reference_anchors, pretrain_splits)  # fails here, before any training
    return pretrain_splits, sorted({z for dataset in levels.values() for z in dataset.elements})


def run_strategy(config: ExperimentConfig, data: ExperimentData, name: str) -> tuple[list[FinetuneRecord], dict]:
    """Pre-train one strategy (or reuse its cache), fine-tune it for every N and seed, test each model;
    returns the records and the pre-training summary."""
    if config.threads:
        torch.set_num_threads(config.threads)
    config = config_for_strategy(config, name)
    out_dir = Path(config.output_dir)
    strategy = get_strategy(name)
    base, summary = pretrained_model(config, strategy, data.pretrain_splits, data.elements, out_dir)
    settings = training_settings(config.finetune.training)
    options = FinetuneOptions(config.finetune.freeze_backbone, config.finetune.head_source, config.finetune.training.refit_reference)
    records = []
    for n_finetune in config.finetune.n_finetune:
        for seed in range(config.finetune.seeds):
            train, validation = finetune_subsets(data.pool, n_finetune, config.finetune.n_validation(n_finetune), seed)
            run_dir = out_dir / "runs" / f"finetune-{level_slug(name)}-n{n_finetune}-seed{seed}"
            model, fit_result = finetune(base, strategy, train, validation, settings, run_dir, options)
            dtype = next(model.parameters()).dtype
            metrics = evaluate(model, make_batcher(data.test, model.species, model.config.cutoff_angstrom, dtype))
            scans = {reference.name: scan_model(model, reference, data.target_level) for reference in data.scan_references}
            records.append(FinetuneRecord(name, n_finetune, seed, metrics, scans, fit_result.epochs_run, fit_result.wall_seconds))
            log.info("%s N=%d seed=%d: test energy MAE %.4f eV", name, n_finetune, seed, metrics.energy_mae_ev)
    return records, summary


def pretrain_strategy(config: ExperimentConfig, splits: dict[str, LevelSplit], elements: list[int], name: str) -> dict:
    """Pre-train one strategy into the cache under OUTPUT_DIR/pretrained/ (or find it there); its summary."""
    if config.threads:
        torch.set_num_threads(config.threads)
    config = config_for_strategy(config, name)
    _, summary = pretrained_model(config, get_strategy(name), splits, elements, Path(config.output_dir))
    return summary


def run_pretraining_only(config: ExperimentConfig) -> dict[str, dict]:
    """`metamlip experiment --pretrain-only`: pre-train every strategy into the cache that a later full
    run reuses, and nothing else; strategy name -> pre-training summary.

    The target level is read for its elements only (no test split, no size checks), so this can run
    while the target is still being labelled. Writes the summaries to OUT/pretraining.json and their
    table (steps, wall time, validation errors per level) to OUT/pretraining.md."""
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config, _ = read_selection(config)
    splits, elements = pretraining_data(config, read_experiment_levels(config))
    names = strategy_names(config)
    jobs = [(config, splits, elements, name) for name in names]
    summaries = dict(zip(names, map_in_workers(pretrain_strategy, jobs, config.workers, config.threads, out_dir)))
    write_json_atomically(out_dir / "pretraining.json", summaries)
    (out_dir / "pretraining.md").write_text("\n".join(pretraining_section({"pretraining": summaries})), encoding="utf-8")
    return summaries


def run_experiment(config: ExperimentConfig) -> dict:
    """Run the whole comparison; writes results.json, report.md and plots; returns the results.

    With `workers` > 1 the strategies run in parallel processes; every run is seeded, so the
    results do not depend on the number of workers."""
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    config, selection = read_selection(config)
    data = prepare_experiment(config)
    names = strategy_names(config)
    per_strategy = run_strategies(config, data, names)
    records = [record for strategy_records, _ in per_strategy for record in strategy_records]
    metrics = ["energy_mae_ev"] + (["force_mae_ev_per_angstrom"] if any(r.metrics.force_mae_ev_per_angstrom is not None for r in records) else [])
    results = {
        "metamlip_version": __version__,
        "target_level": data.target_level,
        "pretrain_levels": list(data.pretrain_splits),
        "n_test": len(data.test),
        "strategy_settings": {name: config.strategy_settings.get(name, {}) for name in config.strategy_settings},
        "selection": selection,
        "pretraining": {name: summary for name, (_, summary) in zip(names, per_strategy)},
        "records": summarise(records),
        "comparisons": [c for metric in metrics for c in pairwise_comparisons(records, metric)],
        "claim": [c for metric in metrics for c in claim_check(records, META_LEARNERS, metric)],
        "runs": [record.to_dict() for record in records],
    }
    write_json_atomically(Path(config.output_dir) / "results.json", results, indent=2)
    write_report(config, results, records, data.scan_references)
    return results


def run_strategies(config: ExperimentConfig, data: ExperimentData, names: list[str]) -> list[tuple[list[FinetuneRecord], dict]]:
    """`run_strategy` for every name, in `config.workers` parallel processes when more than one."""
    return map_in_workers(run_strategy, [(config, data, name) for name in names], config.workers, config.threads, Path(config.output_dir))


def map_in_workers(function: Callable, jobs: list[tuple], workers: int, threads: int | None, out_dir: Path) -> list:
    """``function(*job)`` for every job, in `workers` spawn processes (in this one when 1).

    On Ctrl-C (SIGINT, also when a worker's training stops for it) the pending jobs are cancelled,
    the workers killed, and a `TrainingInterrupted` says what is kept: finished pre-trainings are
    cached under `out_dir` and reused by the same command, stopped ones resume from their last
    checkpoint (written atomically); fine-tuning runs start again.
    """
    pool = None
    try:
        if workers == 1:
            return [function(*job) for job in jobs]
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=start_worker, initargs=(os.getpid(), threads))
        results = list(pool.map(function, *zip(*jobs)))
        pool.shutdown()
        return results
    except KeyboardInterrupt as interrupt:
        if pool is not None:  # `with` would wait for the running jobs; stop them instead
            stop_pool(pool, kill=True)
        signal_number = getattr(interrupt, "exit_code", 128 + signal.SIGINT) - 128
        raise TrainingInterrupted(
            f"{signal.Signals(signal_number).name}: stopped; finished pre-trainings are cached in {out_dir} and reused, "
            "stopped ones resume from their last checkpoint when the same command runs again (fine-tuning runs start again)",
            signal_number,
        ) from None


def start_worker(parent_pid: int, threads: int | None) -> None:
    """Process-pool initializer: end with the parent (no orphans after a kill), log plainly, set threads.

    Ctrl-C is ignored outside training (the parent stops the pool; a KeyboardInterrupt while a
    worker waits for work would break it); training still finishes its epoch on it (`StopRequests`).
    """
    end_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if threads:
        torch.set_num_threads(threads)

"""`metamlip select`: choose each strategy's settings on proxy tasks, never on the target.

Leave one level out: each proxy level (by default every pre-training level) in turn plays the
target with the experiment's N values and seeds, and the strategies pre-train on the other
pre-training levels. Every point of a strategy's grid is fine-tuned and tested on the proxy's
own held-out structures; its score is the geometric mean of those test energy MAEs over
proxies, N and seeds. The target level is never read: sources declared as the target's
(``level:`` or ``levels:`` naming only it) are not even opened. The output is the
`strategy_settings` mapping an experiment config takes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml

from metamlip.atomic_files import write_json_atomically
from metamlip.config import from_mapping
from metamlip.data.lazy_batching import LevelData
from metamlip.data.sources import read_sources
from metamlip.errors import InputError
from metamlip.experiment.config import ExperimentConfig
from metamlip.experiment.run import (
    check_strategies,
    map_in_workers,
    non_target_sources,
    pretraining_data_identity,
    run_strategy,
    split_experiment_levels,
)
from metamlip.levels import level_slug, normalise_level
from metamlip.training.loop import TrainingDiverged

log = logging.getLogger("metamlip.selection")


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, as {dotted key: value}; one empty point for no grid."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[key] for key in keys))]


def proxy_config(config: ExperimentConfig, proxy: str, strategy: str, point: dict, out_dir: Path) -> ExperimentConfig:
    """The experiment in which `proxy` is the target and the other pre-training levels pre-train.
    A level whose energy reference is anchored to the proxy (`pretrain.reference_anchors`) is left
    out with it: its reference would be fitted on the proxy's energies, the proxy target's data."""
    selection = config.selection
    anchors = config.pretrain.reference_anchors
    anchored_to_proxy = {normalise_level(level) for level, anchor in anchors.items() if normalise_level(anchor) == proxy}
    if anchored_to_proxy:
        log.info("proxy %s: %s left out of its pre-training (their energy references are anchored to it)", proxy, sorted(anchored_to_proxy))
    left_out = {proxy} | anchored_to_proxy
    mapping = asdict(config)
    mapping["pretrain"]["reference_anchors"] = {level: anchor for level, anchor in anchors.items() if normalise_level(level) not in left_out}
    mapping.update(
        target_level=proxy,
        pretrain_levels=[level for level in config.pretrain_levels if normalise_level(level) not in left_out],
        strategies=[strategy],
        strategy_settings={strategy: point} if point else {},
        n_test=selection.n_test,
        scans=[],
        workers=1,
        output_dir=str(out_dir / level_slug(proxy)),
    )
    mapping["finetune"].update(n_finetune=selection.n_finetune, seeds=selection.seeds)
    return from_mapping(ExperimentConfig, mapping, where=f"selection (proxy {proxy}, {strategy} {point})")


def score_strategy(config: ExperimentConfig, levels: dict[str, LevelData], strategy: str, proxies: list[str], out_dir: Path) -> list[dict]:
    """Every grid point of `strategy` on every proxy: per-run test energy MAEs and the score. Each
    point's result is kept in OUT/scores/, keyed by the settings and the contents of the pre-training
    files (a rerun on the same data reuses it, changed data is scored again); a point whose training diverges
    scores None and is never chosen."""
    scored = []
    for point in grid_points(config.selection.grid.get(strategy, {})):
        settings = {name: value for name, value in asdict(config).items() if name not in ("selection", "strategy_settings", "output_dir", "datasets")}
        key = {"strategy": strategy, "settings": point, "proxies": proxies, "selection": asdict(config.selection),
               "config": settings, "datasets": pretraining_data_identity(config)}
        path = out_dir / "scores" / f"{level_slug(strategy)}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}.json"
        if path.exists():
            scored.append(json.loads(path.read_text(encoding="utf-8")))
            continue
        try:
            errors = proxy_errors(config, levels, strategy, point, proxies, out_dir)
            score, failure = float(np.exp(np.mean(np.log([error["energy_mae_ev"] for error in errors])))), None
            log.info("%s %s: proxy score %.4f eV", strategy, point, score)
        except TrainingDiverged as error:
            errors, score, failure = [], None, str(error)
            log.info("%s %s: diverged (%s)", strategy, point, failure)
        item = {"strategy": strategy, "settings": point, "score_energy_mae_ev": score, "diverged": failure, "runs": errors}
        write_json_atomically(path, item, indent=2)  # a cache read back by later runs: never half written
        scored.append(item)
    return scored


def proxy_errors(config: ExperimentConfig, levels: dict[str, LevelData], strategy: str, point: dict, proxies: list[str], out_dir: Path) -> list[dict]:
    """Test energy MAE of every proxy, N and seed for one grid point."""
    errors = []
    for proxy in proxies:
        proxy_experiment = proxy_config(config, proxy, strategy, point, out_dir)
        wanted = [normalise_level(level) for level in proxy_experiment.pretrain_levels] + [proxy]
        data = split_experiment_levels(proxy_experiment, {level: levels[level] for level in wanted})
        records, _ = run_strategy(proxy_experiment, data, strategy)
        errors += [{"proxy": proxy, "n_finetune": r.n_finetune, "seed": r.seed, "energy_mae_ev": r.metrics.energy_mae_ev} for r in records]
    return errors


def run_selection(config: ExperimentConfig, out_dir: str | Path) -> dict:
    """Score every grid point of every strategy in `selection.grid` on the proxies; write
    OUT/selection.json and OUT/selected.yaml (the chosen `strategy_settings`); return the results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not config.selection.grid:
        raise InputError("config key 'selection.grid' is empty: list the settings to choose from per strategy")
    check_strategies(config)
    for strategy in config.selection.grid:
        if strategy not in config.strategies:
            raise InputError(f"config key 'selection.grid' names {strategy!r}, which is not in 'strategies'")
    pretraining = [normalise_level(level) for level in config.pretrain_levels]
    proxies = [normalise_level(level) for level in config.selection.proxy_levels] or pretraining
    outside = sorted(set(proxies) - set(pretraining))
    if outside:
        raise InputError(f"config key 'selection.proxy_levels': {outside} are not pre-training levels (the target is never a proxy)")
    levels = read_sources(non_target_sources(config), pretraining)
    jobs = list(config.selection.grid)
    per_strategy = map_in_workers(score_strategy, [(config, levels, job, proxies, out_dir) for job in jobs], config.workers, config.threads, out_dir)
    chosen = {}
    for scored in per_strategy:
        finite = [item for item in scored if item["score_energy_mae_ev"] is not None]
        if not finite:
            raise InputError(f"selection: every grid point of {scored[0]['strategy']!r} diverged; see {out_dir / 'scores'}")
        chosen[scored[0]["strategy"]] = min(finite, key=lambda item: item["score_energy_mae_ev"])["settings"]
    results = {"proxy_levels": proxies, "target_level_read": False, "chosen": chosen, "scores": [item for scored in per_strategy for item in scored]}
    write_json_atomically(out_dir / "selection.json", results, indent=2)
    (out_dir / "selected.yaml").write_text(yaml.safe_dump({"strategy_settings": chosen}, sort_keys=False), encoding="utf-8")
    return results


"""Reptile's overhead: bookkeeping per meta-step against the time of its inner steps, and time per
gradient step against `joint`, on the bundled ethanol levels (7 levels, forces), one thread.

Interleaved repeats (joint, reptile m=1, reptile m=2, reptile_multihead m=2, fomaml m=2 in turn);
min / median / max over repeats. Bookkeeping = time inside `meta_step_update` minus the time
inside its inner `train_steps` calls (copies of weights and optimiser state, the update, the
averages); drawing batches is not bookkeeping (joint draws the same batches).
For reference, it also times the old bookkeeping, `copy.deepcopy(optimizer.state_dict())`.

    python benchmarks/bench_reptile.py --steps 200 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

import metamlip
import metamlip.strategies.reptile as reptile_module
from metamlip.config import ModelSection
from metamlip.datasets import load_bundled
from metamlip.pretrain import pretraining_tasks
from metamlip.strategies import PretrainBudget, ReptileSettings, get_strategy
from metamlip.training.loop import TrainingSettings, adam_optimizer
from metamlip.training.run_training import new_potential, validation_splits


def timed_epoch(strategy_name: str, levels, steps: int, m: int, batch_size: int) -> tuple[float, float, int]:
    """(seconds, Reptile bookkeeping / inner-step time, gradient steps) of one pre-training epoch;
    bookkeeping = time inside `meta_step_update` minus time inside its `train_steps` calls."""
    strategy = get_strategy(strategy_name)
    model = new_potential(strategy.model_section(ModelSection(n_features=64, n_sensitivities=16, n_atom_layers=3, cutoff_angstrom=5.5)), [1, 6, 8])
    splits = validation_splits(levels, 0.1, 0)
    tasks = pretraining_tasks(strategy, model, splits)
    settings = TrainingSettings(batch_size=batch_size, max_epochs=1, progress=False)
    budget = PretrainBudget(gradient_steps=steps, steps_per_epoch=steps, reptile=ReptileSettings(inner_steps=5, tasks_per_meta_step=m))
    plan = strategy.epoch_plan(tasks, settings, budget)
    optimizer = plan.make_optimizer(list(model.parameters()), settings)
    timers = {"inner": 0.0, "meta_step": 0.0}
    original_inner, original_meta = reptile_module.train_steps, reptile_module.meta_step_update

    def timed(function, key):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            result = function(*args, **kwargs)
            timers[key] += time.perf_counter() - started
            return result
        return wrapper

    reptile_module.train_steps = timed(original_inner, "inner")
    reptile_module.meta_step_update = timed(original_meta, "meta_step")
    try:
        started = time.perf_counter()
        plan.run_epoch(model, optimizer, 1)
        seconds = time.perf_counter() - started
    finally:
        reptile_module.train_steps, reptile_module.meta_step_update = original_inner, original_meta
    bookkeeping = timers["meta_step"] - timers["inner"]
    return seconds, bookkeeping / max(timers["inner"], 1e-12), strategy.gradient_steps_per_epoch(tasks, budget)


def deepcopy_state_seconds(levels, batch_size: int) -> float:
    """Seconds of one `copy.deepcopy(optimizer.state_dict())` of the same model after some Adam steps."""
    seconds, _, _ = timed_epoch("joint", levels, 5, 1, batch_size)  # warm
    model = new_potential(ModelSection(n_features=64, n_sensitivities=16, n_atom_layers=3, cutoff_angstrom=5.5), [1, 6, 8])
    optimizer = adam_optimizer(model.parameters(), 1e-3)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    started = time.perf_counter()
    for _ in range(20):
        copy.deepcopy(optimizer.state_dict())
    return (time.perf_counter() - started) / 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="gradient steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    levels = {level: dataset for level, dataset in load_bundled("ethanol-multilevel").levels.items() if level != "mp2/cc-pvdz"}
    runs = {"joint": ("joint", 1), "reptile m=1": ("reptile", 1), "reptile m=2": ("reptile", 2),
            "reptile_multihead m=2": ("reptile_multihead", 2), "fomaml m=2": ("fomaml", 2)}
    per_step = {name: [] for name in runs}
    bookkeeping = {name: [] for name in runs if name != "joint" and not name.startswith("fomaml")}
    for _ in range(args.repeats):
        for name, (strategy, m) in runs.items():
            seconds, bookkeeping_fraction, steps = timed_epoch(strategy, levels, args.steps, m, args.batch_size)
            per_step[name].append(seconds / steps)
            if name in bookkeeping:
                bookkeeping[name].append(bookkeeping_fraction)
    print(f"metamlip {metamlip.__version__}, {args.steps} gradient steps per epoch, batch {args.batch_size}, one thread, "
          f"{args.repeats} interleaved repeats (min / median / max)")
    joint = np.median(per_step["joint"])
    for name, values in per_step.items():
        low, mid, high = np.percentile(values, [0, 50, 100]) * 1e3
        print(f"{name:<24} {low:7.2f} / {mid:7.2f} / {high:7.2f} ms per gradient step   ratio to joint (medians) {np.median(values) / joint:5.2f}")
    for name, values in bookkeeping.items():
        low, mid, high = np.percentile(values, [0, 50, 100]) * 100
        print(f"{name:<24} bookkeeping {low:5.2f} / {mid:5.2f} / {high:5.2f} % of inner-step time (goal <= 5%)")
    print(f"old bookkeeping for reference: copy.deepcopy(optimizer.state_dict()) {deepcopy_state_seconds(levels, args.batch_size) * 1e3:.2f} ms "
          "(3 per task per meta-step before this change)")


if __name__ == "__main__":
    main()

"""metamlip's HIP-NN with the C library's default allocator settings next to `keep_freed_memory`.

Each round starts two fresh processes, one per setting (their order alternating between rounds),
and each runs the same sequence: for MD17 ethanol, then the 27-atom SPICE molecule, inference
(energy + forces, batch 64) and training steps (batch 32), each in float32 and float64, timing
every case after two warm-up calls and counting the minor page faults (fresh memory touched). What
a process ran before decides where the default allocator hands memory back, so the cases are run
in one fixed order, as a user's session would run them one after another.

    python benchmarks/bench_allocator.py [--rounds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import warnings

import numpy as np
import torch
from bench_hipnn import INFERENCE_BATCH, MOLECULES, N_DISTINCT_BATCHES, TRAIN_BATCH, batch_indices, build_models
from bench_hipnn import metamlip_inference_run, metamlip_training_run
from interleaved_timing import interleaved

from metamlip.allocator import keep_freed_memory
from metamlip.data.batching import StructureBatcher
from metamlip.data.references import EnergyReference

SETTINGS = ("default", "keep")
STEPS = 8


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="pairs of fresh processes (default, keep)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of every case in a process")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    return parser.parse_args()


def run_cases(repeats: int) -> dict[str, tuple[float, float]]:
    """Every case in order: case name -> (least ms per batch, median page faults per batch)."""
    results = {}
    for molecule in ("ethanol", "spice"):
        dataset = MOLECULES[molecule]()
        species = sorted(set(int(z) for z in dataset.atomic_numbers))
        potential, _ = build_models(species, 64, EnergyReference.fit(dataset, species))
        models = {torch.float32: potential, torch.float64: copy.deepcopy(potential).double()}
        generator = np.random.default_rng(0)
        for measurement, batch_size, make_run in (("inference", INFERENCE_BATCH, metamlip_inference_run), ("training", TRAIN_BATCH, metamlip_training_run)):
            indices = batch_indices(len(dataset), batch_size, N_DISTINCT_BATCHES, generator)
            for dtype, model in models.items():
                batcher = StructureBatcher(dataset, species, potential.config.cutoff_angstrom, dtype=dtype)
                run = make_run(model, [batcher.batch(i) for i in indices], STEPS)
                run()
                run()
                name = f"{molecule} {measurement} {str(dtype).removeprefix('torch.')}"
                timing = interleaved({name: run}, repeats, STEPS * batch_size)[name]
                results[name] = (1e3 * min(timing.seconds) / STEPS, statistics.median(timing.page_faults) / STEPS)
    return results


def child(setting: str, repeats: int) -> None:
    torch.set_num_threads(1)
    applied = keep_freed_memory() if setting == "keep" else False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(json.dumps({"applied": applied, "cases": run_cases(repeats)}))


def main() -> None:
    arguments = parse_arguments()
    if arguments.child:
        child(arguments.child, arguments.repeats)
        return
    runs: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    for round_index in range(arguments.rounds):
        for setting in SETTINGS if round_index % 2 == 0 else SETTINGS[::-1]:
            command = [sys.executable, __file__, "--child", setting, "--repeats", str(arguments.repeats)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[setting].append(json.loads(output.strip().splitlines()[-1]))
    print(f"keep_freed_memory applied: {[run['applied'] for run in runs['keep']]}; {arguments.rounds} rounds, one thread")
    print("ms per batch (least of the repetitions; per process, then median [min - max] over processes), page faults per batch (median)")
    print(f"{'case':26s} {'default':>24s} {'faults':>7s} {'keep':>24s} {'faults':>7s} {'default / keep':>15s}")
    for case in runs["default"][0]["cases"]:
        columns = []
        for setting in SETTINGS:
            times = [run["cases"][case][0] for run in runs[setting]]
            faults = statistics.median(run["cases"][case][1] for run in runs[setting])
            columns.append((statistics.median(times), f"{statistics.median(times):7.2f} [{min(times):6.2f} - {max(times):6.2f}]", faults))
        ratio = columns[0][0] / columns[1][0]
        print(f"{case:26s} {columns[0][1]:>24s} {columns[0][2]:7.0f} {columns[1][1]:>24s} {columns[1][2]:7.0f} {ratio:15.2f}")


if __name__ == "__main__":
    main()

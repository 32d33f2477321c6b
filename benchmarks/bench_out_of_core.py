"""Out-of-core benchmark: peak memory and training throughput, in-memory vs packed (memory-mapped).

Builds a synthetic ANI-1x release-layout HDF5 file (random small C/H/N/O molecules, 5 to 12 atoms,
`wb97x_dz.energy` and `wb97x_dz.forces` in Hartree; numbers are not physical) in a temporary
folder, then runs, each in its own subprocess so that the peak resident memory (`ru_maxrss`) is
that path's own:

- memory: `read_dataset` of the whole file, `StructureBatcher` (pairs of every structure cached);
- pack:   `pack_hdf5` of the file into the packed format (one-time conversion);
- packed: `PackedLevel` + `PackedBatcher` (memory maps, pairs computed per batch with vesin).

Each training path fits the energy reference and then runs `--batches` training steps (the
first batches of one shuffled epoch) of the default HIP-NN model, or with `--batches 0` one whole
shuffled epoch. Besides the peak RSS, each path reports its resident memory at the end split into
anonymous (heap) and file-backed (memory-mapped, reclaimable) pages.

    python benchmarks/bench_out_of_core.py --conformers 1000000 --batches 300
    python benchmarks/bench_out_of_core.py --conformers 1000000 --batches 0 --paths pack,packed,memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

LEVEL = "wb97x/6-31g(d)"
ELEMENTS = np.array([1, 6, 7, 8])


def build_file(path: Path, conformers: int, per_group: int = 1000, seed: int = 0) -> None:
    """`conformers` random molecules in groups of `per_group` conformers of one formula."""
    generator = np.random.default_rng(seed)
    with h5py.File(path, "w") as file:
        for index, start in enumerate(range(0, conformers, per_group)):
            count = min(per_group, conformers - start)
            n_atoms = int(generator.integers(5, 13))
            numbers = generator.choice(ELEMENTS, size=n_atoms, p=[0.5, 0.3, 0.1, 0.1])
            # atoms on a jittered line-and-ring scaffold, 1.0-1.6 Angstrom apart (small organic-like sizes)
            base = np.cumsum(generator.uniform(1.0, 1.6, size=(n_atoms, 3)) * generator.choice([-1, 1], size=(n_atoms, 3)) / 1.7, axis=0)
            coordinates = base + generator.normal(0.0, 0.05, size=(count, n_atoms, 3))
            group = file.create_group(f"mol{index:06d}")
            group["atomic_numbers"] = numbers
            group["coordinates"] = coordinates
            group["wb97x_dz.energy"] = -40.0 * n_atoms + generator.normal(0.0, 0.01, size=count)
            group["wb97x_dz.forces"] = generator.normal(0.0, 0.02, size=(count, n_atoms, 3))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def resident_mb() -> dict:
    """This process's resident memory now (Linux /proc): anonymous and file-backed pages, MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {f"{name.lower()}_mb": int(fields[name].split()[0]) / 1024.0 for name in ("RssAnon", "RssFile") if name in fields}


def train(batcher, dataset, batches: int) -> dict:
    from metamlip.config import ModelSection
    from metamlip.data.references import EnergyReference
    from metamlip.training.loop import endless_batches, train_steps
    from metamlip.training.loss import LossWeights
    from metamlip.training.run_training import new_potential

    model = new_potential(ModelSection(), [int(z) for z in ELEMENTS])
    model.add_level(EnergyReference.fit(dataset, model.species))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = endless_batches(batcher, 32, 0)
    train_steps(model, optimizer, (next(stream) for _ in range(5)), LossWeights())  # warm-up
    epoch = batcher.batches(32, seed=1) if batches == 0 else (next(stream) for _ in range(batches))
    batches = batches or -(-len(batcher) // 32)
    started = time.perf_counter()
    train_steps(model, optimizer, epoch, LossWeights())
    seconds = time.perf_counter() - started
    return {"batches": batches, "train_seconds": seconds, "batches_per_second": batches / seconds}


def child(mode: str, file: Path, packed: Path, batches: int) -> dict:
    """One path in this process; returns its figures."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    if mode == "pack":
        from metamlip.data.packed import pack_hdf5

        pack_hdf5(file, packed, levels=[LEVEL])
        return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}
    if mode == "memory":
        from metamlip.data.batching import StructureBatcher
        from metamlip.readers import read_level

        dataset = read_level(file, levels=[LEVEL])
        batcher = StructureBatcher(dataset, [int(z) for z in ELEMENTS], 6.5)
    else:
        from metamlip.data.lazy_batching import PackedBatcher
        from metamlip.data.packed import PackedLevel, level_folder_name

        dataset = PackedLevel.open(packed / level_folder_name(LEVEL))
        batcher = PackedBatcher(dataset, [int(z) for z in ELEMENTS], 6.5)
    setup = time.perf_counter() - started
    return {"setup_seconds": setup, **train(batcher, dataset, batches), "peak_rss_mb": peak_rss_mb(), **resident_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conformers", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=300, help="training batches (of 32) timed per path; 0: one whole epoch")
    parser.add_argument("--paths", default="memory,pack,packed", help="which paths to run, in order")
    parser.add_argument("--workdir", default=None, help="folder for the files (default: a temporary one)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FILE", "PACKED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, file, packed = args.child
        print(json.dumps(child(mode, Path(file), Path(packed), args.batches)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as temporary:
        folder = Path(temporary)
        file, packed = folder / "synthetic_ani1x.h5", folder / "packed"
        started = time.perf_counter()
        build_file(file, args.conformers)
        print(f"built {args.conformers} conformers in {time.perf_counter() - started:.0f} s: {file.stat().st_size / 1e6:.0f} MB")
        results = {}
        for mode in args.paths.split(","):
            command = [sys.executable, __file__, "--batches", str(args.batches), "--child", mode, str(file), str(packed)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                results[mode] = {"failed": done.returncode, "stderr": done.stderr[-300:]}
            else:
                results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(mode, json.dumps(results[mode]))
        if "memory" in results and "packed" in results and "failed" not in results["memory"] and "failed" not in results["packed"]:
            memory, lazy = results["memory"], results["packed"]
            print(f"throughput packed/memory: {lazy['batches_per_second'] / memory['batches_per_second']:.2f}")
            print(f"peak RSS packed/memory: {lazy['peak_rss_mb'] / memory['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()

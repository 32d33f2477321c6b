"""Throughput of metamlip's backbones on a GPU: HIP-NN and MACE, training steps and energy + force
inference, for batch sizes from 32 to 1024 conformers of MD17 ethanol (or the 27-atom SPICE molecule).

Written for when a GPU machine is lent; never needed by the tests. Without a GPU it runs a small
CPU setting (batch sizes 32 and 64, one repetition) and says so: those figures only show that the
script works, they are not GPU figures.

Per backbone and batch size: conformers/s of `train_steps` (energy + force loss, fused Adam, as the
training loop runs it) and of `Potential(batch, forces=True)`, median [min - max] over repetitions
(each `--steps` batches, timed between `torch.cuda.synchronize()` calls), and the peak GPU memory.
Batches are built and moved to the device before timing. Runs that do not fit in memory are
reported as such and the script goes on.

    python benchmarks/bench_gpu.py [--device cuda] [--batch-sizes 32,64,128,256,512,1024]
                                   [--backbones hipnn,mace] [--molecule ethanol] [--dtype float32]
                                   [--steps 10] [--repeats 5] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from metamlip.data.batching import Batch, StructureBatcher
from metamlip.data.level_dataset import LevelDataset
from metamlip.data.references import EnergyReference
from metamlip.model.backbone_choice import BackboneConfig
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.mace_config import MaceConfig
from metamlip.model.potential import Potential, build_potential
from metamlip.readers import read_level
from metamlip.training.loop import adam_optimizer, train_steps
from metamlip.training.loss import LossWeights

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
GPU_BATCH_SIZES = "32,64,128,256,512,1024"
CPU_BATCH_SIZES = "32,64"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default=None, help=f"default {GPU_BATCH_SIZES} on a GPU, {CPU_BATCH_SIZES} on CPU")
    parser.add_argument("--backbones", default="hipnn,mace", help="hipnn and/or mace (mace needs the mace extra)")
    parser.add_argument("--molecule", default="ethanol", choices=["ethanol", "spice"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=None, help="batches per repetition (default 10 on a GPU, 2 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions (default 5 on a GPU, 1 on CPU)")
    parser.add_argument("--compile", action="store_true", help="HIP-NN with its torch.compile option (Potential.use_compile)")
    return parser.parse_args()


def load_molecule(name: str) -> LevelDataset:
    if name == "ethanol":
        return read_level(DATA / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level="pbe+vdw-ts")
    dataset = read_level(DATA / "spice_1.1.4_sample.h5")
    return dataset.subset(np.flatnonzero(dataset.n_atoms == dataset.n_atoms[0])[:50])


def backbone_shapes() -> dict[str, BackboneConfig]:
    """The defaults users get: HIP-NN 64 features, 2 x 3 layers; MACE `MaceSection`'s defaults."""
    return {"hipnn": HipnnConfig(), "mace": MaceConfig()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rates(run: Callable[[], None], conformers: int, repeats: int, device: torch.device) -> list[float]:
    """Conformers per second of `repeats` calls of `run`, after two warm-up calls."""
    for _ in range(2):
        run()
    synchronize(device)
    measured = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        measured.append(conformers / (time.perf_counter() - start))
    return measured


def batches_on(device: torch.device, batcher: StructureBatcher, batch_size: int, n_batches: int) -> list[Batch]:
    generator = np.random.default_rng(batch_size)
    replace = len(batcher) < batch_size * n_batches
    return [batcher.batch(generator.choice(len(batcher), batch_size, replace=replace)).to(device) for _ in range(n_batches)]


def measure(model: Potential, batches: list[Batch], steps: int, repeats: int, device: torch.device) -> dict[str, object]:
    """Training and inference throughput of `model` on `batches` (already on the device)."""
    optimizer = adam_optimizer(model.parameters(), 1e-4)
    weights = LossWeights()
    chosen = [batches[i % len(batches)] for i in range(steps)]

    def training() -> None:
        train_steps(model, optimizer, chosen, weights)

    def inference() -> None:
        model.eval()
        for batch in chosen:
            model(batch, forces=True)

    results = {}
    for name, run in (("training", training), ("inference", inference)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            results[name] = rates(run, steps * batches[0].n_structures, repeats, device)
        except torch.cuda.OutOfMemoryError:
            results[name] = "out of memory"
            torch.cuda.empty_cache()
        if device.type == "cuda":
            results[f"{name} peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return results


def describe(result: object) -> str:
    if isinstance(result, str):
        return f"{result:>26s}"
    return f"{statistics.median(result):8.0f} [{min(result):7.0f} - {max(result):7.0f}]"


def main() -> None:
    arguments = parse_arguments()
    device = torch.device(arguments.device)
    on_gpu = device.type == "cuda"
    batch_sizes = [int(size) for size in (arguments.batch_sizes or (GPU_BATCH_SIZES if on_gpu else CPU_BATCH_SIZES)).split(",")]
    steps = arguments.steps or (10 if on_gpu else 2)
    repeats = arguments.repeats or (5 if on_gpu else 1)
    dtype = getattr(torch, arguments.dtype)
    if on_gpu:
        print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        torch.set_num_threads(1)
        print(
            f"No GPU here ({device}): the small CPU setting (batch sizes {batch_sizes}, {steps} steps, {repeats} repetition), "
            "one thread, to show the script runs. These are not GPU figures; run on a GPU machine for those. "
            f"Load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}."
        )
    dataset = load_molecule(arguments.molecule)
    print(f"{arguments.molecule}: {int(dataset.n_atoms[0])} atoms per conformer, {arguments.dtype}, {steps} batches per repetition, {repeats} repetitions")
    print(f"{'backbone':8s} {'batch':>5s} {'training conformers/s':>26s} {'inference conformers/s':>26s}  peak memory (GiB, train / infer)")
    species = dataset.elements
    reference = EnergyReference.fit(dataset, species)
    for name in arguments.backbones.split(","):
        try:
            model = build_potential(species, backbone_shapes()[name], seed=0, dtype=dtype)
        except Exception as error:  # noqa: BLE001 - e.g. MACE without the mace extra: say so and go on
            print(f"{name:8s} skipped: {error}")
            continue
        model.add_level(reference)
        if arguments.compile and name == "hipnn":
            model.use_compile()
        model.to(device)
        batcher = StructureBatcher(dataset, model.species, model.config.cutoff_angstrom, dtype=dtype)
        for batch_size in batch_sizes:
            results = measure(model, batches_on(device, batcher, batch_size, 4), steps, repeats, device)
            memory = f"{results['training peak GiB']:.2f} / {results['inference peak GiB']:.2f}" if on_gpu else "-"
            print(f"{name:8s} {batch_size:5d} {describe(results['training']):>26s} {describe(results['inference']):>26s}  {memory}")


if __name__ == "__main__":
    main()

"""Side-by-side CPU throughput of metamlip's HIP-NN and LANL hippynn's `Hipnn` + `HEnergy`.

Both models have the same shape and start from the same weights (copied name for name),
run in float32 on the same batches with the same number of threads, for each molecule asked
(`--molecules`): MD17 ethanol (9 atoms, 72 pairs within 6.5 Angstrom) and the first molecule
of the SPICE sample (27 atoms, ~690 pairs; its 50 conformations, drawn with repeats into batches):

* training: one step = energy + forces (create_graph) + loss (per-atom energy MSE + force
  MSE) + backward + Adam step, batches of 32 conformers; metamlip runs its own
  `train_steps` with the optimiser its training loops make (`adam_optimizer`: fused Adam),
  hippynn an equivalent hand-written step with the optimiser its `SetupParams` makes by default
  (`torch.optim.Adam`, on CPU torch's single-tensor loop); a control run gives hippynn the same
  fused Adam, so that the model's share of the speed-up can be read apart from the optimiser's;
* inference: energy + forces, batches of 64 conformers.

hippynn runs with its default custom-kernel setting ("auto"), as its users get it. Batches
are built before timing (pair lists for hippynn, `StructureBatcher.batch` for metamlip), so
the figures measure the models; metamlip's batch construction is timed separately. The
repetitions of the two models are interleaved (A B A B ...) so that load from other jobs
on a shared machine falls on both alike.

With `--ceiling` it also profiles metamlip's steps: the time inside torch operations, and the
speed-up over hippynn if no time were spent outside them (Python, the autograd engine). Every run's
minor page faults per batch are printed: where the C library hands freed memory back to the system,
large batches page-fault fresh memory on every call; `--keep-freed-memory` keeps it in the process
for both models (`metamlip.allocator`, what the `metamlip` command does). `--native` adds runs through
metamlip's compiled C++ kernels (`Potential.use_native`).

    python benchmarks/bench_hipnn.py --threads 1 --repeats 7 [--molecules ethanol,spice] [--ceiling] [--keep-freed-memory] [--native]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from interleaved_timing import Timing, interleaved, paired_speedups, spread, timed

from metamlip.allocator import keep_freed_memory
from metamlip.data.batching import Batch, StructureBatcher
from metamlip.data.level_dataset import LevelDataset
from metamlip.data.references import EnergyReference
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.potential import SHARED_HEAD, Potential, build_potential
from metamlip.readers import read_level
from metamlip.training.loop import adam_optimizer, train_steps
from metamlip.training.loss import LossWeights

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
ETHANOL = DATA / "md17_ethanol_dft.npz"
SPICE_SAMPLE = DATA / "spice_1.1.4_sample.h5"
TRAIN_BATCH = 32
INFERENCE_BATCH = 64
N_DISTINCT_BATCHES = 8
HIPPYNN_RECOMPILE_LIMIT = 256
HIPPYNN_FUSED = "hippynn fused Adam"  # the control: hippynn with metamlip's optimiser
NATIVE = "metamlip native"  # through the C++ kernels (Potential.use_native)


@dataclass
class HippynnBatch:
    """One batch in the form hippynn's modules take: flat pair list, one-hot species, molecule index."""

    one_hot: torch.Tensor  # (n_atoms, n_species) float32
    positions_angstrom: torch.Tensor  # (n_atoms, 3) float32
    pair_first: torch.Tensor  # (n_pairs,) int64
    pair_second: torch.Tensor  # (n_pairs,) int64
    mol_index: torch.Tensor  # (n_atoms,) int64
    n_molecules: int
    n_atoms: torch.Tensor  # (n_molecules,) float32 atoms per molecule
    target_energy_ev: torch.Tensor  # (n_molecules,) float32 energy minus the linear reference
    target_forces_ev_per_angstrom: torch.Tensor  # (n_atoms, 3) float32


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both models")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per model and measurement")
    parser.add_argument("--features", type=int, default=64, help="HIP-NN width (n_features)")
    parser.add_argument("--steps", type=int, default=8, help="batches per timed repetition")
    parser.add_argument("--molecules", default="ethanol,spice", help="comma-separated: ethanol, spice (first SPICE sample molecule)")
    parser.add_argument("--compile", action="store_true", help="also time metamlip with its torch.compile option (Potential.use_compile)")
    parser.add_argument("--float64", action="store_true", help="also time metamlip in float64 (and print the float64 / float32 time)")
    parser.add_argument("--native", action="store_true", help="also time metamlip through its C++ kernels (Potential.use_native)")
    parser.add_argument(
        "--keep-freed-memory", action="store_true",
        help="keep freed memory in the process for both models (metamlip.allocator, as the metamlip command does)",
    )
    parser.add_argument(
        "--ceiling", action="store_true",
        help="also profile metamlip's steps: time inside torch operations, and the speed-up it would reach with no time outside them",
    )
    parser.add_argument(
        "--hippynn-kernels", default=None,
        help="override hippynn's custom-kernel setting (e.g. _pytorch_raw: uncompiled); default: hippynn's own ('auto')",
    )
    return parser.parse_args()


def load_ethanol() -> LevelDataset:
    return read_level(ETHANOL, energy_unit="kcal/mol", level="pbe+vdw-ts")


def load_spice_molecule() -> LevelDataset:
    """The 50 conformations of the first molecule of the SPICE sample (27 atoms: C, H, N)."""
    dataset = read_level(SPICE_SAMPLE)
    first = np.flatnonzero(dataset.n_atoms == dataset.n_atoms[0])
    first = first[: np.argmax(np.diff(first) != 1) + 1] if np.any(np.diff(first) != 1) else first
    return dataset.subset(first)


MOLECULES = {"ethanol": load_ethanol, "spice": load_spice_molecule}


def batch_indices(n_structures: int, batch_size: int, n_batches: int, generator: np.random.Generator) -> list[np.ndarray]:
    """Indices of `n_batches` batches: consecutive slices of one permutation when the dataset holds
    them all, otherwise each batch drawn with repeats (timing does not care which conformers)."""
    if n_structures >= batch_size * n_batches:
        order = generator.permutation(n_structures)
        return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    return [generator.choice(n_structures, batch_size, replace=True) for _ in range(n_batches)]


def hippynn_batch(batch: Batch, reference: EnergyReference, n_species: int) -> HippynnBatch:
    """The same structures as a metamlip batch, as a flat pair list taken from its neighbour matrix."""
    first, slot = torch.nonzero(batch.neighbour_mask, as_tuple=True)
    per_element = torch.as_tensor(reference.energy_per_element_ev)
    reference_energy = torch.zeros(batch.n_structures, dtype=torch.float64).index_add(
        0, batch.structure_index, per_element[batch.species_index]
    )
    return HippynnBatch(
        one_hot=torch.nn.functional.one_hot(batch.species_index, n_species).float(),
        positions_angstrom=batch.positions_angstrom.clone(),
        pair_first=first.contiguous(),
        pair_second=batch.neighbour_index[first, slot].contiguous(),
        mol_index=batch.structure_index.clone(),
        n_molecules=batch.n_structures,
        n_atoms=batch.n_atoms.float(),
        target_energy_ev=(batch.energies_ev - reference_energy).float(),
        target_forces_ev_per_angstrom=batch.forces_ev_per_angstrom.clone(),
    )


class HippynnModel(torch.nn.Module):
    """hippynn's Hipnn + HEnergy, with pair distances computed from positions (for forces)."""

    def __init__(self, network: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.network = network
        self.head = head

    def energy_and_forces(self, batch: HippynnBatch, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_molecules,) energies in eV and (n_atoms, 3) forces in eV/Angstrom."""
        positions = batch.positions_angstrom.detach().requires_grad_(True)
        pair_vector = positions[batch.pair_second] - positions[batch.pair_first]
        pair_dist = torch.linalg.vector_norm(pair_vector, dim=1)
        features = self.network(batch.one_hot, batch.pair_first, batch.pair_second, pair_dist)
        energy = self.head(features, batch.mol_index, batch.n_molecules)[0].squeeze(1)
        (gradient,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
        return energy, -gradient


def build_models(species: list[int], features: int, reference: EnergyReference) -> tuple[Potential, HippynnModel]:
    """metamlip's potential and hippynn's modules with the same shape and the same float32 weights."""
    from hippynn.layers.targets import HEnergy
    from hippynn.networks.hipnn import Hipnn

    config = HipnnConfig(n_features=features, n_sensitivities=20, n_interaction_layers=2, n_atom_layers=3)
    potential = build_potential(species, config, seed=0, dtype=torch.float32)
    potential.add_level(reference, SHARED_HEAD)
    network = Hipnn(
        config.n_features, config.n_sensitivities, config.soft_min_angstrom, config.soft_max_angstrom,
        config.cutoff_angstrom, config.n_atom_layers, config.n_interaction_layers, possible_species=[0, *species],
    )
    head = HEnergy(network.feature_sizes)
    network.load_state_dict(potential.backbone.state_dict(), strict=True)
    head.load_state_dict(potential.heads[SHARED_HEAD].state_dict(), strict=True)
    return potential, HippynnModel(network, head).float()


def hippynn_train_step(model: HippynnModel, optimizer: torch.optim.Optimizer, batch: HippynnBatch) -> float:
    """The same step as metamlip's: per-atom energy MSE + force MSE, backward, Adam."""
    energy, forces = model.energy_and_forces(batch, create_graph=True)
    energy_mse = torch.mean(torch.square((energy - batch.target_energy_ev) / batch.n_atoms))
    force_mse = torch.mean(torch.square(forces - batch.target_forces_ev_per_angstrom))
    loss = energy_mse + force_mse
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def batch_construction_seconds(batcher: StructureBatcher, batch_size: int, repeats: int) -> list[float]:
    """Seconds per `StructureBatcher.batch` call for random batches of `batch_size`."""
    generator = np.random.default_rng(1)
    seconds = []
    for _ in range(repeats):
        indices = generator.choice(len(batcher), batch_size, replace=False)
        seconds.append(timed(lambda: batcher.batch(indices)))
    return seconds


def summary(timing: Timing) -> str:
    rates = timing.rates()
    return f"{statistics.median(rates):7.0f} [{min(rates):6.0f} - {max(rates):6.0f}]"


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    import hippynn
    from hippynn import custom_kernels

    if arguments.hippynn_kernels is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            custom_kernels.set_custom_kernels(arguments.hippynn_kernels)
    hippynn.settings.WARN_LOW_DISTANCES = False  # the warning's check costs a sync; off for both as for users who set it
    print(f"torch {torch.__version__}, hippynn {hippynn.__version__}, threads {torch.get_num_threads()}, float32")
    chosen = "--hippynn-kernels" if arguments.hippynn_kernels is not None else "hippynn's setting"
    print(
        f"hippynn custom kernels: {chosen} {arguments.hippynn_kernels or hippynn.settings.USE_CUSTOM_KERNELS!r} -> active "
        f"{custom_kernels.CUSTOM_KERNELS_ACTIVE!r} (available {custom_kernels.CUSTOM_KERNELS_AVAILABLE})"
    )
    if custom_kernels.CUSTOM_KERNELS_ACTIVE == "pytorch":
        print("  ('pytorch' = hippynn's pure-pytorch envsum/sensesum/featsum wrapped in torch.compile)")
    if arguments.keep_freed_memory:
        print(f"freed memory kept in the process (metamlip.allocator.keep_freed_memory): {keep_freed_memory()}")
    else:
        print("the C library's default allocator settings (freed memory may go back to the system: see the page faults)")
    print(f"load average at the start: {load_average()}")
    for name in arguments.molecules.split(","):
        compare_on(name.strip(), arguments)
    print(f"\nload average at the end: {load_average()}")


def faults(timing: Timing, steps: int) -> str:
    """Median minor page faults per batch of a run's repetitions."""
    return f"{statistics.median(timing.page_faults) / steps:.0f}"


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def compare_on(molecule: str, arguments: argparse.Namespace) -> None:
    """Interleaved training and inference timings of hippynn and metamlip (and its compiled and
    float64 variants when asked) on one molecule's batches."""
    # hippynn's compiled kernels start afresh for each molecule, and may recompile for every batch shape
    # (pair counts vary between SPICE batches; training and inference differ in requires_grad): with
    # torch's default limit of 8 recompiles they would fall back to eager code, which is not what
    # hippynn intends, so the limit is raised and every shape is compiled during the warm-up.
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = HIPPYNN_RECOMPILE_LIMIT
    dataset = MOLECULES[molecule]()
    species = sorted(set(int(z) for z in dataset.atomic_numbers))
    reference = EnergyReference.fit(dataset, species)
    potential, hippynn_model = build_models(species, arguments.features, reference)
    variants = {"metamlip": potential}
    if arguments.compile:
        variants["metamlip compile"] = copy.deepcopy(potential).use_compile()
    if arguments.float64:
        variants["metamlip float64"] = copy.deepcopy(potential).double()
    if arguments.native:
        variants[NATIVE] = copy.deepcopy(potential).use_native()
    if arguments.native and arguments.float64:
        variants[NATIVE + " float64"] = copy.deepcopy(potential).double().use_native()

    generator = np.random.default_rng(0)
    train_indices = batch_indices(len(dataset), TRAIN_BATCH, N_DISTINCT_BATCHES, generator)
    inference_indices = batch_indices(len(dataset), INFERENCE_BATCH, N_DISTINCT_BATCHES, generator)
    batchers = {dtype: StructureBatcher(dataset, species, potential.config.cutoff_angstrom, dtype=dtype) for dtype in (torch.float32, torch.float64)}
    train_batches = {dtype: [batcher.batch(i) for i in train_indices] for dtype, batcher in batchers.items()}
    inference_batches = {dtype: [batcher.batch(i) for i in inference_indices] for dtype, batcher in batchers.items()}
    hippynn_train = [hippynn_batch(b, reference, len(species)) for b in train_batches[torch.float32]]
    hippynn_inference = [hippynn_batch(b, reference, len(species)) for b in inference_batches[torch.float32]]
    steps = arguments.steps

    training_runs, inference_runs = {}, {}
    for name, model in variants.items():
        dtype = next(model.parameters()).dtype
        training_runs[name] = metamlip_training_run(model, train_batches[dtype], steps)
        inference_runs[name] = metamlip_inference_run(model, inference_batches[dtype], steps)
    training_runs["hippynn"] = hippynn_training_run(hippynn_model, hippynn_train, steps, fused=False)
    training_runs[HIPPYNN_FUSED] = hippynn_training_run(copy.deepcopy(hippynn_model), hippynn_train, steps, fused=True)
    inference_runs["hippynn"] = hippynn_inference_run(hippynn_model, hippynn_inference, steps)

    pairs = train_batches[torch.float32][0].neighbour_mask.sum().item() / TRAIN_BATCH
    print(
        f"\n## {molecule}: {int(dataset.n_atoms[0])} atoms, {pairs:.0f} pairs per conformer; {arguments.features} features, "
        "20 sensitivities, 2 interaction layers x 3 atom layers"
    )
    warm_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in (*training_runs.values(), *inference_runs.values()):
            run()
            run()
    print(f"warm-up, 2 rounds each (includes any torch.compile, hippynn's kernels or metamlip's): {time.perf_counter() - warm_start:.1f} s")

    training = interleaved(training_runs, arguments.repeats, steps * TRAIN_BATCH)
    inference = interleaved(inference_runs, arguments.repeats, steps * INFERENCE_BATCH)
    print(
        f"{arguments.repeats} repetitions of {steps} batches, runs interleaved (A B C, then C B A, ...) "
        f"so that load from other jobs hits all alike; load average now {load_average()}."
    )
    print(
        "conformers/s: median [min - max]; speed-up over hippynn: ratio of the medians, and per back-to-back pair median [min - max]; "
        "minor page faults per batch (median)"
    )
    print(f"{'measurement':26s} {'run':18s} {'conformers/s':>25s} {'ratio':>6s} {'paired speed-up':>22s} {'faults':>7s}")
    for measurement, timings in (("training (batch 32)", training), ("inference E+F (batch 64)", inference)):
        for name in variants:
            ratio = timings[name].median_rate() / timings["hippynn"].median_rate()
            paired = spread(paired_speedups(timings, name, "hippynn"))
            print(f"{measurement:26s} {name:18s} {summary(timings[name]):>25s} {ratio:6.2f} {paired:>22s} {faults(timings[name], steps):>7s}")
        print(f"{measurement:26s} {'hippynn':18s} {summary(timings['hippynn']):>25s} {'':29s} {faults(timings['hippynn'], steps):>7s}")
        if HIPPYNN_FUSED in timings:
            control = timings[HIPPYNN_FUSED]
            ratio = timings["metamlip"].median_rate() / control.median_rate()
            paired = spread(paired_speedups(timings, "metamlip", HIPPYNN_FUSED))
            print(
                f"{measurement:26s} {HIPPYNN_FUSED:18s} {summary(control):>25s} {ratio:6.2f} {paired:>22s} {faults(control, steps):>7s}"
                "  (metamlip against it)"
            )
        for kernels in ("metamlip", NATIVE):
            if kernels + " float64" in timings:
                slowdown = spread(paired_speedups(timings, kernels, kernels + " float64"))
                print(f"{measurement:26s} {kernels}: float64 time / float32 time per pair: {slowdown}")
    if arguments.ceiling:
        print_ceiling(training_runs, inference_runs, arguments.repeats, steps)
    construction = batch_construction_seconds(batchers[torch.float32], TRAIN_BATCH, 50)
    per_batch = statistics.median(construction) * 1e3
    step_ms = 1e3 * TRAIN_BATCH / training["metamlip"].median_rate()
    print(
        f"metamlip batch construction (StructureBatcher.batch, {TRAIN_BATCH} conformers): median {per_batch:.2f} ms "
        f"[{min(construction) * 1e3:.2f} - {max(construction) * 1e3:.2f}], {100 * per_batch / step_ms:.0f}% of a training step"
    )


def operation_seconds(run: Callable[[], None]) -> tuple[float, float]:
    """Seconds one call of `run` spends inside torch operations (the self time of every `aten::`
    operation under `torch.profiler`, so nested operations count once), and the call's wall time
    under the profiler. The profiler's own cost per operation is partly counted in, so the first
    errs high."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        seconds = timed(run)
    return sum(event.self_cpu_time_total for event in profiler.key_averages() if event.key.startswith("aten::")) * 1e-6, seconds


def print_ceiling(training_runs: dict[str, Callable[[], None]], inference_runs: dict[str, Callable[[], None]], rounds: int, steps: int) -> None:
    """metamlip's time per batch inside torch operations and outside them (Python, the autograd
    engine, allocation), and the speed-up over hippynn if the time outside them were zero: the most
    that less overhead alone could give, with the same operations. Each round times metamlip,
    profiles it, then times hippynn; the least of the rounds is kept for each (the figures least
    disturbed by other load)."""
    print(f"ceiling ({rounds} rounds, least of each): ms per batch, metamlip's wall time = inside torch operations (profiled) + outside them")
    for measurement, runs in (("training (batch 32)", training_runs), ("inference E+F (batch 64)", inference_runs)):
        wall, operations, profiled, hippynn = [], [], [], []
        for _ in range(rounds):
            wall.append(timed(runs["metamlip"]))
            inside, seconds = operation_seconds(runs["metamlip"])
            operations.append(inside)
            profiled.append(seconds)
            hippynn.append(timed(runs["hippynn"]))
        wall_ms, operations_ms, profiled_ms, hippynn_ms = (1e3 * min(values) / steps for values in (wall, operations, profiled, hippynn))
        print(
            f"{measurement:26s} {wall_ms:6.2f} = {operations_ms:6.2f} + {wall_ms - operations_ms:5.2f} (under the profiler {profiled_ms:6.2f}); "
            f"hippynn {hippynn_ms:6.2f}; speed-up {hippynn_ms / wall_ms:.2f}, with nothing outside the operations {hippynn_ms / operations_ms:.2f}"
        )


def metamlip_training_run(model: Potential, batches: list[Batch], steps: int) -> Callable[[], None]:
    """`steps` optimiser steps of metamlip's own `train_steps` with its training loops' optimiser."""
    optimizer = adam_optimizer(model.parameters(), 1e-4)
    weights = LossWeights()
    return lambda: train_steps(model, optimizer, [batches[i % len(batches)] for i in range(steps)], weights)


def metamlip_inference_run(model: Potential, batches: list[Batch], steps: int) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        for i in range(steps):
            model(batches[i % len(batches)], forces=True).forces_ev_per_angstrom.sum().item()

    return run


def hippynn_training_run(model: HippynnModel, batches: list[HippynnBatch], steps: int, fused: bool) -> Callable[[], None]:
    """`steps` hand-written hippynn steps with its default optimiser (`torch.optim.Adam`, as its
    `SetupParams` makes it) or, with `fused`, metamlip's."""
    optimizer = adam_optimizer(model.parameters(), 1e-4) if fused else torch.optim.Adam(model.parameters(), lr=1e-4)

    def run() -> None:
        model.train()
        for i in range(steps):
            hippynn_train_step(model, optimizer, batches[i % len(batches)])

    return run


def hippynn_inference_run(model: HippynnModel, batches: list[HippynnBatch], steps: int) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        for i in range(steps):
            model.energy_and_forces(batches[i % len(batches)], create_graph=False)[1].sum().item()

    return run


if __name__ == "__main__":
    main()

"""Side-by-side CPU throughput of metamlip's HIP-NN and LANL hippynn's `Hipnn` + `HEnergy`.

Both models have the same shape and start from the same weights (copied name for name),
run in float32 on the same MD17 ethanol batches with the same number of threads:

* training: one step = energy + forces (create_graph) + loss (per-atom energy MSE + force
  MSE) + backward + Adam step, batches of 32 conformers; metamlip runs its own
  `train_steps`, hippynn an equivalent hand-written step;
* inference: energy + forces, batches of 64 conformers.

hippynn runs with its default custom-kernel setting ("auto"), as its users get it. Batches
are built before timing (pair lists for hippynn, `StructureBatcher.batch` for metamlip), so
the figures measure the models; metamlip's batch construction is timed separately. The
repetitions of the two models are interleaved (A B A B ...) so that load from other jobs
on a shared machine falls on both alike.

    python benchmarks/bench_hipnn.py --threads 1 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from interleaved_timing import Timing, interleaved, paired_speedups, spread, timed

from metamlip.data.batching import Batch, StructureBatcher
from metamlip.data.level_dataset import LevelDataset
from metamlip.data.references import EnergyReference
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.potential import SHARED_HEAD, Potential, build_potential
from metamlip.readers import read_level
from metamlip.training.loop import train_steps
from metamlip.training.loss import LossWeights

ETHANOL = Path(__file__).resolve().parents[1] / "tests" / "data" / "md17_ethanol_dft.npz"
TRAIN_BATCH = 32
INFERENCE_BATCH = 64
N_DISTINCT_BATCHES = 8


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
    parser.add_argument(
        "--hippynn-kernels", default=None,
        help="override hippynn's custom-kernel setting (e.g. _pytorch_raw: uncompiled); default: hippynn's own ('auto')",
    )
    return parser.parse_args()


def load_ethanol() -> LevelDataset:
    return read_level(ETHANOL, energy_unit="kcal/mol", level="pbe+vdw-ts")


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
    dataset = load_ethanol()
    species = sorted(set(int(z) for z in dataset.atomic_numbers))
    reference = EnergyReference.fit(dataset, species)
    potential, hippynn_model = build_models(species, arguments.features, reference)
    batcher = StructureBatcher(dataset, species, potential.config.cutoff_angstrom, dtype=torch.float32)

    generator = np.random.default_rng(0)
    order = generator.permutation(len(dataset))
    train_batches = [batcher.batch(order[i * TRAIN_BATCH : (i + 1) * TRAIN_BATCH]) for i in range(N_DISTINCT_BATCHES)]
    offset = N_DISTINCT_BATCHES * TRAIN_BATCH
    inference_batches = [
        batcher.batch(order[offset + i * INFERENCE_BATCH : offset + (i + 1) * INFERENCE_BATCH]) for i in range(N_DISTINCT_BATCHES)
    ]
    hippynn_train = [hippynn_batch(b, reference, len(species)) for b in train_batches]
    hippynn_inference = [hippynn_batch(b, reference, len(species)) for b in inference_batches]

    weights = LossWeights()
    metamlip_optimizer = torch.optim.Adam(potential.parameters(), lr=1e-4)
    hippynn_optimizer = torch.optim.Adam(hippynn_model.parameters(), lr=1e-4)
    steps = arguments.steps

    def metamlip_training() -> None:
        train_steps(potential, metamlip_optimizer, [train_batches[i % N_DISTINCT_BATCHES] for i in range(steps)], weights)

    def hippynn_training() -> None:
        hippynn_model.train()
        for i in range(steps):
            hippynn_train_step(hippynn_model, hippynn_optimizer, hippynn_train[i % N_DISTINCT_BATCHES])

    def metamlip_inference() -> None:
        potential.eval()
        for i in range(steps):
            potential(inference_batches[i % N_DISTINCT_BATCHES], forces=True).forces_ev_per_angstrom.sum().item()

    def hippynn_inference_run() -> None:
        hippynn_model.eval()
        for i in range(steps):
            hippynn_model.energy_and_forces(hippynn_inference[i % N_DISTINCT_BATCHES], create_graph=False)[1].sum().item()

    print(f"torch {torch.__version__}, hippynn {hippynn.__version__}, threads {torch.get_num_threads()}, float32")
    chosen = "--hippynn-kernels" if arguments.hippynn_kernels is not None else "hippynn's setting"
    print(
        f"hippynn custom kernels: {chosen} {arguments.hippynn_kernels or hippynn.settings.USE_CUSTOM_KERNELS!r} -> active "
        f"{custom_kernels.CUSTOM_KERNELS_ACTIVE!r} (available {custom_kernels.CUSTOM_KERNELS_AVAILABLE})"
    )
    if custom_kernels.CUSTOM_KERNELS_ACTIVE == "pytorch":
        print("  ('pytorch' = hippynn's pure-pytorch envsum/sensesum/featsum wrapped in torch.compile)")
    print(
        f"ethanol, {arguments.features} features, 20 sensitivities, 2 interaction layers x 3 atom layers; "
        f"{train_batches[0].neighbour_mask.sum().item() // TRAIN_BATCH} pairs per conformer"
    )

    warm_start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in (metamlip_training, hippynn_training, metamlip_inference, hippynn_inference_run):
            run()
            run()
    print(f"warm-up, 2 rounds each (includes any torch.compile of hippynn's kernels): {time.perf_counter() - warm_start:.1f} s")

    training = interleaved(
        {"metamlip": metamlip_training, "hippynn": hippynn_training}, arguments.repeats, steps * TRAIN_BATCH
    )
    inference = interleaved(
        {"metamlip": metamlip_inference, "hippynn": hippynn_inference_run}, arguments.repeats, steps * INFERENCE_BATCH
    )
    construction = batch_construction_seconds(batcher, TRAIN_BATCH, 50)

    print(
        f"\n{arguments.repeats} repetitions of {steps} batches, models interleaved (A B, then B A, ...) "
        "so that load from other jobs hits both alike."
    )
    print("conformers/s: median [min - max]")
    print("ratio m/h: metamlip/hippynn of the medians; paired: median [min - max] over back-to-back repetition pairs")
    print(f"{'measurement':26s} {'metamlip':>25s} {'hippynn':>25s} {'ratio m/h':>10s} {'paired ratio':>22s}")
    for name, timings in (("training (batch 32)", training), ("inference E+F (batch 64)", inference)):
        ratio = timings["metamlip"].median_rate() / timings["hippynn"].median_rate()
        paired = spread(paired_speedups(timings, "metamlip", "hippynn"))
        print(f"{name:26s} {summary(timings['metamlip']):>25s} {summary(timings['hippynn']):>25s} {ratio:10.2f} {paired:>22s}")
    per_batch = statistics.median(construction) * 1e3
    step_ms = 1e3 * TRAIN_BATCH / training["metamlip"].median_rate()
    print(
        f"\nmetamlip batch construction (StructureBatcher.batch, {TRAIN_BATCH} conformers): median {per_batch:.2f} ms "
        f"[{min(construction) * 1e3:.2f} - {max(construction) * 1e3:.2f}], {100 * per_batch / step_ms:.0f}% of a training step"
    )


if __name__ == "__main__":
    main()

"""Side-by-side CPU speed of metamlip's MACE backbone and mace-torch's own MACE model.

metamlip runs through `Potential` (what its users train); mace-torch runs the model its training
script builds for `--model MACE` (`ScaleShiftMACE`, here with scale 1 and shift 0). Both have the
same shape (`MaceSection`'s defaults; `--channels` changes the width) and the same backbone
weights (copied name for name, as `tests/test_backbones.py` does; every run checks that the block
features agree); they differ only in the read-out: metamlip's hierarchical linear head, mace-torch's
linear + MLP read-outs. MD17 ethanol, float32 and float64, one thread by default:

* training: one step = energy + forces (create_graph) + loss (per-atom energy MSE + force MSE)
  + backward + Adam step, batches of 32 conformers; metamlip runs its own `train_steps` with
  the optimiser its training loop makes (fused Adam), mace-torch its own `take_step` and
  `WeightedEnergyForcesLoss` with its training script's optimiser (Adam, amsgrad), no EMA and
  no gradient clipping;
* inference: energy + forces, batches of 64 conformers (`Potential(batch)`; mace-torch's
  `model(batch, training=False)` in eval mode).

Each side builds its batches with its own pipeline and neighbour list before timing
(metamlip: `StructureBatcher`; mace-torch: `AtomicData.from_config` + its `torch_geometric`
loader, as its tools do), so neighbour lists are outside the timed region for both; their
construction is timed separately. The repetitions of the two models are interleaved
(A B, B A, ...) so that load from other jobs falls on both alike.

    python benchmarks/bench_mace.py [--repeats 11] [--steps 1] [--dtypes float32,float64] [--channels 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from interleaved_timing import Timing, interleaved, paired_speedups, spread, timed

from metamlip.data.batching import Batch, StructureBatcher
from metamlip.data.level_dataset import LevelDataset
from metamlip.data.references import EnergyReference
from metamlip.model.mace import default_dtype
from metamlip.model.mace_config import MaceConfig, MaceSection
from metamlip.model.potential import SHARED_HEAD, Potential, build_potential
from metamlip.readers import read_level
from metamlip.training.loop import adam_optimizer, train_steps
from metamlip.training.loss import LossWeights

with warnings.catch_warnings():  # e3nn's TorchScript deprecation warnings; mace-torch after metamlip (see metamlip.model.mace)
    warnings.simplefilter("ignore")
    import mace
    from e3nn import o3
    from mace.data import AtomicData, KeySpecification, config_from_atoms
    from mace.modules import (
        RealAgnosticInteractionBlock,
        RealAgnosticResidualInteractionBlock,
        ScaleShiftMACE,
        WeightedEnergyForcesLoss,
    )
    from mace.tools import DefaultKeys, torch_geometric
    from mace.tools.train import take_step
    from mace.tools.utils import AtomicNumberTable

ETHANOL = Path(__file__).resolve().parents[1] / "tests" / "data" / "md17_ethanol_dft.npz"
TRAIN_BATCH = 32
INFERENCE_BATCH = 64
N_DISTINCT_BATCHES = 4
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MACE_TORCH_READOUT_MLP = "16x0e"  # mace-torch's training-script default (--MLP_irreps)
NOT_IN_BACKBONE = {  # mace-torch's buffers that metamlip's backbone has not (its read-outs neither)
    "atomic_numbers", "r_max", "num_interactions", "atomic_energies_fn.atomic_energies", "scale_shift.scale", "scale_shift.shift"
}


@dataclasses.dataclass
class Side:
    """One implementation's timed runs: a training repetition and an inference repetition."""

    training: Callable[[], None]
    inference: Callable[[], None]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both models")
    parser.add_argument("--repeats", type=int, default=11, help="timed repetitions per model, measurement and dtype")
    parser.add_argument("--steps", type=int, default=1, help="batches per timed repetition")
    parser.add_argument("--dtypes", default="float32,float64", help="comma-separated: float32, float64")
    parser.add_argument("--channels", type=int, default=MaceSection.num_channels, help="MACE num_channels")
    parser.add_argument("--max-ell", type=int, default=MaceSection.max_ell, help="MACE max_ell")
    parser.add_argument("--correlation", type=int, default=MaceSection.correlation, help="MACE correlation")
    return parser.parse_args()


def mace_config(arguments: argparse.Namespace) -> MaceConfig:
    """`MaceSection`'s defaults with the width, max_ell and correlation from the command line."""
    shape = {"num_channels": arguments.channels, "max_ell": arguments.max_ell, "correlation": arguments.correlation}
    return MaceConfig(**{**dataclasses.asdict(MaceSection()), **shape})


def load_ethanol() -> LevelDataset:
    return read_level(ETHANOL, energy_unit="kcal/mol", level="pbe+vdw-ts")


def batch_indices(n_structures: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Disjoint random structure indices: N_DISTINCT_BATCHES training batches, then as many inference batches."""
    order = np.random.default_rng(0).permutation(n_structures)
    train = [order[i * TRAIN_BATCH : (i + 1) * TRAIN_BATCH] for i in range(N_DISTINCT_BATCHES)]
    offset = N_DISTINCT_BATCHES * TRAIN_BATCH
    inference = [order[offset + i * INFERENCE_BATCH :][:INFERENCE_BATCH] for i in range(N_DISTINCT_BATCHES)]
    return train, inference


def mace_torch_batch(dataset: LevelDataset, indices: np.ndarray, cutoff_angstrom: float, dtype: torch.dtype) -> torch_geometric.Batch:
    """Structures `indices` through mace-torch's pipeline: ASE atoms with REF_energy / REF_forces,
    `config_from_atoms`, `AtomicData.from_config` (its neighbour list) and its loader's collation."""
    keys = KeySpecification.from_defaults()
    table = AtomicNumberTable(sorted({int(z) for z in dataset.atomic_numbers}))
    graphs = []
    with default_dtype(dtype):  # mace-torch's data take torch's default dtype
        for index in indices:
            atoms = dataset.to_atoms(int(index))
            atoms.info[DefaultKeys.ENERGY.value] = float(dataset.energies_ev[index])
            atoms.arrays[DefaultKeys.FORCES.value] = dataset.forces_ev_per_angstrom[dataset.atom_slice(int(index))]
            structure = config_from_atoms(atoms, key_specification=keys)
            graphs.append(AtomicData.from_config(structure, z_table=table, cutoff=cutoff_angstrom))
        return next(iter(torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False)))


def build_mace_torch(potential: Potential, reference: EnergyReference, dtype: torch.dtype) -> ScaleShiftMACE:
    """The model mace-torch's training script builds for `--model MACE` (`ScaleShiftMACE`; scale 1,
    shift 0 here) with the potential's shape and backbone weights; its E0s are the reference's
    per-element energies, so both fit the same residual."""
    config = potential.config
    hidden = (config.num_channels * o3.Irreps.spherical_harmonics(config.max_L)).sort().irreps.simplify()  # 32x0e + 32x1o
    with default_dtype(dtype):  # mace-torch builds its model in torch's default dtype
        model = ScaleShiftMACE(
            atomic_inter_scale=1.0, atomic_inter_shift=0.0, r_max=config.cutoff_angstrom, num_bessel=config.num_bessel,
            num_polynomial_cutoff=config.num_polynomial_cutoff, max_ell=config.max_ell,
            interaction_cls=RealAgnosticResidualInteractionBlock, interaction_cls_first=RealAgnosticInteractionBlock,
            num_interactions=config.num_interactions, num_elements=len(potential.species), hidden_irreps=hidden,
            MLP_irreps=o3.Irreps(MACE_TORCH_READOUT_MLP), atomic_energies=np.asarray(reference.energy_per_element_ev),
            avg_num_neighbors=config.avg_num_neighbors, atomic_numbers=potential.species, correlation=config.correlation,
            gate=torch.nn.functional.silu, radial_MLP=list(config.radial_MLP), use_reduced_cg=False,
        )
    missing, unexpected = model.load_state_dict(potential.backbone.state_dict(), strict=False)
    if unexpected or any(key not in NOT_IN_BACKBONE and not key.startswith("readouts.") for key in missing):
        raise RuntimeError(f"weights do not map name for name: missing {missing}, unexpected {unexpected}")
    return model


def feature_difference(
    potential: Potential, model: ScaleShiftMACE, batch: Batch, graph: torch_geometric.Batch, dtype: torch.dtype
) -> float:
    """Largest |difference| between the two models' block features (vectors included) on one batch."""
    vectors = potential.neighbour_vectors_angstrom(batch, batch.positions_angstrom)
    arguments = (batch.species_index, batch.neighbour_index, batch.neighbour_mask, vectors)
    _, blocks = potential.backbone.equivariant_features(*arguments)
    with default_dtype(dtype):
        expected = model(graph.to_dict(), compute_force=False)["node_feats"]
    return float((torch.cat(blocks, dim=1) - expected).abs().max())


def metamlip_side(potential: Potential, train: list[Batch], inference: list[Batch], steps: int) -> Side:
    """metamlip's training (its `train_steps`, fused Adam as its loop makes) and inference."""
    optimizer = adam_optimizer(potential.parameters(), 1e-4)
    weights = LossWeights()

    def training() -> None:
        train_steps(potential, optimizer, [train[i % len(train)] for i in range(steps)], weights)

    def inference_run() -> None:
        potential.eval()
        for i in range(steps):
            potential(inference[i % len(inference)], forces=True).forces_ev_per_angstrom.sum().item()

    return Side(training, inference_run)


def mace_torch_side(
    model: ScaleShiftMACE, train: list[torch_geometric.Batch], inference: list[torch_geometric.Batch], steps: int, dtype: torch.dtype
) -> Side:
    """mace-torch's training (its `take_step`, loss and default optimiser) and inference, in
    torch's default dtype set to `dtype` as its scripts set it."""
    with default_dtype(dtype):
        loss = WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
    outputs = {"forces": True, "virials": False, "stress": False}
    device = torch.device("cpu")

    def training() -> None:
        model.train()
        with default_dtype(dtype):
            for i in range(steps):
                take_step(model, loss, train[i % len(train)], optimizer, None, outputs, None, device)

    def inference_run() -> None:
        model.eval()
        with default_dtype(dtype):
            for i in range(steps):
                model(inference[i % len(inference)].to_dict(), training=False, compute_force=True)["forces"].sum().item()

    return Side(training, inference_run)


def construction_ms(dataset: LevelDataset, batcher: StructureBatcher, dtype: torch.dtype) -> tuple[float, float]:
    """Median ms to build a batch of TRAIN_BATCH on each side (metamlip: its pairs are computed once
    per dataset, when the batcher is made; mace-torch: a neighbour list per structure, then collation)."""
    generator = np.random.default_rng(1)
    draws = [generator.choice(len(dataset), TRAIN_BATCH, replace=False) for _ in range(5)]
    metamlip = [timed(lambda indices=indices: batcher.batch(indices)) for indices in draws]
    cutoff = batcher.pairs.cutoff_angstrom
    mace_torch = [timed(lambda indices=indices: mace_torch_batch(dataset, indices, cutoff, dtype)) for indices in draws]
    return 1e3 * statistics.median(metamlip), 1e3 * statistics.median(mace_torch)


def measure_dtype(
    dataset: LevelDataset, reference: EnergyReference, config: MaceConfig, arguments: argparse.Namespace, dtype_name: str
) -> None:
    """Build both models and their batches in one dtype, check that the weights map, time and print."""
    dtype = DTYPES[dtype_name]
    potential = build_potential(reference.elements, config, seed=0, dtype=dtype)
    potential.add_level(reference, SHARED_HEAD)
    model = build_mace_torch(potential, reference, dtype)
    batcher = StructureBatcher(dataset, potential.species, config.cutoff_angstrom, dtype=dtype)
    train_indices, inference_indices = batch_indices(len(dataset))
    ours_train, ours_inference = ([batcher.batch(i) for i in indices] for indices in (train_indices, inference_indices))
    theirs_train, theirs_inference = (
        [mace_torch_batch(dataset, i, config.cutoff_angstrom, dtype) for i in indices] for indices in (train_indices, inference_indices)
    )
    ours = metamlip_side(potential, ours_train, ours_inference, arguments.steps)
    theirs = mace_torch_side(model, theirs_train, theirs_inference, arguments.steps, dtype)
    difference = feature_difference(potential, model, ours_train[0], theirs_train[0], dtype)
    print(f"\n{dtype_name}: same backbone weights, block features agree to {difference:.1e} (max |difference|, batch of {TRAIN_BATCH})")

    for side in (ours, theirs):  # warm-up: e3nn's first calls, allocator
        for run in (side.training, side.inference):
            run()
    timings = {
        f"training (batch {TRAIN_BATCH})": interleaved(
            {"metamlip": ours.training, "mace-torch": theirs.training}, arguments.repeats, arguments.steps * TRAIN_BATCH
        ),
        f"inference E+F (batch {INFERENCE_BATCH})": interleaved(
            {"metamlip": ours.inference, "mace-torch": theirs.inference}, arguments.repeats, arguments.steps * INFERENCE_BATCH
        ),
    }
    print_timings(timings, arguments.steps)
    ours_ms, theirs_ms = construction_ms(dataset, batcher, dtype)
    print(
        f"batch construction (outside the timed region), {TRAIN_BATCH} conformers: metamlip {ours_ms:.2f} ms "
        f"(StructureBatcher.batch; pairs computed once per dataset), mace-torch {theirs_ms:.1f} ms (AtomicData.from_config + collate)"
    )
    print(f"load average (1 min) after {dtype_name}: {os.getloadavg()[0]:.2f}")


def print_timings(timings: dict[str, dict[str, Timing]], steps: int) -> None:
    """One row per measurement: ms per batch of each side and the per-pair ratio, median [min - max]."""
    print(f"{'measurement':28s} {'metamlip ms/batch':>20s} {'mace-torch ms/batch':>20s} {'ratio t(mace-torch)/t(metamlip)':>33s}")
    for name, timing in timings.items():
        ours, theirs = (spread([1e3 * s / steps for s in timing[side].seconds], digits=0) for side in ("metamlip", "mace-torch"))
        ratio = spread(paired_speedups(timing, "metamlip", "mace-torch"))
        print(f"{name:28s} {ours:>20s} {theirs:>20s} {ratio:>33s}")


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(arguments.threads)
    started = time.perf_counter()
    load = os.getloadavg()
    dataset = load_ethanol()
    species = sorted({int(z) for z in dataset.atomic_numbers})
    reference = EnergyReference.fit(dataset, species)
    config = mace_config(arguments)
    print(f"command: python {shlex.join(sys.argv)}")
    threads = f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    print(f"torch {torch.__version__}, mace-torch {mace.__version__}, {threads}")
    print(
        f"MD17 ethanol; MACE {config.num_channels} channels, max_L {config.max_L}, max_ell {config.max_ell}, correlation "
        f"{config.correlation}, {config.num_interactions} interactions, {config.num_bessel} Bessel, radial MLP {config.radial_MLP}, "
        f"cutoff {config.cutoff_angstrom} A; use_reduced_cg=False on both (mace-torch's training-script default; its class's is True)"
    )
    print(
        f"{arguments.repeats} repetitions of {arguments.steps} batch(es) per measurement, models interleaved (A B, then B A, ...); "
        "ms/batch and ratio: median [min - max] over repetitions (ratio: per back-to-back pair; > 1: metamlip faster)"
    )
    print("neighbour lists: built before timing on both sides (outside the timed region)")
    print(f"load average (1, 5, 15 min) at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype_name in arguments.dtypes.split(","):
            measure_dtype(dataset, reference, config, arguments, dtype_name.strip())
    load = os.getloadavg()
    print(f"\nload average (1, 5, 15 min) at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; wall {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""ASE calculator calls: metamlip's `MetamlipCalculator` next to hippynn's `HippynnCalculator`.

Both wrap the same HIP-NN (64 features, 20 sensitivities, 2 interaction layers x 3 atom layers,
cutoff 6.5 Angstrom, species H, C, N, O) with the same float32 weights, one thread, and answer
energy + forces (+ stress for periodic cells, which hippynn's calculator always computes and
metamlip's computes for cells periodic in all directions). Each keeps its own neighbour list with
its default skin (metamlip 0.5 Angstrom, hippynn 1.0 Angstrom, ASE's `NeighborList`).

* ethanol MD: the consecutive frames of the MD17 ethanol trajectory (tests/data, 500 K ab initio
  MD) replayed through both calculators, blocks of frames interleaved (A B, then B A, ...);
* size scan: ms per call from 9 atoms (ethanol) to 1536 (a periodic box of 512 waters), each call
  after a small random move of every atom (0.01 Angstrom), models interleaved per block of calls.

Every calculator keeps freed memory in the process (`metamlip.allocator`: metamlip's calculator does
so by default, for the whole process, so hippynn's runs with it too); `--default-allocator` leaves
the C library's settings, under which large structures page-fault fresh memory on every call. The
minor page faults per call are printed.

    python benchmarks/bench_calculator.py [--frames 400] [--repeats 5] [--sizes 9,24,81,192,648,1536]
                                          [--default-allocator] [--compile] [--float64] [--native]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ase import Atoms, units
from ase.build import molecule
from interleaved_timing import interleaved, spread

from metamlip.calculator import MetamlipCalculator
from metamlip.data.references import EnergyReference
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.potential import SHARED_HEAD, Potential, build_potential
from metamlip.readers import read_level

ETHANOL = Path(__file__).resolve().parents[1] / "tests" / "data" / "md17_ethanol_dft.npz"
SPECIES = [1, 6, 7, 8]
LEVEL = "benchmark"
WATER_SPACING_ANGSTROM = 3.104  # one molecule per 29.9 Angstrom^3: liquid water's density


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=400, help="MD17 ethanol frames replayed per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per measurement")
    parser.add_argument("--calls", type=int, default=20, help="calls per repetition in the size scan")
    parser.add_argument("--sizes", default="9,24,81,192,648,1536", help="atoms: 9 is ethanol, others water boxes of 3 m^3 atoms")
    parser.add_argument("--skip-hippynn", action="store_true", help="metamlip only (e.g. without the test extra)")
    parser.add_argument("--compile", action="store_true", help="also time metamlip's calculator with compile=True")
    parser.add_argument("--float64", action="store_true", help="also time metamlip's calculator with dtype='float64'")
    parser.add_argument("--native", action="store_true", help="also time metamlip's calculator with native=True (C++ kernels)")
    parser.add_argument(
        "--default-allocator", action="store_true",
        help="metamlip's calculators with keep_freed_memory=False: the C library's allocator settings for every calculator",
    )
    return parser.parse_args()


def models(features: int = 64) -> tuple[Potential, object]:
    """metamlip's potential and hippynn's energy node with the same float32 weights."""
    config = HipnnConfig(n_features=features, n_sensitivities=20, n_interaction_layers=2, n_atom_layers=3)
    potential = build_potential(SPECIES, config, seed=0, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero read-out of the one-hot block too, as after training
        for parameter in potential.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    potential.add_level(EnergyReference(LEVEL, SPECIES, np.zeros(len(SPECIES))), SHARED_HEAD)
    if os.environ.get("METAMLIP_BENCH_NO_HIPPYNN"):
        return potential, None
    from hippynn.graphs import inputs, networks, targets

    species = inputs.SpeciesNode(db_name="Z")
    positions = inputs.PositionsNode(db_name="R")
    network = networks.Hipnn("hipnn", (species, positions), module_kwargs={
        "possible_species": [0, *SPECIES], "n_features": config.n_features, "n_sensitivities": config.n_sensitivities,
        "dist_soft_min": config.soft_min_angstrom, "dist_soft_max": config.soft_max_angstrom,
        "dist_hard_max": config.cutoff_angstrom, "n_interaction_layers": config.n_interaction_layers,
        "n_atom_layers": config.n_atom_layers,
    })
    energy = targets.HEnergyNode("energy", network)
    network.torch_module.load_state_dict(potential.backbone.state_dict(), strict=True)
    energy.torch_module.load_state_dict(potential.heads[SHARED_HEAD].state_dict(), strict=True)
    return potential, energy


def hippynn_calculator(energy) -> object:
    from hippynn.interfaces.ase_interface import HippynnCalculator

    calculator = HippynnCalculator(energy, en_unit=units.eV, dist_unit=units.Angstrom)
    calculator.to(torch.float32)
    return calculator


def water_box(atoms_wanted: int, seed: int = 0) -> Atoms:
    """A periodic cubic box of m^3 waters on a lattice (liquid density), randomly turned and shifted."""
    per_side = round((atoms_wanted / 3) ** (1 / 3))
    if 3 * per_side**3 != atoms_wanted:
        raise ValueError(f"a water box holds 3 m^3 atoms; {atoms_wanted} is not of that form")
    generator = np.random.default_rng(seed)
    box = Atoms(cell=np.eye(3) * per_side * WATER_SPACING_ANGSTROM, pbc=True)
    for index in np.ndindex(per_side, per_side, per_side):
        water = molecule("H2O")
        water.rotate(generator.uniform(0, 360), generator.normal(size=3), center="COM")
        water.positions += (np.asarray(index) + 0.5 + generator.uniform(-0.1, 0.1, 3)) * WATER_SPACING_ANGSTROM - water.get_center_of_mass()
        box += water
    return box


def structure(n_atoms: int) -> Atoms:
    if n_atoms == 9:
        return read_level(ETHANOL, energy_unit="kcal/mol", level="pbe+vdw-ts").to_atoms(0)
    return water_box(n_atoms)


def call_seconds(atoms: Atoms, positions: list[np.ndarray]) -> float:
    """Mean seconds of one energy + forces call over the given positions."""
    start = time.perf_counter()
    for frame in positions:
        atoms.positions = frame
        atoms.get_potential_energy()
        atoms.get_forces()
    return (time.perf_counter() - start) / len(positions)


def interleaved_ms(
    calculators: dict[str, object], atoms: Atoms, frames: list[np.ndarray], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """ms per call, and minor page faults per call, of each calculator on the same frames, in
    alternating order (`interleaved_timing.interleaved`); each has its own atoms."""
    systems = {name: atoms.copy() for name in calculators}
    for name, calculator in calculators.items():
        systems[name].calc = calculator
        call_seconds(systems[name], frames[: min(5, len(frames))])  # warm-up (and any compilation)
    runs = {name: (lambda system=system: call_seconds(system, frames)) for name, system in systems.items()}
    timings = interleaved(runs, repeats, len(frames))
    per_call = {name: [1e3 * seconds / len(frames) for seconds in timing.seconds] for name, timing in timings.items()}
    faults = {name: [count / len(frames) for count in timing.page_faults] for name, timing in timings.items()}
    return per_call, faults


def random_walk(atoms: Atoms, steps: int, step_angstrom: float, seed: int) -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    moves = generator.normal(0.0, step_angstrom / np.sqrt(3), (steps, len(atoms), 3))
    return list(atoms.positions + np.cumsum(moves, axis=0))


def check_agreement(calculators: dict[str, object], atoms: Atoms) -> str:
    """Largest energy and force differences of the calculators from the first one (float32 round-off)."""
    results = []
    for calculator in calculators.values():
        copy = atoms.copy()
        copy.calc = calculator
        results.append((copy.get_potential_energy(), copy.get_forces()))
    energy = max(abs(e - results[0][0]) for e, _ in results)
    forces = max(np.abs(f - results[0][1]).max() for _, f in results)
    return f"largest difference: energy {energy:.1e} eV, forces {forces:.1e} eV/A"


def report(title: str, timings: dict[str, list[float]], faults: dict[str, list[float]]) -> None:
    print(title)
    names = list(timings)
    for name in names:
        values = timings[name]
        print(
            f"  {name:22s} ms per call: median {statistics.median(values):7.3f} [{min(values):7.3f} - {max(values):7.3f}], "
            f"page faults per call {statistics.median(faults[name]):.0f}"
        )
    for name in names[1:]:
        print(f"  ratio t({name}) / t({names[0]}) per pair: {spread([b / a for a, b in zip(timings[names[0]], timings[name])])}")
    if "hippynn" in timings:
        for name in [name for name in names[1:] if name != "hippynn"]:
            print(f"  speed-up of {name} over hippynn per pair: {spread([h / m for m, h in zip(timings[name], timings['hippynn'])])}")


def main() -> None:
    arguments = parse_arguments()
    torch.set_num_threads(1)
    if arguments.skip_hippynn:
        os.environ["METAMLIP_BENCH_NO_HIPPYNN"] = "1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        potential, energy_node = models()
    allocator = "the C library's default settings" if arguments.default_allocator else "freed memory kept in the process"
    print(f"torch {torch.__version__}, one thread, float32, allocator: {allocator}; load average at the start: {load_average()}")

    def metamlip_calculator(**options) -> MetamlipCalculator:
        return MetamlipCalculator(copy.deepcopy(potential), keep_freed_memory=not arguments.default_allocator, **options)

    def calculators() -> dict[str, object]:
        chosen = {"metamlip": metamlip_calculator()}
        if arguments.compile:
            chosen["metamlip compile=True"] = metamlip_calculator(compile=True)
        if arguments.float64:
            chosen["metamlip float64"] = metamlip_calculator(dtype="float64")
        if arguments.native:
            chosen["metamlip native=True"] = metamlip_calculator(native=True)
        if energy_node is not None:
            chosen["hippynn"] = hippynn_calculator(energy_node)
        return chosen

    ethanol = structure(9)
    trajectory = read_level(ETHANOL, energy_unit="kcal/mol", level="pbe+vdw-ts")
    frames = [trajectory.to_atoms(i).positions for i in range(arguments.frames)]
    chosen = calculators()
    print(f"\nethanol, {check_agreement(chosen, ethanol)}")
    timings, faults = interleaved_ms(chosen, ethanol, frames, arguments.repeats)
    report(f"ethanol MD: {arguments.frames} consecutive MD17 frames per repetition, {arguments.repeats} repetitions "
           f"(load average {load_average()})", timings, faults)

    print(f"\nsize scan: {arguments.calls} calls per repetition, every atom moved 0.01 Angstrom per call")
    for n_atoms in (int(size) for size in arguments.sizes.split(",")):
        atoms = structure(n_atoms)
        chosen = calculators()
        timings, faults = interleaved_ms(chosen, atoms, random_walk(atoms, arguments.calls, 0.01, seed=n_atoms), arguments.repeats)
        medians = ", ".join(f"{name} {statistics.median(values) / n_atoms * 1e3:.1f}" for name, values in timings.items())
        report(f"{n_atoms} atoms ({'ethanol' if n_atoms == 9 else 'periodic water'}; us per atom: {medians}; load {load_average()})", timings, faults)
    print(f"\nload average at the end: {load_average()}")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()

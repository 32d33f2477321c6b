"""Contracts every interatomic potential must meet, as plain checks on ASE structures.

Each check runs a `Potential` on ASE Atoms through the path used in training and in the
ASE calculator (LevelDataset -> neighbour pairs -> Batch -> model). If the model breaks
the contract, the check raises AssertionError and the message says which property failed
and by how much:

- rotation and translation: the energy does not change, and the forces rotate with the structure;
- permutation of atoms: the energy does not change, and the forces are permuted the same way;
- conservative forces: forces equal minus the central finite-difference gradient of the energy;
- batch independence: a structure gives the same result alone or batched with others;
- periodic images: lattice-vector translations, wrapping into the cell and supercells change nothing.

Energies in eV, forces in eV/Angstrom, lengths in Angstrom.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

from metamlip.data.batching import StructureBatcher
from metamlip.data.level_dataset import LevelDataset
from metamlip.data.neighbours import structure_pairs
from metamlip.model.potential import Potential

FINITE_DIFFERENCE_STEP_ANGSTROM = 1.0e-4
# Central differences err by h^2/6 |d3E/dx3| (truncation) plus ~eps |E| / h (round-off).
# Measured at h = 1e-4 Angstrom on MD17 ethanol, largest deviation over all components:
# 1.6e-7 (random 16-wide HIP-NN), 7.7e-7 (random 64-wide) and 9.6e-7 eV/Angstrom (trained on
# MD17); each grows 100x at h = 1e-3, so truncation dominates, and float64 round-off on residual
# energies of 1-10 eV is ~1e-11. The tolerance is 100x the worst measurement, yet forces off by
# 0.1% (~1e-3 eV/Angstrom) fail it, and so does any missing term or wrong sign.
FINITE_DIFFERENCE_TOLERANCE_EV_PER_ANGSTROM = 1.0e-4


@dataclass(frozen=True)
class Tolerance:
    """Largest deviation allowed by an exact symmetry (round-off only).

    Attributes:
        energy_per_atom_ev: absolute energy tolerance per atom of the structure, eV/atom.
        forces_ev_per_angstrom: absolute tolerance on each force component, eV/Angstrom.
    """

    energy_per_atom_ev: float
    forces_ev_per_angstrom: float


def default_tolerance(model: Potential) -> Tolerance:
    """Round-off tolerance at the model's dtype.

    An exact symmetry only changes the order of sums and the rounding of positions.
    float64: eps ~ 2e-16 times total energies of ~1e4 eV and forces of ~10 eV/Angstrom
    gives ~1e-12 (measured on ethanol: 2e-14 eV/Angstrom); 1e-8 leaves a wide margin yet
    catches any real break (>= 1e-6). float32: eps ~ 1e-7 times the same magnitudes, summed
    over tens of atoms (measured on ethanol: 9e-7 eV, 7e-7 eV/Angstrom).
    """
    if next(model.parameters()).dtype == torch.float64:
        return Tolerance(energy_per_atom_ev=1.0e-8, forces_ev_per_angstrom=1.0e-8)
    return Tolerance(energy_per_atom_ev=2.0e-4, forces_ev_per_angstrom=2.0e-3)


@dataclass
class StructurePredictions:
    """Model output for a list of structures, as float64 numpy arrays.

    Attributes:
        energy_ev: (n_structures,) total energies (residual + level reference).
        residual_energy_ev: (n_structures,) energies minus the level reference.
        forces_ev_per_angstrom: one (n_atoms_i, 3) array per structure.
    """

    energy_ev: np.ndarray
    residual_energy_ev: np.ndarray
    forces_ev_per_angstrom: list[np.ndarray]


def predict_structures(model: Potential, structures: Sequence[Atoms], level: str | None = None) -> StructurePredictions:
    """Energies and forces of `structures`, evaluated together as one batch at `level`."""
    level = model.resolve_level(level)
    parameter = next(model.parameters())
    periodic = any(atoms.pbc.any() for atoms in structures)
    dataset = LevelDataset.from_structures(
        level=level,
        atomic_numbers=[atoms.numbers for atoms in structures],
        positions_angstrom=[atoms.positions for atoms in structures],
        energies_ev=np.zeros(len(structures)),
        cells_angstrom=np.stack([np.asarray(atoms.cell[:]) for atoms in structures]) if periodic else None,
        pbc=np.stack([np.asarray(atoms.pbc) for atoms in structures]) if periodic else None,
        source="contract check",
    )
    batcher = StructureBatcher(dataset, model.species, model.config.cutoff_angstrom, parameter.dtype)
    batch = batcher.batch(np.arange(len(structures))).to(parameter.device)
    with torch.enable_grad():
        prediction = model(batch, level=level, forces=True)
    forces = prediction.forces_ev_per_angstrom.detach().cpu().double().numpy()
    return StructurePredictions(
        energy_ev=prediction.energy_ev.cpu().numpy(),
        residual_energy_ev=prediction.residual_energy_ev.detach().cpu().double().numpy(),
        forces_ev_per_angstrom=np.split(forces, np.cumsum([len(atoms) for atoms in structures])[:-1]),
    )


def check_rotation_translation(
    model: Potential, atoms: Atoms, level: str | None = None, seed: int = 0, n_trials: int = 3, tolerance: Tolerance | None = None
) -> None:
    """Random rigid motions: same energy, forces rotated with the structure (the cell rotates too)."""
    tolerance = tolerance or default_tolerance(model)
    generator = np.random.default_rng(seed)
    original = predict_structures(model, [atoms], level)
    for trial in range(n_trials):
        rotation = random_rotation(generator)
        moved = atoms.copy()
        moved.positions = atoms.positions @ rotation.T + generator.uniform(-5.0, 5.0, size=3)
        if atoms.pbc.any():
            moved.cell = np.asarray(atoms.cell[:]) @ rotation.T
        result = predict_structures(model, [moved], level)
        what = f"rotation/translation trial {trial} of {atoms.get_chemical_formula()}"
        _assert_energies_close(result.energy_ev, original.energy_ev, [len(atoms)], tolerance, what)
        _assert_close(
            result.forces_ev_per_angstrom[0],
            original.forces_ev_per_angstrom[0] @ rotation.T,
            tolerance.forces_ev_per_angstrom,
            f"{what}: forces do not rotate with the structure",
            "eV/Angstrom",
        )


def check_permutation(
    model: Potential, atoms: Atoms, level: str | None = None, seed: int = 0, tolerance: Tolerance | None = None
) -> None:
    """A random reordering of the atoms: same energy, forces reordered the same way."""
    tolerance = tolerance or default_tolerance(model)
    generator = np.random.default_rng(seed)
    order = generator.permutation(len(atoms))
    while len(atoms) > 1 and (order == np.arange(len(atoms))).all():
        order = generator.permutation(len(atoms))
    original = predict_structures(model, [atoms], level)
    result = predict_structures(model, [atoms[order]], level)
    what = f"permutation {order.tolist()} of {atoms.get_chemical_formula()}"
    _assert_energies_close(result.energy_ev, original.energy_ev, [len(atoms)], tolerance, what)
    _assert_close(
        result.forces_ev_per_angstrom[0],
        original.forces_ev_per_angstrom[0][order],
        tolerance.forces_ev_per_angstrom,
        f"{what}: forces are not permuted with the atoms",
        "eV/Angstrom",
    )


def check_forces_finite_difference(
    model: Potential,
    atoms: Atoms,
    level: str | None = None,
    step_angstrom: float = FINITE_DIFFERENCE_STEP_ANGSTROM,
    tolerance_ev_per_angstrom: float = FINITE_DIFFERENCE_TOLERANCE_EV_PER_ANGSTROM,
    atom_indices: Sequence[int] | None = None,
) -> float:
    """Forces against -(E(x + h) - E(x - h)) / 2h for every Cartesian component of the chosen atoms
    (all by default); the model is evaluated in float64 (a copy if it is not). Returns the largest
    deviation found, in eV/Angstrom.

    The residual energy (total minus the level reference) is differenced: the reference
    depends on composition only, and leaving out its ~1e4 eV keeps round-off at ~1e-10.
    """
    model64 = model if next(model.parameters()).dtype == torch.float64 else copy.deepcopy(model).double()
    analytic = predict_structures(model64, [atoms], level).forces_ev_per_angstrom[0]
    indices = range(len(atoms)) if atom_indices is None else atom_indices
    numeric = np.zeros((len(indices), 3))
    for row, atom in enumerate(indices):
        for axis in range(3):
            displaced = []
            for sign in (1.0, -1.0):
                copy_atoms = atoms.copy()
                copy_atoms.positions[atom, axis] += sign * step_angstrom
                displaced.append(predict_structures(model64, [copy_atoms], level).residual_energy_ev[0])
            numeric[row, axis] = -(displaced[0] - displaced[1]) / (2.0 * step_angstrom)
    _assert_close(
        analytic[list(indices)],
        numeric,
        tolerance_ev_per_angstrom,
        f"forces of {atoms.get_chemical_formula()} differ from minus the finite-difference energy gradient "
        f"(step {step_angstrom} Angstrom)",
        "eV/Angstrom",
    )
    return float(np.max(np.abs(analytic[list(indices)] - numeric)))


def check_batch_independence(
    model: Potential, structures: Sequence[Atoms], level: str | None = None, tolerance: Tolerance | None = None
) -> None:
    """Each structure alone, all together and all together in reverse order give the same results."""
    if len(structures) < 2:
        raise ValueError("batch independence needs at least two structures")
    tolerance = tolerance or default_tolerance(model)
    alone = [predict_structures(model, [atoms], level) for atoms in structures]
    expected_energy = np.concatenate([result.energy_ev for result in alone])
    expected_forces = [result.forces_ev_per_angstrom[0] for result in alone]
    n_atoms = [len(atoms) for atoms in structures]
    for name, order in (("batched", list(range(len(structures)))), ("batched in reverse", list(range(len(structures)))[::-1])):
        together = predict_structures(model, [structures[i] for i in order], level)
        for position, index in enumerate(order):
            what = f"structure {index} ({structures[index].get_chemical_formula()}) {name} vs alone"
            _assert_energies_close(together.energy_ev[[position]], expected_energy[[index]], [n_atoms[index]], tolerance, what)
            _assert_close(
                together.forces_ev_per_angstrom[position],
                expected_forces[index],
                tolerance.forces_ev_per_angstrom,
                f"{what}: forces",
                "eV/Angstrom",
            )


def check_periodic_images(
    model: Potential, atoms: Atoms, level: str | None = None, seed: int = 0, tolerance: Tolerance | None = None
) -> None:
    """A periodic structure is the same after moving it, or any atom, by lattice vectors, after an
    arbitrary translation followed by wrapping into the cell, and a 2x supercell has twice the
    energy and the same forces on every image."""
    if not atoms.pbc.any():
        raise ValueError(f"{atoms.get_chemical_formula()} is not periodic")
    tolerance = tolerance or default_tolerance(model)
    _, _, cell_shift = structure_pairs(atoms.positions, model.config.cutoff_angstrom, np.asarray(atoms.cell[:]), atoms.pbc)
    assert cell_shift.any(), (
        f"{atoms.get_chemical_formula()}: no neighbour pair crosses the cell boundary within the cutoff; "
        "the periodic checks would prove nothing"
    )
    generator = np.random.default_rng(seed)
    lattice = np.asarray(atoms.cell[:])
    periodic = atoms.pbc.astype(np.int64)
    original = predict_structures(model, [atoms], level)

    whole = atoms.copy()
    whole.positions += (generator.integers(-2, 3, size=3) * periodic) @ lattice
    images = atoms.copy()
    images.positions += (generator.integers(-2, 3, size=(len(atoms), 3)) * periodic) @ lattice
    translated = atoms.copy()
    translated.positions += generator.uniform(-10.0, 10.0, size=3)
    wrapped = translated.copy()
    wrapped.wrap()
    for name, variant in (
        ("moved by a lattice vector", whole),
        ("each atom moved by its own lattice vector", images),
        ("translated", translated),
        ("translated and wrapped into the cell", wrapped),
    ):
        result = predict_structures(model, [variant], level)
        what = f"{atoms.get_chemical_formula()} {name}"
        _assert_energies_close(result.energy_ev, original.energy_ev, [len(atoms)], tolerance, what)
        _assert_close(
            result.forces_ev_per_angstrom[0],
            original.forces_ev_per_angstrom[0],
            tolerance.forces_ev_per_angstrom,
            f"{what}: forces",
            "eV/Angstrom",
        )

    repeats = np.ones(3, dtype=np.int64)
    repeats[int(np.flatnonzero(atoms.pbc)[0])] = 2
    supercell = predict_structures(model, [atoms.repeat(tuple(repeats))], level)
    what = f"{atoms.get_chemical_formula()} as a {'x'.join(map(str, repeats))} supercell"
    _assert_energies_close(supercell.energy_ev, 2.0 * original.energy_ev, [2 * len(atoms)], tolerance, what)
    _assert_close(
        supercell.forces_ev_per_angstrom[0],
        np.tile(original.forces_ev_per_angstrom[0], (2, 1)),
        tolerance.forces_ev_per_angstrom,
        f"{what}: forces on the images",
        "eV/Angstrom",
    )


def check_all_contracts(
    model: Potential, molecules: Sequence[Atoms], periodic: Atoms | None = None, level: str | None = None, seed: int = 0
) -> None:
    """Every contract: symmetries and finite differences on each structure, batch independence on all."""
    structures = list(molecules) + ([periodic] if periodic is not None else [])
    for atoms in structures:
        check_rotation_translation(model, atoms, level, seed=seed)
        check_permutation(model, atoms, level, seed=seed)
        check_forces_finite_difference(model, atoms, level)
    if len(structures) > 1:
        check_batch_independence(model, structures, level)
    if periodic is not None:
        check_periodic_images(model, periodic, level, seed=seed)


def random_rotation(generator: np.random.Generator) -> np.ndarray:
    """A uniformly distributed proper rotation matrix (3, 3), det = +1."""
    q, r = np.linalg.qr(generator.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _assert_energies_close(
    actual_ev: np.ndarray, expected_ev: np.ndarray, n_atoms: Sequence[int], tolerance: Tolerance, what: str
) -> None:
    """Energies per structure, the tolerance scaled by each structure's atom count."""
    deviation = np.abs(np.asarray(actual_ev) - np.asarray(expected_ev))
    limit = tolerance.energy_per_atom_ev * np.asarray(n_atoms, dtype=np.float64)
    if not np.all(deviation <= limit):
        raise AssertionError(
            f"{what}: energy changed by {np.max(deviation):.3g} eV (tolerance {np.max(limit):.3g} eV): "
            f"{np.asarray(actual_ev).tolist()} vs {np.asarray(expected_ev).tolist()}"
        )


def _assert_close(actual: np.ndarray, expected: np.ndarray, tolerance: float, what: str, unit: str) -> None:
    """Elementwise |actual - expected| <= tolerance; the message names the worst entry (NaN fails)."""
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {actual.shape} differs from {expected.shape}")
    deviation = np.abs(actual - expected)
    if not np.all(deviation <= tolerance):
        worst = np.unravel_index(int(np.argmax(np.where(np.isnan(deviation), np.inf, deviation))), deviation.shape)
        raise AssertionError(
            f"{what}: largest deviation {deviation[worst]:.3g} {unit} at {tuple(int(i) for i in worst)} "
            f"(got {actual[worst]:.6g}, expected {expected[worst]:.6g}; tolerance {tolerance:.3g} {unit})"
        )

"""metamlip's HIP-NN equals LANL hippynn's `Hipnn` + `HEnergy` for the same weights.

Both models get the same real MD17 ethanol structures in float64: metamlip through its own
batcher (padded neighbour matrix from vesin), hippynn through a flat pair list computed here
with plain numpy. Energies and forces (autograd of each model's energy with respect to the
positions) must agree to ~1e-10 relative. hippynn is a test-only dependency.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

hippynn = pytest.importorskip("hippynn")
from hippynn import custom_kernels  # noqa: E402
from hippynn.layers.targets import HEnergy  # noqa: E402
from hippynn.networks.hipnn import Hipnn  # noqa: E402

from metamlip.data.batching import StructureBatcher  # noqa: E402
from metamlip.data.level_dataset import LevelDataset  # noqa: E402
from metamlip.data.references import EnergyReference  # noqa: E402
from metamlip.model.hipnn import HipnnConfig  # noqa: E402
from metamlip.model.potential import SHARED_HEAD, Potential, build_potential  # noqa: E402
from metamlip.readers import read_level  # noqa: E402

ETHANOL = Path(__file__).parent / "data" / "md17_ethanol_dft.npz"
N_STRUCTURES = 12
RELATIVE_TOLERANCE = 1e-10

CONFIGS = {
    # The shipped default shape: every ethanol pair lies inside the 6.5 Angstrom cutoff.
    "default": HipnnConfig(n_features=16, n_sensitivities=8, n_interaction_layers=2, n_atom_layers=2),
    # A short cutoff, so that the cosine cutoff, pair selection and neighbour padding all matter.
    "short_cutoff": HipnnConfig(
        n_features=12, n_sensitivities=6, n_interaction_layers=3, n_atom_layers=1,
        soft_min_angstrom=0.85, soft_max_angstrom=2.0, cutoff_angstrom=2.2,
    ),
}


@pytest.fixture
def pure_pytorch_hippynn() -> Iterator[None]:
    """hippynn's plain pytorch kernels (no torch.compile, no numba) and no low-distance warnings."""
    kernels_before = custom_kernels.CUSTOM_KERNELS_ACTIVE
    warn_before = hippynn.settings.WARN_LOW_DISTANCES
    with warnings.catch_warnings():  # "_pytorch_raw" is hippynn's uncompiled kernel, named non-standard
        warnings.simplefilter("ignore")
        custom_kernels.set_custom_kernels("_pytorch_raw")
    hippynn.settings.WARN_LOW_DISTANCES = False
    try:
        yield
    finally:
        hippynn.settings.WARN_LOW_DISTANCES = warn_before
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            custom_kernels.set_custom_kernels(kernels_before)


@pytest.fixture(scope="module")
def ethanol() -> LevelDataset:
    """The first structures of MD17 ethanol, in eV and Angstrom."""
    full = read_level(ETHANOL, energy_unit="kcal/mol", level="pbe+vdw-ts")
    n_atoms = full.n_atoms[:N_STRUCTURES]
    n_total = int(n_atoms.sum())
    return LevelDataset(
        level=full.level,
        atomic_numbers=full.atomic_numbers[:n_total],
        positions_angstrom=full.positions_angstrom[:n_total],
        energies_ev=full.energies_ev[:N_STRUCTURES],
        n_atoms=n_atoms,
        forces_ev_per_angstrom=full.forces_ev_per_angstrom[:n_total],
    )


def random_metamlip_model(species: list[int], config: HipnnConfig) -> Potential:
    """A float64 metamlip potential with every parameter moved off its initial value
    (the one-hot read-out starts at zero and the sensitivities on a regular grid)."""
    model = build_potential(species, config, seed=7, dtype=torch.float64)
    model.add_level(EnergyReference("pbe+vdw-ts", species, np.zeros(len(species))), SHARED_HEAD)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            if name.endswith(("sensitivity.mu", "sensitivity.sigma")):
                parameter.mul_(1.0 + 0.05 * noise)
            else:
                parameter.add_(0.1 * noise)
    return model


def hippynn_copy(model: Potential) -> tuple[Hipnn, HEnergy]:
    """hippynn's Hipnn + HEnergy of the same shape, loaded with `model`'s weights name for name."""
    config = model.config
    network = Hipnn(
        config.n_features, config.n_sensitivities, config.soft_min_angstrom, config.soft_max_angstrom,
        config.cutoff_angstrom, config.n_atom_layers, config.n_interaction_layers,
        possible_species=[0, *model.species],
    ).double()
    head = HEnergy(network.feature_sizes).double()
    backbone_state = model.backbone.state_dict()
    head_state = model.heads[SHARED_HEAD].state_dict()
    assert set(backbone_state) == set(network.state_dict())
    assert set(head_state) == set(head.state_dict())
    network.load_state_dict(backbone_state, strict=True)
    head.load_state_dict(head_state, strict=True)
    return network, head


def numpy_pairs(positions: np.ndarray, n_atoms: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (i, j), i != j, of the same structure closer than `cutoff` (batch-wide indices)."""
    structure = np.repeat(np.arange(len(n_atoms)), n_atoms)
    first, second = np.nonzero(structure[:, None] == structure[None, :])
    distance = np.linalg.norm(positions[second] - positions[first], axis=1)
    keep = (first != second) & (distance < cutoff)
    return first[keep], second[keep]


def hippynn_energies_forces(
    network: Hipnn, head: HEnergy, dataset: LevelDataset, species: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_structures,) energies and (n_atoms, 3) forces from hippynn, pair distances from positions."""
    positions = torch.tensor(dataset.positions_angstrom, dtype=torch.float64, requires_grad=True)
    first, second = numpy_pairs(dataset.positions_angstrom, dataset.n_atoms, network.dist_hard_max)
    pair_first = torch.from_numpy(first)
    pair_second = torch.from_numpy(second)
    pair_dist = torch.linalg.vector_norm(positions[pair_second] - positions[pair_first], dim=1)
    species_index = torch.as_tensor(np.searchsorted(species, dataset.atomic_numbers))
    one_hot = torch.nn.functional.one_hot(species_index, len(species)).to(torch.float64)
    mol_index = torch.from_numpy(np.repeat(np.arange(len(dataset)), dataset.n_atoms))
    features = network(one_hot, pair_first, pair_second, pair_dist)
    energy = head(features, mol_index, len(dataset))[0].squeeze(1)
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    return energy.detach(), -gradient


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= RELATIVE_TOLERANCE * scale, f"{what}: max error {error:.3e} for scale {scale:.3e}"


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_energies_and_forces_match_hippynn(config_name: str, ethanol: LevelDataset, pure_pytorch_hippynn: None) -> None:
    config = CONFIGS[config_name]
    species = sorted(set(int(z) for z in ethanol.atomic_numbers))
    model = random_metamlip_model(species, config)
    network, head = hippynn_copy(model)

    batcher = StructureBatcher(ethanol, species, config.cutoff_angstrom, dtype=torch.float64)
    batch = batcher.batch(np.arange(len(ethanol)))
    if config_name == "short_cutoff":
        assert not bool(batch.neighbour_mask.all()), "the short cutoff should drop some pairs"
    prediction = model(batch)
    expected_energy, expected_forces = hippynn_energies_forces(network, head, ethanol, species)

    assert prediction.residual_energy_ev.dtype == torch.float64
    assert float(expected_forces.abs().max()) > 1e-3, "forces should not vanish"
    assert_relative_close(prediction.residual_energy_ev.detach(), expected_energy, "energies")
    assert_relative_close(prediction.forces_ev_per_angstrom.detach(), expected_forces, "forces")

"""HIP-NN backbone (Lubbers, Smith, Barros, J. Chem. Phys. 148, 241715 (2018)).

One-hot species features pass through interaction blocks. Each block is an
interaction layer, which mixes neighbour features weighted by learned
inverse-distance sensitivities s_nu(r) times a cosine cutoff, followed by atom
layers; every layer is residual (x + W2 softplus(layer(x))). The backbone returns
the features of every block, the input of the hierarchical energy head.

Parameter names and layouts follow LANL hippynn's `Hipnn` so that weights map one
to one (see tests/test_hipnn_equivalence.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from metamlip.model.backbone import Backbone
from metamlip.model.new_species import SpeciesBlock


# The Gaussians' exponent is floored at -50 (a sensitivity >= 2e-22 before the cutoff factor):
# exp() underflowing float32 to subnormals or zero takes a slow path, ~10x slower, and so do the
# products of subnormals downstream. The change to any energy or force is far below rounding.
GAUSSIAN_EXPONENT_FLOOR = -50.0


@dataclass(frozen=True)
class HipnnConfig:
    """Shape of a HIP-NN backbone. Distances in Angstrom."""

    n_features: int = 64
    n_sensitivities: int = 20
    n_interaction_layers: int = 2
    n_atom_layers: int = 3
    soft_min_angstrom: float = 0.75
    soft_max_angstrom: float = 5.5
    cutoff_angstrom: float = 6.5
    n_level_features: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> HipnnConfig:
        """The shape from a checkpoint's plain data (`to_dict`)."""
        return cls(**values)


class InverseSensitivity(nn.Module):
    """s_nu(r) = exp(-(1/r - 1/mu_nu)^2 sigma_nu^2 / 2) * cos^2(pi r / (2 r_cut)) for r <= r_cut."""

    def __init__(self, n_sensitivities: int, soft_min_angstrom: float, soft_max_angstrom: float, cutoff_angstrom: float):
        super().__init__()
        inverse_centres = torch.linspace(1.0 / soft_max_angstrom, 1.0 / soft_min_angstrom, n_sensitivities)
        self.mu = nn.Parameter((1.0 / inverse_centres).unsqueeze(0))
        self.sigma = nn.Parameter(torch.full((1, n_sensitivities), soft_min_angstrom * 2.0 * n_sensitivities))
        self.cutoff_angstrom = cutoff_angstrom

    def forward(self, distance_angstrom: torch.Tensor) -> torch.Tensor:
        """(...,) distances -> (..., n_sensitivities) sensitivities; zero beyond the cutoff."""
        inverse_distance = distance_angstrom.unsqueeze(-1).reciprocal()
        exponent = -0.5 * torch.square((inverse_distance - self.mu.reciprocal()) * self.sigma)
        gaussian = torch.exp(exponent.clamp_min(GAUSSIAN_EXPONENT_FLOOR))
        cosine = torch.cos((0.5 * math.pi / self.cutoff_angstrom) * distance_angstrom)
        cutoff = torch.square(cosine) * (distance_angstrom <= self.cutoff_angstrom).to(cosine.dtype)
        return gaussian * cutoff.unsqueeze(-1)


class Interaction(nn.Module):
    """z_i' = sum_nu V_nu sum_{j in N(i)} s_nu(r_ij) z_j + W z_i + b."""

    def __init__(self, n_in: int, n_out: int, n_sensitivities: int, soft_min: float, soft_max: float, cutoff: float):
        super().__init__()
        self.n_in = n_in
        self.n_sensitivities = n_sensitivities
        self.sensitivity = InverseSensitivity(n_sensitivities, soft_min, soft_max, cutoff)
        self.int_weights = nn.Parameter(torch.empty(n_sensitivities, n_out, n_in))
        nn.init.xavier_normal_(self.int_weights)
        self.selfint = nn.Linear(n_in, n_out)
        nn.init.xavier_normal_(self.selfint.weight)

    def forward(self, features: torch.Tensor, neighbour_index: torch.Tensor, distance_angstrom: torch.Tensor) -> torch.Tensor:
        """Features (n_atoms, n_in), padded neighbours (n_atoms, k) and their distances (n_atoms, k);
        padded slots must carry a distance beyond the cutoff."""
        n_atoms = features.shape[0]
        sensitivities = self.sensitivity(distance_angstrom)
        neighbour_features = features.index_select(0, neighbour_index.reshape(-1)).view(*neighbour_index.shape, features.shape[1])
        environment = sensitivities.transpose(1, 2) @ neighbour_features
        weights = self.int_weights.permute(0, 2, 1).reshape(self.n_sensitivities * self.n_in, -1)
        return environment.reshape(n_atoms, self.n_sensitivities * self.n_in) @ weights + self.selfint(features)


class Residual(nn.Module):
    """x -> A x + W2 softplus(layer(x)), A the identity when sizes match."""

    def __init__(self, base_layer: nn.Module, n_in: int, n_middle: int, n_out: int):
        super().__init__()
        self.base_layer = base_layer
        self.res_layer = nn.Linear(n_middle, n_out)
        self.adjust_layer = nn.Linear(n_in, n_out, bias=False) if n_in != n_out else None

    def forward(self, features: torch.Tensor, *neighbour_inputs: torch.Tensor) -> torch.Tensor:
        middle = nn.functional.softplus(self.base_layer(features, *neighbour_inputs))
        skip = features if self.adjust_layer is None else self.adjust_layer(features)
        return skip + self.res_layer(middle)


class HipnnBackbone(Backbone):
    """Species one-hot (optionally followed by a per-level vector of `n_level_features`, the
    level embedding) + interaction blocks; returns the features of every block."""

    def __init__(self, n_species: int, config: HipnnConfig):
        super().__init__()
        self.config = config
        self.n_species = n_species
        width = config.n_features
        self.feature_sizes = [n_species + config.n_level_features] + [width] * config.n_interaction_layers
        self.blocks = nn.ModuleList()
        for n_in in self.feature_sizes[:-1]:
            interaction = Interaction(
                n_in, width, config.n_sensitivities, config.soft_min_angstrom, config.soft_max_angstrom, config.cutoff_angstrom
            )
            block = nn.ModuleList([Residual(interaction, n_in, width, width)])
            for _ in range(config.n_atom_layers):
                atom_layer = nn.Linear(width, width)
                nn.init.xavier_normal_(atom_layer.weight)
                block.append(Residual(atom_layer, width, width, width))
            self.blocks.append(block)

    def input_features(self, species_index: torch.Tensor, level_features: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """(n_atoms, n_species [+ n_level_features]) one-hot species, then the level embedding."""
        features = nn.functional.one_hot(species_index, self.n_species).to(dtype)
        if self.config.n_level_features:
            features = torch.cat([features, level_features.to(dtype).expand(features.shape[0], -1)], dim=1)
        return features

    def forward(
        self,
        species_index: torch.Tensor,
        neighbour_index: torch.Tensor,
        neighbour_mask: torch.Tensor,
        neighbour_vector_angstrom: torch.Tensor,
        level_features: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Features per block: [(n_atoms, n_species [+ n_level_features]) input, (n_atoms, n_features), ...]
        (arguments: `Backbone.forward`). Only distances enter; padded slots lie beyond the cutoff,
        where every sensitivity is zero, so the mask is not needed."""
        distance_angstrom = torch.linalg.vector_norm(neighbour_vector_angstrom, dim=-1)
        features = self.input_features(species_index, level_features, distance_angstrom.dtype)
        all_features = [features]
        for block in self.blocks:
            features = block[0](features, neighbour_index, distance_angstrom)
            for atom_layer in block[1:]:
                features = atom_layer(features)
            all_features.append(features)
        return all_features

    def species_weights(self) -> dict[str, list[SpeciesBlock]]:
        """The weights over the input (one-hot species, then level embedding): the first block's
        interaction, self-interaction and skip projection, by state-dict name (`metamlip.model.new_species`)."""
        input_axes = {"base_layer.int_weights": 2, "base_layer.selfint.weight": 1, "adjust_layer.weight": 1}
        state = self.blocks[0][0].state_dict()
        return {f"blocks.0.0.{name}": [SpeciesBlock(0, tuple(state[name].shape), axis)] for name, axis in input_axes.items() if name in state}

"""The backbone interface: what a network must give the energy heads.

A backbone maps the atoms of a batch to per-atom invariant features, one tensor per block; the
hierarchical energy head reads each block out linearly. Per-level references, level embeddings,
heads, forces and stress (autograd through the neighbour displacements) live in `Potential`,
which does not know which backbone runs. Two backbones exist: HIP-NN (`metamlip.model.hipnn`)
and MACE (`metamlip.model.mace`, needs the optional mace-torch package); `backbone_choice`
builds one by name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Backbone(nn.Module):
    """Species, neighbours and their displacements -> per-atom invariant features per block.

    Attributes:
        config: the backbone's shape (plain data, stored in checkpoints); has `cutoff_angstrom`
            and `n_level_features`.
        feature_sizes: width of each block's features; the first block is the input one-hot
            species (followed by the level embedding), read out as per-element energies.
    """

    config: Any  # HipnnConfig or MaceConfig
    feature_sizes: list[int]

    def forward(
        self,
        species_index: torch.Tensor,
        neighbour_index: torch.Tensor,
        neighbour_mask: torch.Tensor,
        neighbour_vector_angstrom: torch.Tensor,
        level_features: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Features per block, [(n_atoms, feature_sizes[0]), (n_atoms, feature_sizes[1]), ...].

        Args:
            species_index: (n_atoms,) int64 position of each atom's element in the species list.
            neighbour_index: (n_atoms, k) int64 neighbour j of atom i; padded slots point at i.
            neighbour_mask: (n_atoms, k) bool, False on padded slots.
            neighbour_vector_angstrom: (n_atoms, k, 3) r_j + shift - r_i; padded slots hold a
                vector of length twice the cutoff (so a distance-only backbone may ignore the mask).
            level_features: (n_level_features,) the level embedding, or None without one.
        """
        raise NotImplementedError

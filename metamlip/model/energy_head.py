"""Hierarchical energy head: E = sum_atoms sum_blocks w_l . z_l, one linear read-out per block."""

from __future__ import annotations

import torch
from torch import nn


class HierarchicalEnergyHead(nn.Module):
    """Sums a linear read-out of every block's features over the atoms of each structure.

    The read-out of the one-hot input block has no bias (it is a per-element energy);
    it starts at zero because per-level references carry those offsets.
    """

    def __init__(self, feature_sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(size, 1, bias=index > 0) for index, size in enumerate(feature_sizes))
        nn.init.zeros_(self.layers[0].weight)

    def forward(self, all_features: list[torch.Tensor], structure_index: torch.Tensor, n_structures: int) -> torch.Tensor:
        """(n_structures,) energies in eV from per-block features (n_atoms, n_l)."""
        return structure_sums(self.atom_energies(all_features), structure_index, n_structures)

    def atom_energies(self, all_features: list[torch.Tensor]) -> torch.Tensor:
        """(n_atoms,) each atom's contribution in eV; `forward` sums them per structure."""
        return sum(layer(features) for layer, features in zip(self.layers, all_features)).squeeze(1)


def structure_sums(atom_values: torch.Tensor, structure_index: torch.Tensor, n_structures: int) -> torch.Tensor:
    """(n_structures,) sum of per-atom values (n_atoms,) over the atoms of each structure."""
    return atom_values.new_zeros(n_structures).index_add(0, structure_index, atom_values)

"""Elements a pre-trained model has not seen: the fine-tuning check, and growing a model's species.

A potential knows a sorted list of species; everything indexed by species position grows with it:
the backbone's weights over its input attributes (one-hot species, then the level embedding),
each head's per-element read-out of that input and every level's reference. Each backbone names
those weights (`species_weights`, a list of `SpeciesBlock` per state-dict entry); the new
elements' entries come from a freshly initialised backbone (seeded), the old entries are copied to
their new positions, so the old elements' predictions do not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from ase.data import chemical_symbols
from torch import nn

from metamlip.data.references import EnergyReference
from metamlip.errors import InputError

if TYPE_CHECKING:
    from metamlip.data.lazy_batching import LevelData
    from metamlip.model.backbone import Backbone
    from metamlip.model.potential import Potential

NEW_ELEMENT_MODES = ("error", "add")


@dataclass(frozen=True)
class SpeciesBlock:
    """A piece of a weight tensor with one axis over the input attributes (species one-hot, then
    level embedding): entries `offset` ... `offset` + prod(`shape`) of the flattened tensor, viewed
    as `shape`.

    Attributes:
        offset: start of the piece in the flattened tensor.
        shape: the piece's shape.
        axis: the axis of `shape` over the input attributes.
        fan_in_scaled: the module divides the piece's output by sqrt(a fan-in proportional to the
            number of attributes) (e3nn's path normalisation); old values are rescaled to keep it.
    """

    offset: int
    shape: tuple[int, ...]
    axis: int
    fan_in_scaled: bool = False


def element_names(elements: list[int]) -> str:
    """'element S (Z=16)', 'elements S (Z=16), Cl (Z=17)'."""
    names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in elements)
    return f"element {names}" if len(elements) == 1 else f"elements {names}"


def elements_to_add(species: list[int], datasets: list[LevelData], train: LevelData, mode: str) -> list[int]:
    """The elements of `datasets` missing from `species`, sorted. With `mode` error, none may be
    missing (InputError naming them by symbol); with `mode` add, each must occur in `train`,
    where its new weights are learnt."""
    if mode not in NEW_ELEMENT_MODES:
        raise InputError(f"new_elements must be one of {list(NEW_ELEMENT_MODES)}, got {mode!r}")
    missing = sorted({z for dataset in datasets for z in dataset.elements} - set(species))
    if not missing:
        return []
    if mode == "error":
        one = len(missing) == 1
        raise InputError(
            f"{element_names(missing)} in {holding(datasets, missing)} {'is' if one else 'are'} unknown to the pre-trained model (elements "
            f"{', '.join(chemical_symbols[z] for z in species)}); set new_elements: add (in Python: "
            f"FinetuneOptions(new_elements='add')) to add {'it' if one else 'them'} with freshly initialised weights"
        )
    untrained = sorted(set(missing) - set(train.elements))
    if untrained:
        one = len(untrained) == 1
        raise InputError(
            f"{element_names(untrained)} in {holding(datasets, untrained)} {'occurs' if one else 'occur'} in none of the {len(train)} fine-tuning "
            f"training structures, so new_elements: add cannot learn {'its' if one else 'their'} weights; put structures "
            f"with {'it' if one else 'them'} into the training set (a larger n_finetune or another split_seed)"
        )
    return missing


def holding(datasets: list[LevelData], elements: list[int]) -> str:
    """The source of the first of `datasets` that holds one of `elements`."""
    dataset = next(dataset for dataset in datasets if set(dataset.elements) & set(elements))
    return dataset.source or dataset.level


def add_species(model: Potential, elements: list[int], seed: int = 0) -> None:
    """Grow `model` in place to know `elements` (atomic numbers) too. The species list stays sorted;
    the backbone's input weights get a freshly initialised backbone's entries for the new elements
    (seeded by `seed`: the same on every rank), each head's per-element read-out 0 (as a new head's)
    and every level's reference 0 eV. The old elements' energies and forces do not change (MACE's
    e3nn blocks divide by a fan-in that counts the species: their old weights are rescaled to match,
    so the same to rounding)."""
    new = sorted({int(z) for z in elements} - set(model.species))
    if not new:
        return
    species = sorted(model.species + new)
    positions = [species.index(z) for z in model.species]
    n_attributes = len(species) + model.config.n_level_features
    attribute_positions = positions + list(range(len(species), n_attributes))  # the level embedding follows the species
    model.backbone = grown_backbone(model.backbone, len(species), attribute_positions, seed)
    for head in model.heads.values():
        head.layers[0] = grown_readout(head.layers[0], n_attributes, attribute_positions)
    for level, reference in model.references.items():
        energies = np.zeros(len(species))
        energies[positions] = reference.energy_per_element_ev
        model.references[level] = EnergyReference(level, species, energies)
    model.species = species


def grown_backbone(backbone: Backbone, n_species: int, attribute_positions: list[int], seed: int) -> Backbone:
    """A backbone of the same shape for `n_species` elements: the weights over the input attributes
    hold the old ones at `attribute_positions`, the fresh ones elsewhere; every other weight is the old one."""
    parameter = next(backbone.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(backbone)(n_species, backbone.config).to(parameter.device, parameter.dtype)
    old_state, fresh_state = backbone.state_dict(), fresh.state_dict()
    old_layout, fresh_layout = backbone.species_weights(), fresh.species_weights()
    changed = sorted(set(old_state) ^ set(fresh_state)) + sorted(set(old_layout) ^ set(fresh_layout))
    if changed:
        raise InputError(
            f"cannot add elements to this {type(backbone).__name__}: with {n_species} species it has other weights ({changed}); train a new model"
        )
    state = {}
    for name, tensor in fresh_state.items():
        if name in fresh_layout:
            state[name] = grown_tensor(old_state[name], tensor, old_layout[name], fresh_layout[name], attribute_positions)
        elif tensor.shape == old_state[name].shape:
            state[name] = old_state[name]
        else:
            raise RuntimeError(f"{type(backbone).__name__}.species_weights misses {name}, whose shape depends on the species")
    fresh.load_state_dict(state)
    return fresh.train(backbone.training)


def grown_readout(layer: nn.Linear, n_attributes: int, attribute_positions: list[int]) -> nn.Linear:
    """A head's bias-free read-out of the input attributes, widened to `n_attributes`: the old
    weights at `attribute_positions`, 0 for the new elements."""
    grown = nn.Linear(n_attributes, 1, bias=False).to(layer.weight.device, layer.weight.dtype)
    with torch.no_grad():
        grown.weight.zero_().index_copy_(1, torch.as_tensor(attribute_positions, device=grown.weight.device), layer.weight)
    return grown


def grown_tensor(
    old: torch.Tensor, fresh: torch.Tensor, old_blocks: list[SpeciesBlock], fresh_blocks: list[SpeciesBlock], positions: list[int]
) -> torch.Tensor:
    """`fresh` with every old block's entries placed at `positions` along the block's attribute axis
    (times sqrt(new / old number of attributes) for a fan-in-scaled block)."""
    for blocks, tensor in ((old_blocks, old), (fresh_blocks, fresh)):
        if sum(math.prod(block.shape) for block in blocks) != tensor.numel():
            raise RuntimeError(f"species blocks of {sum(math.prod(b.shape) for b in blocks)} entries for a tensor of {tensor.numel()}")
    flat = fresh.detach().clone().reshape(-1)
    old_flat = old.detach().reshape(-1)
    for old_block, fresh_block in zip(old_blocks, fresh_blocks, strict=True):
        # the species come first: a block over the species alone (no level embedding) takes their positions only
        index = torch.as_tensor(positions[: old_block.shape[old_block.axis]], device=flat.device)
        piece = old_flat[old_block.offset : old_block.offset + math.prod(old_block.shape)].reshape(old_block.shape)
        if old_block.fan_in_scaled:
            ratio = fresh_block.shape[fresh_block.axis] / old_block.shape[old_block.axis]
            piece = (piece.double() * math.sqrt(ratio)).to(piece.dtype)
        target = flat[fresh_block.offset : fresh_block.offset + math.prod(fresh_block.shape)].view(fresh_block.shape)
        target.index_copy_(fresh_block.axis, index, piece)
    return flat.view(fresh.shape)

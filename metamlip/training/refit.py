"""Refitting a level's linear energy reference after training.

The network's energy offset is set only by the (small) energy term of the loss, and Adam moves
offset-like weights by about one learning rate per step whatever their gradient, so after
training the total energy carries a small constant error that force training cannot see.
Refitting e_Z by least squares on E_label - E_network over the training structures removes it
exactly; nothing but training data is used.
"""

from __future__ import annotations

import numpy as np
import torch

from metamlip.data.batching import Batcher
from metamlip.data.references import EnergyReference
from metamlip.model.potential import Potential


def refit_reference(model: Potential, train: Batcher, level: str) -> EnergyReference:
    """Replace `level`'s reference in `model` by the least-squares fit of the labels minus the
    network's residual energies on the `train` structures; returns the new reference. The first fit
    on the same compositions has already warned if they leave the reference undetermined."""
    dataset = train.dataset
    counts = dataset.composition_matrix(model.species)
    reference = EnergyReference.from_counts(
        level, model.species, counts, dataset.energies_ev - network_energies_ev(model, train, level), warn_undetermined=False
    )
    model.add_level(reference, model.level_heads[level])
    return reference


def network_energies_ev(model: Potential, batcher: Batcher, level: str, batch_size: int = 64) -> np.ndarray:
    """(n_structures,) float64 residual energies (the network's part, no reference) of the
    batcher's structures in dataset order; energies only, one batch in memory at a time."""
    model.eval()
    with torch.no_grad():
        parts = [model(batch, level=level, forces=False).residual_energy_ev.double().cpu().numpy() for batch in batcher.batches(batch_size)]
    return np.concatenate(parts) if parts else np.zeros(0)

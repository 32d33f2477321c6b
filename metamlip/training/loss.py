"""Training loss: weighted per-atom energy MSE + force MSE, per level of theory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metamlip.data.batching import Batch
from metamlip.model.potential import Potential


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms.

    Attributes:
        energy: weight of the mean squared per-atom energy error, (eV/atom)^2.
        forces: weight of the mean squared force-component error, (eV/Angstrom)^2;
            ignored for energy-only levels.
    """

    energy: float = 1.0
    forces: float = 1.0


@dataclass
class BatchLoss:
    """Loss of one batch with its parts (detached floats for logging)."""

    total: torch.Tensor
    energy_mse_per_atom_ev2: float
    force_mse_ev2_per_angstrom2: float | None


def batch_loss(model: Potential, batch: Batch, weights: LossWeights, create_graph: bool = True) -> BatchLoss:
    """Loss of `model` on `batch` at the batch's level; differentiable when `create_graph`."""
    batch = batch.to(next(model.parameters()).device)
    use_forces = batch.forces_ev_per_angstrom is not None and weights.forces > 0
    prediction = model(batch, forces=use_forces, create_graph=create_graph)
    target_residual = (batch.energies_ev - prediction.reference_energy_ev).to(prediction.residual_energy_ev.dtype)
    atoms = batch.n_atoms.to(prediction.residual_energy_ev.dtype)
    energy_mse = torch.mean(torch.square((prediction.residual_energy_ev - target_residual) / atoms))
    total = weights.energy * energy_mse
    force_mse = None
    if use_forces:
        force_error = prediction.forces_ev_per_angstrom - batch.forces_ev_per_angstrom
        force_mse_tensor = torch.mean(torch.square(force_error))
        total = total + weights.forces * force_mse_tensor
        force_mse = float(force_mse_tensor.detach())
    return BatchLoss(total, float(energy_mse.detach()), force_mse)

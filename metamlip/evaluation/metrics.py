"""Error metrics of a potential on a level dataset, in eV and eV/Angstrom."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from metamlip.data.batching import Batcher
from metamlip.model.potential import Potential
from metamlip.units import EV_TO_KCAL_PER_MOL


@dataclass
class Predictions:
    """Labels and predictions of a dataset, as float64 numpy arrays.

    Attributes:
        energies_ev / predicted_energies_ev: (n_structures,) total energies.
        n_atoms: (n_structures,) atoms per structure.
        forces_ev_per_angstrom / predicted_forces_ev_per_angstrom: (n_atoms_total, 3), or None.
    """

    energies_ev: np.ndarray
    predicted_energies_ev: np.ndarray
    n_atoms: np.ndarray
    forces_ev_per_angstrom: np.ndarray | None
    predicted_forces_ev_per_angstrom: np.ndarray | None


@dataclass
class ErrorMetrics:
    """Errors of predicted against labelled values; energies in eV, forces in eV/Angstrom."""

    n_structures: int
    energy_mae_ev: float
    energy_rmse_ev: float
    energy_mae_per_atom_ev: float
    energy_rmse_per_atom_ev: float
    force_mae_ev_per_angstrom: float | None
    force_rmse_ev_per_angstrom: float | None

    def to_dict(self) -> dict:
        return asdict(self)

    def in_kcal_per_mol(self) -> dict:
        """The same metrics in kcal/mol and kcal/mol/Angstrom (keys renamed accordingly)."""
        converted = {"n_structures": self.n_structures}
        for name, value in asdict(self).items():
            if name == "n_structures":
                continue
            new_name = name.replace("_ev_per_angstrom", "_kcal_per_mol_per_angstrom").replace("_ev", "_kcal_per_mol")
            converted[new_name] = None if value is None else value * EV_TO_KCAL_PER_MOL
        return converted


def predict(model: Potential, batcher: Batcher, level: str | None = None, batch_size: int = 64) -> Predictions:
    """Energies and forces of every structure of the batcher's dataset, in dataset order."""
    energies, forces = [], []
    with_forces = batcher.dataset.has_forces
    for batch in batcher.batches(batch_size):
        prediction = model(batch, level=level, forces=True)
        energies.append(prediction.energy_ev.cpu().numpy())
        forces.append(prediction.forces_ev_per_angstrom.detach().double().cpu().numpy())
    data = batcher.dataset
    return Predictions(
        energies_ev=data.energies_ev,
        predicted_energies_ev=np.concatenate(energies) if energies else np.zeros(0),
        n_atoms=data.n_atoms,
        forces_ev_per_angstrom=data.forces_ev_per_angstrom if with_forces else None,
        predicted_forces_ev_per_angstrom=np.concatenate(forces) if with_forces and forces else None,
    )


def error_metrics(predictions: Predictions) -> ErrorMetrics:
    """MAE and RMSE of energies (per structure and per atom) and force components."""
    energy_error = predictions.predicted_energies_ev - predictions.energies_ev
    per_atom_error = energy_error / predictions.n_atoms
    force_mae = force_rmse = None
    if predictions.forces_ev_per_angstrom is not None:
        force_error = predictions.predicted_forces_ev_per_angstrom - predictions.forces_ev_per_angstrom
        force_mae = float(np.mean(np.abs(force_error)))
        force_rmse = float(np.sqrt(np.mean(np.square(force_error))))
    return ErrorMetrics(
        n_structures=len(energy_error),
        energy_mae_ev=float(np.mean(np.abs(energy_error))),
        energy_rmse_ev=float(np.sqrt(np.mean(np.square(energy_error)))),
        energy_mae_per_atom_ev=float(np.mean(np.abs(per_atom_error))),
        energy_rmse_per_atom_ev=float(np.sqrt(np.mean(np.square(per_atom_error)))),
        force_mae_ev_per_angstrom=force_mae,
        force_rmse_ev_per_angstrom=force_rmse,
    )


def evaluate(model: Potential, batcher: Batcher, level: str | None = None) -> ErrorMetrics:
    """Error metrics of `model` on the batcher's dataset (at `level`, default the dataset's)."""
    with torch.inference_mode(False):
        return error_metrics(predict(model, batcher, level))

"""Parity plot: predicted against labelled energies (per atom) and force components."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from metamlip.evaluation.metrics import Predictions, error_metrics


def plot_parity(predictions: Predictions, path: str | Path, title: str = "") -> Path:
    """Write a PNG with one panel for energies per atom (eV/atom) and one for forces (eV/Angstrom)."""
    metrics = error_metrics(predictions)
    panels = [
        (
            predictions.energies_ev / predictions.n_atoms,
            predictions.predicted_energies_ev / predictions.n_atoms,
            "energy per atom (eV/atom)",
            f"MAE {metrics.energy_mae_per_atom_ev * 1e3:.2f} meV/atom",
        )
    ]
    if predictions.forces_ev_per_angstrom is not None:
        panels.append(
            (
                predictions.forces_ev_per_angstrom.ravel(),
                predictions.predicted_forces_ev_per_angstrom.ravel(),
                "force component (eV/Angstrom)",
                f"MAE {metrics.force_mae_ev_per_angstrom * 1e3:.1f} meV/Angstrom",
            )
        )
    figure = Figure(figsize=(4.5 * len(panels), 4.2))
    FigureCanvasAgg(figure)
    for index, (label, predicted, quantity, summary) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        axes.scatter(label, predicted, s=4, alpha=0.5)
        low, high = float(np.min([label.min(), predicted.min()])), float(np.max([label.max(), predicted.max()]))
        axes.plot([low, high], [low, high], color="black", linewidth=0.8)
        axes.set_xlabel(f"reference {quantity}")
        axes.set_ylabel(f"predicted {quantity}")
        axes.set_title(summary, fontsize=10)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path

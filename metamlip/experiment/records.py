"""Per-run records of an experiment and their summary over seeds (the records of results.json)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from metamlip.evaluation.metrics import ErrorMetrics
from metamlip.experiment.scans import ModelScan

ROUGHNESS_FIELDS = ("spurious_extrema", "second_derivative_rms_ev_per_unit2", "energy_rms_ev", "energy_max_ev")


@dataclass
class FinetuneRecord:
    """One fine-tuned model: strategy, N, seed, test metrics, scans, epochs and wall time."""

    strategy: str
    n_finetune: int
    seed: int
    metrics: ErrorMetrics
    scans: dict[str, ModelScan] = field(default_factory=dict)
    epochs: int = 0
    wall_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "n_finetune": self.n_finetune,
            "seed": self.seed,
            "test": self.metrics.to_dict(),
            "scans": {name: scan.roughness.to_dict() for name, scan in self.scans.items()},
            "epochs": self.epochs,
            "wall_seconds": round(self.wall_seconds, 2),
        }


def mean_std(values: list[float | None]) -> dict[str, float] | None:
    """{"mean", "std"} over seeds (population std, 0 for one seed); None when there are no values."""
    present = [value for value in values if value is not None]
    if not present:
        return None
    return {"mean": float(np.mean(present)), "std": float(np.std(present))}


def summarise(records: list[FinetuneRecord]) -> list[dict]:
    """One entry per (strategy, N): error metrics and scan roughness, mean and std over seeds."""
    groups: dict[tuple[str, int], list[FinetuneRecord]] = defaultdict(list)
    for record in records:
        groups[(record.strategy, record.n_finetune)].append(record)
    summary = []
    for (strategy, n_finetune), group in groups.items():
        entry = {
            "strategy": strategy,
            "n_finetune": n_finetune,
            "seeds": len(group),
            "energy_mae_ev": mean_std([r.metrics.energy_mae_ev for r in group]),
            "energy_mae_per_atom_ev": mean_std([r.metrics.energy_mae_per_atom_ev for r in group]),
            "energy_rmse_ev": mean_std([r.metrics.energy_rmse_ev for r in group]),
            "force_mae_ev_per_angstrom": mean_std([r.metrics.force_mae_ev_per_angstrom for r in group]),
        }
        scan_names = sorted({name for record in group for name in record.scans})
        if scan_names:
            entry["scans"] = {
                name: {key: mean_std([getattr(r.scans[name].roughness, key) for r in group]) for key in ROUGHNESS_FIELDS}
                for name in scan_names
            }
        summary.append(entry)
    return summary

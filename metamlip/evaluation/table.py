"""Terminal tables of error metrics."""

from __future__ import annotations

from metamlip.evaluation.metrics import ErrorMetrics


def format_metrics_table(metrics: dict[str, ErrorMetrics], title: str = "", kcal_per_mol: bool = False) -> str:
    """One row per level: structures, energy MAE/RMSE (total and per atom), force MAE/RMSE."""
    energy_unit, force_unit = ("kcal/mol", "kcal/mol/A") if kcal_per_mol else ("meV", "meV/A")
    scale = 1.0 if kcal_per_mol else 1.0e3
    header = (f"{'level':<24} {'n':>6} {'E MAE':>9} {'E RMSE':>9} {'E/atom MAE':>11} {'F MAE':>9} {'F RMSE':>9}")
    units = f"{'':<24} {'':>6} {energy_unit:>9} {energy_unit:>9} {energy_unit:>11} {force_unit:>9} {force_unit:>9}"
    lines = ([title] if title else []) + [header, units]
    for level, metric in metrics.items():
        values = metric.in_kcal_per_mol() if kcal_per_mol else metric.to_dict()
        suffix = "kcal_per_mol" if kcal_per_mol else "ev"
        force_key = "kcal_per_mol_per_angstrom" if kcal_per_mol else "ev_per_angstrom"

        def shown(key: str) -> str:
            value = values[key]
            return f"{'-':>9}" if value is None else f"{value * scale:9.3f}"

        lines.append(
            f"{level:<24} {metric.n_structures:>6} {shown(f'energy_mae_{suffix}')} {shown(f'energy_rmse_{suffix}')} "
            f"{shown(f'energy_mae_per_atom_{suffix}'):>11} {shown(f'force_mae_{force_key}')} {shown(f'force_rmse_{force_key}')}"
        )
    return "\n".join(lines)

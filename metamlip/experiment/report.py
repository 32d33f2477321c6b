"""Experiment outputs for people: a terminal table, learning-curve and scan plots, report.md."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from metamlip.experiment.config import ExperimentConfig
from metamlip.experiment.records import FinetuneRecord
from metamlip.experiment.scans import ScanReference
from metamlip.scans import plot_scans

CURVE_METRICS = (
    ("energy_mae_ev", "energy MAE (meV)", 1e3),
    ("energy_mae_per_atom_ev", "energy MAE (meV/atom)", 1e3),
    ("force_mae_ev_per_angstrom", "force MAE (meV/Angstrom)", 1e3),
)


def format_results_table(results: dict) -> str:
    """Strategy x N table of test errors, mean +- std over seeds (meV, meV/Angstrom)."""
    scan_names = sorted({name for record in results["records"] for name in record.get("scans", {})})
    header = f"{'strategy':<20} {'N':>5} {'seeds':>5} {'E MAE meV':>16} {'E/atom meV':>14} {'F MAE meV/A':>16}"
    header += "".join(f" {name + ' extrema':>18} {name + ' d2 RMS':>20}" for name in scan_names)
    lines = [f"target level {results['target_level']}, test set of {results['n_test']} structures", header]

    def shown(value: dict | None, scale: float, width: int, digits: int = 2) -> str:
        if value is None:
            return f"{'-':>{width}}"
        return f"{value['mean'] * scale:.{digits}f} +- {value['std'] * scale:.{digits}f}".rjust(width)

    for record in sorted(results["records"], key=lambda r: (r["n_finetune"], r["strategy"])):
        line = (f"{record['strategy']:<20} {record['n_finetune']:>5} {record['seeds']:>5} {shown(record['energy_mae_ev'], 1e3, 16)}"
                f" {shown(record['energy_mae_per_atom_ev'], 1e3, 14)} {shown(record['force_mae_ev_per_angstrom'], 1e3, 16)}")
        for name in scan_names:
            scan = record.get("scans", {}).get(name, {})
            line += f" {shown(scan.get('spurious_extrema'), 1, 18, 1)} {shown(scan.get('second_derivative_rms_ev_per_unit2'), 1, 20, 6)}"
        lines.append(line)
    return "\n".join(lines)


def plot_learning_curves(results: dict, path: Path) -> Path:
    """Test error against N on log-log axes, one line per strategy, error bars = std over seeds."""
    metrics = [m for m in CURVE_METRICS if any(r[m[0]] is not None for r in results["records"])]
    figure = Figure(figsize=(4.6 * len(metrics), 4.0))
    FigureCanvasAgg(figure)
    strategies = list(dict.fromkeys(record["strategy"] for record in results["records"]))
    for index, (key, label, scale) in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        for strategy in strategies:
            rows = sorted((r for r in results["records"] if r["strategy"] == strategy and r[key]), key=lambda r: r["n_finetune"])
            sizes = np.array([r["n_finetune"] for r in rows])
            means = np.array([r[key]["mean"] for r in rows]) * scale
            spreads = np.array([r[key]["std"] for r in rows]) * scale
            axes.errorbar(sizes, means, yerr=spreads, marker="o", capsize=3, label=strategy)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("fine-tuning structures N")
        axes.set_ylabel(f"test {label}")
        axes.grid(True, which="both", alpha=0.3)
    figure.axes[0].legend()
    figure.suptitle(f"target level {results['target_level']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def plot_scan_overlays(records: list[FinetuneRecord], references: list[ScanReference], out_dir: Path) -> list[Path]:
    """One PNG per scan: the reference and every strategy at the smallest N (seed 0)."""
    if not records:
        return []
    smallest = min(record.n_finetune for record in records)
    chosen = [record for record in records if record.n_finetune == smallest and record.seed == 0]
    paths = []
    for reference in references:
        scans = {record.strategy: record.scans[reference.name].scan for record in chosen if reference.name in record.scans}
        path = out_dir / f"scan_{reference.name}.png"
        plot_scans(path, scans, reference.reference, title=f"{reference.name}, N = {smallest}")
        paths.append(path)
    return paths


def pretraining_section(results: dict) -> list[str]:
    """Markdown table: each strategy's pre-training steps, wall time, stop reason and validation errors per level."""
    summaries = results.get("pretraining", {})
    levels = sorted({level for summary in summaries.values() for level in summary["validation"]})
    if not levels:
        return []
    lines = [
        "## Pre-training",
        "",
        "Validation energy MAE (meV) / force MAE (meV/Angstrom) per pre-training level at the end of pre-training.",
        "",
        "| strategy | gradient steps | epochs | wall s | stop | " + " | ".join(f"`{level}`" for level in levels) + " |",
        "|---" * (5 + len(levels)) + "|",
    ]
    for name, summary in summaries.items():
        cells = []
        for level in levels:
            errors = summary["validation"].get(level)
            force = errors and errors["force_mae_ev_per_angstrom"]
            cells.append("-" if errors is None else f"{errors['energy_mae_ev'] * 1e3:.1f} / " + ("-" if force is None else f"{force * 1e3:.0f}"))
        lines.append(f"| {name} | {summary['gradient_steps']} | {summary['epochs']} | {summary['wall_seconds']:.0f} | {summary['stop_reason']} | " + " | ".join(cells) + " |")
    return lines + [""]


def format_selection(results: dict) -> str:
    """One line per grid point: strategy, settings, proxy score (meV), the chosen ones marked."""
    lines = [f"proxies: {', '.join(results['proxy_levels'])}"]
    for item in results["scores"]:
        mark = "*" if results["chosen"][item["strategy"]] == item["settings"] else " "
        score = "diverged" if item["score_energy_mae_ev"] is None else f"{item['score_energy_mae_ev'] * 1e3:.2f} meV"
        lines.append(f"{mark} {item['strategy']:<20} {score:>12}  {json.dumps(item['settings'])}")
    return "\n".join(lines)


def selection_section(results: dict) -> list[str]:
    """Markdown: where each strategy's settings came from (`selection_file`) and every proxy score."""
    selection = results.get("selection")
    if not selection:
        return []
    return [
        "## Settings chosen on proxy tasks",
        "",
        f"From `{selection['file']}` (written by `metamlip select`; the target level was never read there). "
        "Score = geometric mean of the proxy test energy MAEs over proxies, N and seeds; * = chosen.",
        "",
        "```",
        format_selection(selection),
        "```",
        "",
    ]


def comparison_section(results: dict) -> list[str]:
    """Markdown: the meta-learning claim at each N, then every pair of strategies (ratio of test
    errors on the same fine-tuning draws, 95% bootstrap interval, verdict)."""
    lines = ["## Paired comparisons", ""]
    lines += [
        "Ratio = mean test error of the first strategy / that of the second over the same fine-tuning draws (seeds); "
        "interval = 95% percentile bootstrap over draws; win = interval below 1, loss = above 1, tie otherwise.",
        "",
    ]
    for check in results.get("claim", []):
        lines.append(
            f"- **Claim at N = {check['n_finetune']} ({check['metric']})**: best meta-learner `{check['meta_learner']}` / best "
            f"baseline `{check['baseline']}` = {check['ratio']:.2f} [{check['low']:.2f}, {check['high']:.2f}] over {check['draws']} draws: "
            + ("holds" if check["holds"] else f"does not hold (needs <= {check['bound']} with the interval below 1)")
        )
    lines += ["", "| metric | N | strategy | against | ratio | 95% interval | verdict |", "|---|---|---|---|---|---|---|"]
    for item in results.get("comparisons", []):
        lines.append(
            f"| {item['metric']} | {item['n_finetune']} | {item['strategy']} | {item['against']} | {item['ratio']:.2f} | "
            f"[{item['low']:.2f}, {item['high']:.2f}] | {item['verdict']} |"
        )
    return lines + [""]


def write_report(config: ExperimentConfig, results: dict, records: list[FinetuneRecord], references: list[ScanReference]) -> Path:
    """Write learning_curve.png, scan overlays and report.md in the output folder; print nothing."""
    out_dir = Path(config.output_dir)
    plot_learning_curves(results, out_dir / "learning_curve.png")
    scan_paths = plot_scan_overlays(records, references, out_dir)
    text = [
        "# metamlip experiment",
        "",
        f"metamlip {results['metamlip_version']}. Target level `{results['target_level']}`; pre-training levels "
        + ", ".join(f"`{level}`" for level in results["pretrain_levels"])
        + f". Test set: {results['n_test']} target structures held out before anything else; no training or "
        "validation ever sees them. Errors are mean +- std over fine-tuning seeds (each seed draws a different "
        "fine-tuning set; every strategy gets the same sets).",
        "",
        "```",
        format_results_table(results),
        "```",
        "",
        "![learning curve](learning_curve.png)",
        "",
    ]
    for path in scan_paths:
        text += [f"![{path.stem}]({path.name})", ""]
    if scan_paths:
        text += [
            "Scan columns: spurious extrema = model extrema beyond the reference's; d2 RMS = RMS difference of "
            "second derivatives (eV/degree^2 for torsions, eV/Angstrom^2 for bonds) on a grid 4x denser than the reference.",
            "",
        ]
    text += selection_section(results) + pretraining_section(results) + comparison_section(results)
    text += ["## Configuration", "", "```json", json.dumps(asdict(config), indent=2), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(text), encoding="utf-8")
    return path

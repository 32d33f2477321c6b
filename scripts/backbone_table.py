"""The strategies x backbones table: one experiment's comparison run on several backbones (the same
config, data, draws and seeds; only `model` differs), read from each run's results.json.

    python scripts/backbone_table.py hipnn=runs/demo_ethanol_hipnn/results.json mace=runs/demo_ethanol_mace/results.json [--n 10]

Prints markdown: per strategy and backbone the test energy and force MAE (mean +- std over the
fine-tuning draws); per strategy the second backbone's error / the first's on the same draws, with a
95% bootstrap interval; and per backbone the gain of pre-training (scratch / strategy) and the
meta-learning claim (best meta-learner / best baseline) as the experiment wrote it. A run of some
strategies only (a rerun of one, say) gets the per-strategy rows it shares with the first run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from metamlip.experiment.statistics import is_baseline, paired_ratio
from metamlip.strategies import META_LEARNERS

METRICS = {"energy_mae_ev": ("E MAE (meV)", 1e3), "force_mae_ev_per_angstrom": ("F MAE (meV/A)", 1e3)}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="BACKBONE=RESULTS_JSON, the first is the reference of the ratios")
    parser.add_argument("--n", type=int, default=None, help="fine-tuning size N (default: the smallest)")
    return parser.parse_args()


def per_seed(runs: list[dict], n_finetune: int, metric: str) -> dict[str, dict[int, float]]:
    """{strategy: {seed: test error}} at one N."""
    table: dict[str, dict[int, float]] = {}
    for run in runs:
        if run["n_finetune"] == n_finetune and run["test"].get(metric) is not None:
            table.setdefault(run["strategy"], {})[run["seed"]] = run["test"][metric]
    return table


def scratch_ratio(table: dict[str, dict[int, float]], strategy: str) -> dict:
    """scratch's error / the strategy's on the draws both have: the gain of its pre-training."""
    seeds = sorted(set(table["scratch"]) & set(table[strategy]))
    return paired_ratio([table["scratch"][s] for s in seeds], [table[strategy][s] for s in seeds])


def ratio_text(ratio: dict) -> str:
    return f"{ratio['ratio']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"


def main() -> None:
    arguments = parse_arguments()
    results = {}
    for item in arguments.runs:
        backbone, _, path = item.partition("=")
        results[backbone] = json.loads(Path(path).read_text())
    backbones = list(results)
    n_finetune = arguments.n or min(run["n_finetune"] for data in results.values() for run in data["runs"])
    first, *others = backbones
    for metric, (label, scale) in METRICS.items():
        tables = {backbone: per_seed(data["runs"], n_finetune, metric) for backbone, data in results.items()}
        strategies = [name for name in tables[first] if all(name in tables[b] for b in others)]
        header = [f"{b} {label}" for b in backbones] + [f"{b} / {first} (same draws)" for b in others]
        print(f"\n### N = {n_finetune}, {label}\n")
        print("| strategy | " + " | ".join(header) + " |")
        print("|---" * (len(header) + 1) + "|")
        for name in sorted(strategies):
            cells = []
            for backbone in backbones:
                values = np.array(list(tables[backbone][name].values())) * scale
                cells.append(f"{values.mean():.1f} +- {values.std():.1f} ({len(values)})")
            for backbone in others:
                seeds = sorted(set(tables[first][name]) & set(tables[backbone][name]))
                ratio = paired_ratio([tables[backbone][name][s] for s in seeds], [tables[first][name][s] for s in seeds])
                cells.append(ratio_text(ratio))
            print(f"| {name} | " + " | ".join(cells) + " |")
        print(f"\nPer backbone, {label}: scratch / best pre-trained strategy; best meta-learner / best baseline (the claim)\n")
        for backbone in backbones:
            table = tables[backbone]
            means = {name: np.mean(list(errors.values())) for name, errors in table.items()}
            if "scratch" not in means or not set(means) & set(META_LEARNERS):
                print(f"- {backbone}: runs {sorted(means)} only, no scratch / strategy or claim to compare")
                continue
            best = min((name for name in means if name != "scratch"), key=means.get)
            best_meta = min((name for name in means if name in META_LEARNERS), key=means.get)
            claim = [c for c in results[backbone]["claim"] if c["n_finetune"] == n_finetune and c["metric"] == metric]
            claim_text = "; ".join(
                f"{c['meta_learner']} / {c['baseline']} = {ratio_text(c)} ({'holds' if c['holds'] else 'does not hold'})" for c in claim
            )
            baselines = sorted((name for name in means if is_baseline(name)), key=means.get)
            print(
                f"- {backbone}: scratch / {best} (best pre-trained) = {ratio_text(scratch_ratio(table, best))}; "
                f"scratch / {best_meta} (best meta-learner) = {ratio_text(scratch_ratio(table, best_meta))}; "
                f"claim: {claim_text}; best baseline {baselines[0]}"
            )


if __name__ == "__main__":
    main()

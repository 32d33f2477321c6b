"""Paired comparisons of strategies: ratios of test errors on the same fine-tuning draws, with
95% bootstrap intervals over the draws, and the verdict win / tie / loss."""

from __future__ import annotations

from itertools import combinations

import numpy as np

from metamlip.experiment.records import FinetuneRecord

BASELINES = ("joint", "multihead", "embedding")
RESAMPLES = 10_000


def paired_ratio(errors: np.ndarray, reference_errors: np.ndarray, seed: int = 0) -> dict:
    """mean(errors) / mean(reference_errors) over paired draws, its 95% percentile-bootstrap interval
    (draws resampled with replacement, pairs kept), and 'win' (interval below 1), 'loss' (above 1) or 'tie'."""
    errors, reference_errors = np.asarray(errors, float), np.asarray(reference_errors, float)
    draws = np.random.default_rng(seed).integers(0, len(errors), size=(RESAMPLES, len(errors)))
    resampled = errors[draws].mean(axis=1) / reference_errors[draws].mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    verdict = "win" if high < 1 else "loss" if low > 1 else "tie"
    return {"ratio": float(errors.mean() / reference_errors.mean()), "low": float(low), "high": float(high), "verdict": verdict, "draws": len(errors)}


def per_seed_errors(records: list[FinetuneRecord], metric: str) -> dict[tuple[str, int], dict[int, float]]:
    """{(strategy, N): {seed: error}} for one metric of `ErrorMetrics` (runs without it left out)."""
    table: dict[tuple[str, int], dict[int, float]] = {}
    for record in records:
        value = getattr(record.metrics, metric)
        if value is not None:
            table.setdefault((record.strategy, record.n_finetune), {})[record.seed] = value
    return table


def pairwise_comparisons(records: list[FinetuneRecord], metric: str = "energy_mae_ev") -> list[dict]:
    """Every pair of strategies at every N, on the seeds both have: A's error / B's error."""
    table = per_seed_errors(records, metric)
    comparisons = []
    for n_finetune in sorted({n for _, n in table}):
        names = [name for name, n in table if n == n_finetune]
        for first, second in combinations(names, 2):
            seeds = sorted(set(table[(first, n_finetune)]) & set(table[(second, n_finetune)]))
            if len(seeds) < 2:
                continue
            a = [table[(first, n_finetune)][seed] for seed in seeds]
            b = [table[(second, n_finetune)][seed] for seed in seeds]
            comparisons.append({"metric": metric, "n_finetune": n_finetune, "strategy": first, "against": second} | paired_ratio(a, b))
    return comparisons


def is_baseline(name: str) -> bool:
    return name in BASELINES or name.startswith("single:")


def claim_check(records: list[FinetuneRecord], meta_learners: tuple[str, ...], metric: str = "energy_mae_ev", bound: float = 0.8) -> list[dict]:
    """At each N: the best meta-learner against the best baseline (joint, multihead, embedding,
    single-level transfer), each the lowest mean error over seeds; the claim holds when the
    ratio is at most `bound` and its bootstrap interval lies below 1."""
    table = per_seed_errors(records, metric)
    checks = []
    for n_finetune in sorted({n for _, n in table}):
        means = {name: np.mean(list(errors.values())) for (name, n), errors in table.items() if n == n_finetune}
        meta = [name for name in means if name in meta_learners]
        baselines = [name for name in means if is_baseline(name)]
        if not meta or not baselines:
            continue
        best_meta, best_baseline = min(meta, key=means.get), min(baselines, key=means.get)
        seeds = sorted(set(table[(best_meta, n_finetune)]) & set(table[(best_baseline, n_finetune)]))
        if len(seeds) < 2:
            continue
        ratio = paired_ratio([table[(best_meta, n_finetune)][s] for s in seeds], [table[(best_baseline, n_finetune)][s] for s in seeds])
        holds = ratio["ratio"] <= bound and ratio["high"] < 1
        checks.append({"metric": metric, "n_finetune": n_finetune, "meta_learner": best_meta, "baseline": best_baseline, "bound": bound, "holds": holds} | ratio)
    return checks

"""`metamlip experiment CONFIG.yaml --out DIR`: compare strategies on one target level."""

from __future__ import annotations

import argparse

from metamlip.config import load_config
from metamlip.experiment.config import ExperimentConfig
from metamlip.experiment.report import format_results_table
from metamlip.experiment.run import run_experiment


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="pre-train, fine-tune and test every strategy side by side")
    parser.add_argument("config", help="YAML config (keys documented in the README)")
    parser.add_argument("--out", help="output folder (overrides output_dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"output_dir={args.out}"] if args.out else [])
    config = load_config(args.config, ExperimentConfig, overrides)
    results = run_experiment(config)
    print(format_results_table(results))
    print(f"results: {config.output_dir}/results.json, report: {config.output_dir}/report.md")
    return 0

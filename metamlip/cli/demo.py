"""`metamlip demo [--out DIR]`: the strategy comparison on the bundled ethanol multi-level dataset
(metamlip/configs/demo_ethanol.yaml: every strategy, settings chosen by `metamlip select`)."""

from __future__ import annotations

import argparse
from importlib.resources import as_file, files

from metamlip.config import load_config
from metamlip.experiment.config import ExperimentConfig
from metamlip.experiment.report import format_results_table
from metamlip.experiment.run import run_experiment

DEMO_CONFIG = "demo_ethanol.yaml"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="compare every strategy on the bundled ethanol data (about 5 minutes on 2 cores)"
    )
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with as_file(files("metamlip").joinpath("configs", DEMO_CONFIG)) as path:
        config = load_config(path, ExperimentConfig, [*args.overrides, f"output_dir={args.out}"])
    print(f"metamlip demo: target {config.target_level}, pre-training on {', '.join(config.pretrain_levels)}")
    results = run_experiment(config)
    print(format_results_table(results))
    print(f"results: {args.out}/results.json, report: {args.out}/report.md, plots: {args.out}/*.png")
    return 0

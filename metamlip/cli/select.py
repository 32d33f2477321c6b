"""`metamlip select CONFIG.yaml --out DIR`: choose strategy settings on proxy levels, never the target."""

from __future__ import annotations

import argparse

from metamlip.config import load_config
from metamlip.experiment.config import ExperimentConfig
from metamlip.experiment.report import format_selection
from metamlip.experiment.selection import run_selection


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "select", help="choose each strategy's settings from selection.grid on leave-one-level-out proxy tasks"
    )
    parser.add_argument("config", help="experiment YAML config with a 'selection' section")
    parser.add_argument("--out", default="selection_out", help="output folder (default: selection_out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, ExperimentConfig, args.overrides)
    results = run_selection(config, args.out)
    print(format_selection(results))
    print(f"chosen settings and scores: {args.out}/selection.json (an experiment config takes it as 'selection_file'; "
          f"{args.out}/selected.yaml is the same choice as 'strategy_settings')")
    return 0

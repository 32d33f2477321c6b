"""`metamlip experiment CONFIG.yaml --out DIR`: compare strategies on one target level."""

from __future__ import annotations

import argparse

from metamlip.cli.run_arguments import add_config_arguments, read_run_config
from metamlip.experiment.config import ExperimentConfig
from metamlip.experiment.report import format_results_table
from metamlip.experiment.run import run_experiment, run_pretraining_only


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="pre-train, fine-tune and test every strategy side by side")
    add_config_arguments(parser)
    parser.add_argument("--out", help="output folder (overrides output_dir)")
    parser.add_argument(
        "--pretrain-only",
        action="store_true",
        help="only pre-train every strategy into OUTPUT/pretrained/ (reused by a later full run); "
        "the target level is read for its elements only, so it may still be being labelled",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"output_dir={args.out}"] if args.out else [])
    config = read_run_config(args, ExperimentConfig, overrides)
    if config is None:
        return 0
    if args.pretrain_only:
        for name, summary in run_pretraining_only(config).items():
            print(f"{name}: {summary['gradient_steps']} steps, {summary['wall_seconds']:.0f} s, {summary['stop_reason']}")
        print(f"pre-trained models: {config.output_dir}/pretrained/ (a full run of the same config reuses them); "
              f"summaries: {config.output_dir}/pretraining.json, pretraining.md")
        return 0
    results = run_experiment(config)
    print(format_results_table(results))
    print(f"results: {config.output_dir}/results.json, report: {config.output_dir}/report.md")
    return 0

"""`metamlip train CONFIG.yaml [--set key=value ...] [--resume | --overwrite] [--print-defaults]`."""

from __future__ import annotations

import argparse

from metamlip import distributed
from metamlip.cli.run_arguments import add_config_arguments, read_run_config
from metamlip.config import TrainConfig
from metamlip.evaluation.table import format_metrics_table
from metamlip.training.run_training import run_training


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a potential on labelled structures")
    add_config_arguments(parser, resume=True, overwrite=True)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = read_run_config(args, TrainConfig)
    if config is None:
        return 0
    report = run_training(config, resume=args.resume)
    if not distributed.is_main_process():
        return 0
    print(f"best epoch {report.fit.best_epoch} of {report.fit.epochs_run} ({report.fit.stop_reason}), "
          f"{report.fit.wall_seconds:.0f} s; model: {report.run_dir / 'model.pt'}")
    if report.test_metrics:
        print(format_metrics_table(report.test_metrics, title="test set"))
    return 0

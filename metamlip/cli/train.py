"""`metamlip train CONFIG.yaml [--set key=value ...] [--resume]`."""

from __future__ import annotations

import argparse

from metamlip import distributed
from metamlip.config import TrainConfig, load_config
from metamlip.evaluation.table import format_metrics_table
from metamlip.training.run_training import run_training


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a potential on labelled structures")
    parser.add_argument("config", help="YAML config (keys documented in the README)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.max_epochs=10")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, TrainConfig, args.overrides)
    report = run_training(config, resume=args.resume)
    if not distributed.is_main_process():
        return 0
    print(f"best epoch {report.fit.best_epoch} of {report.fit.epochs_run} ({report.fit.stop_reason}), "
          f"{report.fit.wall_seconds:.0f} s; model: {report.run_dir / 'model.pt'}")
    if report.test_metrics:
        print(format_metrics_table(report.test_metrics, title="test set"))
    return 0

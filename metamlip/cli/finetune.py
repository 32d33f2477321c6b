"""`metamlip finetune CONFIG.yaml`: refit a pre-trained checkpoint to a target level."""

from __future__ import annotations

import argparse

from metamlip import distributed
from metamlip.config import load_config
from metamlip.evaluation.table import format_metrics_table
from metamlip.experiment.config import FinetuneConfig
from metamlip.finetune import run_finetuning


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("finetune", help="refit a pre-trained potential to a new level with few structures")
    parser.add_argument("config", help="YAML config (keys documented in the README)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, FinetuneConfig, args.overrides)
    path, metrics = run_finetuning(config)
    if not distributed.is_main_process():
        return 0
    print(f"fine-tuned model: {path}")
    if metrics is not None:
        print(format_metrics_table({"test": metrics}, title="held-out target structures"))
    return 0

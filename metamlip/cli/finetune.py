"""`metamlip finetune CONFIG.yaml`: refit a pre-trained checkpoint to a target level."""

from __future__ import annotations

import argparse

from metamlip import distributed
from metamlip.cli.run_arguments import add_config_arguments, read_run_config
from metamlip.evaluation.table import format_metrics_table
from metamlip.experiment.config import FinetuneConfig
from metamlip.finetune import run_finetuning


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("finetune", help="refit a pre-trained potential to a new level with few structures")
    add_config_arguments(parser, resume=True, overwrite=True)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = read_run_config(args, FinetuneConfig)
    if config is None:
        return 0
    path, metrics = run_finetuning(config, resume=args.resume)
    if not distributed.is_main_process():
        return 0
    print(f"fine-tuned model: {path}")
    if metrics is not None:
        print(format_metrics_table({"test": metrics}, title="held-out target structures"))
    return 0

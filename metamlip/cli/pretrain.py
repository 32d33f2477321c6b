"""`metamlip pretrain CONFIG.yaml`: pre-train one strategy on several levels of theory."""

from __future__ import annotations

import argparse

from metamlip import distributed
from metamlip.cli.run_arguments import add_config_arguments, read_run_config
from metamlip.experiment.config import PretrainConfig
from metamlip.pretrain import run_pretraining


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pretrain", help="pre-train on several levels of theory with one strategy")
    add_config_arguments(parser, resume=True, overwrite=True)
    parser.epilog = "Runs on several processes under torchrun: torchrun --nproc_per_node N -m metamlip pretrain CONFIG"
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = read_run_config(args, PretrainConfig)
    if config is None:
        return 0
    path = run_pretraining(config, resume=args.resume)
    if distributed.is_main_process():
        print(f"pre-trained model: {path}")
    return 0

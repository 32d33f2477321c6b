"""`metamlip pretrain CONFIG.yaml`: pre-train one strategy on several levels of theory."""

from __future__ import annotations

import argparse

from metamlip import distributed
from metamlip.config import load_config
from metamlip.experiment.config import PretrainConfig
from metamlip.pretrain import run_pretraining


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pretrain", help="pre-train on several levels of theory with one strategy")
    parser.add_argument("config", help="YAML config (keys documented in the README)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    parser.epilog = "Runs on several processes under torchrun: torchrun --nproc_per_node N -m metamlip pretrain CONFIG"
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = run_pretraining(load_config(args.config, PretrainConfig, args.overrides), resume=args.resume)
    if distributed.is_main_process():
        print(f"pre-trained model: {path}")
    return 0

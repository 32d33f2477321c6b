"""Arguments shared by the commands that read a YAML config and train into an output folder.

``CONFIG.yaml``, ``--set KEY=VALUE``, ``--print-defaults`` (every key of the command's config
with its default, as YAML, walked from the config dataclasses), and for the training commands
``--resume`` / ``--overwrite`` (see `metamlip.training.run_dir.claim_run_dir`).
"""

from __future__ import annotations

import argparse
from typing import Any

from metamlip.config import defaults_yaml, load_config
from metamlip.errors import InputError
from metamlip.training.run_dir import claim_run_dir


def add_config_arguments(parser: argparse.ArgumentParser, resume: bool = False, overwrite: bool = False) -> None:
    """CONFIG, --set and --print-defaults; optionally --resume and --overwrite."""
    parser.add_argument("config", nargs="?", help="YAML config (keys documented in the README; see --print-defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.max_epochs=10")
    parser.add_argument("--print-defaults", action="store_true", help="print every config key with its default (YAML) and exit")
    if not (resume or overwrite):
        return  # an empty exclusive group breaks --help on Python 3.11
    either = parser.add_mutually_exclusive_group()
    if resume:
        either.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    if overwrite:
        either.add_argument("--overwrite", action="store_true", help="replace a finished or resumable run in OUTPUT_DIR")


def read_run_config(args: argparse.Namespace, cls: type, overrides: list[str] | None = None) -> Any | None:
    """The validated config of class `cls`, or None after printing the defaults (--print-defaults).
    With --overwrite among the arguments, the output folder is claimed (`claim_run_dir`)."""
    if args.print_defaults:
        print(defaults_yaml(cls), end="")
        return None
    if args.config is None:
        raise InputError("a CONFIG.yaml argument is required (or --print-defaults)")
    config = load_config(args.config, cls, args.overrides if overrides is None else overrides)
    if hasattr(args, "overwrite"):
        claim_run_dir(config.output_dir, getattr(args, "resume", False), args.overwrite)
    return config

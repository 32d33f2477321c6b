"""The `metamlip` command: parse, hand over to the library, print bad input on one line.

Each subcommand lives in its own module under `metamlip.cli` and exposes
``add_parser(subparsers)``, which registers the subcommand and sets ``run`` to a
function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from metamlip import __version__, distributed
from metamlip.allocator import keep_freed_memory
from metamlip.errors import InputError

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "train", "evaluate", "label", "scan", "pretrain", "finetune", "experiment", "select", "demo", "pack",
)
DISTRIBUTED_COMMANDS: tuple[str, ...] = ("train", "pretrain", "finetune")  # the ones that run under torchrun


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metamlip",
        description="Interatomic potentials pre-trained across levels of theory (scratch, joint, multihead, "
        "Reptile) and refitted to a new level with little data. Energies in eV, lengths in Angstrom.",
    )
    parser.add_argument("--version", action="version", version=f"metamlip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"metamlip.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"metamlip.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.add_parser(subparsers)
    return parser


def path_problem(error: OSError) -> str:
    """What is wrong with the path of a file-system error, in words."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "is a folder, expected a file"
    if isinstance(error, NotADirectoryError):
        return "part of this path is a file, not a folder"
    return "is a file, not a folder" if error.filename and os.path.isfile(error.filename) else "already exists"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `metamlip` command; returns the exit code."""
    keep_freed_memory()  # a process of its own: large batches stop page-faulting fresh memory on every call
    args = build_parser().parse_args(argv)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and args.command not in DISTRIBUTED_COMMANDS:
        print(f"metamlip {args.command}: error: only {', '.join(DISTRIBUTED_COMMANDS)} run under torchrun", file=sys.stderr)
        return 2
    if several:
        distributed.init_from_environment()
    quiet = not distributed.is_main_process()
    logging.basicConfig(level=logging.WARNING if quiet else logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.run(args) or 0)
    except InputError as error:
        message = " ".join(str(error).split())
        print(f"metamlip {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError) as error:
        print(f"metamlip {args.command}: error: {error.filename or error}: {path_problem(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # TrainingInterrupted carries its message and exit code (143 for SIGTERM)
        print(f"metamlip {args.command}: {interrupt or 'interrupted'}", file=sys.stderr)
        return getattr(interrupt, "exit_code", 130)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())

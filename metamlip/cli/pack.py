"""`metamlip pack FILE.h5 --out DIR`: convert an ANI-1x release-layout file into packed,
memory-mapped level folders that training reads batch by batch."""

from __future__ import annotations

import argparse

from metamlip.data.packed import pack_release


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pack", help="pack an ANI-1x release-layout HDF5 file for out-of-core training")
    parser.add_argument("data", help="HDF5 file in the ANI-1x/ANI-1ccx release layout")
    parser.add_argument("--out", required=True, help="folder for one packed sub-folder per level")
    parser.add_argument("--levels", nargs="+", help="levels to pack (default: all in the file)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    folders = pack_release(args.data, args.out, levels=args.levels)
    for level, folder in folders.items():
        print(f"{level}: {folder}")
    return 0

"""`metamlip pack FILE.h5 --out DIR`: convert an HDF5 dataset (ANI-1x release, ANI/COMP6 or SPICE
layout) into packed, memory-mapped level folders that training reads batch by batch."""

from __future__ import annotations

import argparse

from metamlip.cli.flags import options_as_flags
from metamlip.data.packed import pack_hdf5

FLAGS = {"energy_unit": "--energy-unit", "length_unit": "--length-unit", "level": "--level", "levels": "--levels"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pack", help="pack an HDF5 dataset (ANI-1x, ANI/COMP6, SPICE) for out-of-core training")
    parser.add_argument("data", help="HDF5 file in the ANI-1x/ANI-1ccx release, ANI/COMP6 or SPICE layout")
    parser.add_argument("--out", required=True, help="folder for one packed sub-folder per level")
    parser.add_argument("--levels", nargs="+", help="levels to pack (default: all in the file)")
    parser.add_argument("--level", help="level of theory where the file does not say (ANI/COMP6 without `lot`), or to rename SPICE's")
    parser.add_argument("--energy-unit", help="energy unit where the file does not say")
    parser.add_argument("--length-unit", help="length unit where the file does not say")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = {"level": args.level, "energy_unit": args.energy_unit, "length_unit": args.length_unit}
    with options_as_flags(FLAGS):
        folders = pack_hdf5(args.data, args.out, levels=args.levels, **options)
    for level, folder in folders.items():
        print(f"{level}: {folder}")
    return 0

"""`metamlip label`: energies and forces of every structure in a file at one level of theory.

A thin layer over `metamlip.labelling.label_structures`: read the structures with
ASE, label them (PySCF or tblite, in parallel, resumable), print the summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ase.io

from metamlip.cli.flags import options_as_flags
from metamlip.errors import InputError
from metamlip.labelling import known_methods, label_structures
from metamlip.labelling.output import failures_path
from metamlip.readers.options import require_file

FLAGS = {"charge": "--charge", "multiplicity": "--multiplicity", "workers": "--workers"}


def read_structures(path: Path) -> list:
    """All frames of an ASE-readable structure file."""
    require_file(path, "structure file")
    try:
        frames = ase.io.read(path, ":")
    except Exception as error:  # noqa: BLE001 - ASE raises many types for unreadable files
        raise InputError(f"{path}: ASE cannot read it as structures: {error}") from error
    return frames if isinstance(frames, list) else [frames]


def run(args: argparse.Namespace) -> int:
    """Label the structures of `args.input`; exit code 1 if any structure failed, else 0."""
    structures = read_structures(args.input)
    if args.out.exists() and args.out.samefile(args.input):
        raise InputError(f"{args.out}: --out is the input file; choose another --out")
    with options_as_flags(FLAGS):
        report = label_structures(
            structures,
            args.level,
            args.out,
            workers=args.workers,
            charge=args.charge,
            multiplicity=args.multiplicity,
            progress=not args.quiet,
        )
    print(report.summary())
    if report.failures:
        print(f"failed structures listed in {failures_path(args.out)}")
        return 1
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `metamlip label`."""
    parser = subparsers.add_parser(
        "label",
        help="compute energies and forces at a level of theory (PySCF, tblite)",
        description=(
            "Label every structure of INPUT at one level of theory and append them to OUTPUT (extended XYZ, "
            "eV and eV/Angstrom). Rerunning the same command resumes: structures already in OUTPUT are skipped; "
            "an OUTPUT of other structures or settings is refused (OUTPUT.input.json holds their fingerprint). "
            "Needs pip install 'metamlip[qm]'."
        ),
    )
    parser.add_argument("input", type=Path, help="any structure file ASE reads (all frames are labelled)")
    parser.add_argument(
        "--level",
        required=True,
        help="method/basis, e.g. hf/sto-3g, b3lyp/6-31g(d), mp2/cc-pvdz, gfn2-xtb; methods: "
        + ", ".join(known_methods()),
    )
    parser.add_argument("--out", type=Path, required=True, help="output extended XYZ file (new, or resumed if labelled from the same INPUT and settings)")
    parser.add_argument("--workers", type=int, default=1, help="parallel single-threaded processes (default 1)")
    parser.add_argument("--charge", type=int, default=0, help="total charge in e (default 0)")
    parser.add_argument("--multiplicity", type=int, default=1, help="spin multiplicity 2S+1 (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)

"""Which input a label output belongs to: a fingerprint kept in a small file beside the output.

fingerprint = sha256 over every input structure in input order (atom count, atomic numbers as
int64, positions in Angstrom as float64, little-endian), then the level, charge and multiplicity.
``metamlip label`` writes it, with those settings, to ``OUTPUT.input.json`` before the first
structure, and treats an existing OUTPUT as follows:

- missing or empty: a new output (the side file is written, replacing a stale one);
- non-empty with a side file of the same fingerprint: resumed (structures there are skipped);
- anything else (another input or setting, a file that is not a label output, an output written
  before fingerprints existed): refused with an InputError, and never truncated.

So an input with frames added or changed is a new input: label it into another OUTPUT.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms

from metamlip.atomic_files import write_json_atomically
from metamlip.errors import InputError

FORMAT = "metamlip-label-output"
VERSION = 1


@dataclass(frozen=True)
class LabelInput:
    """What a label output was computed from.

    Attributes:
        fingerprint: sha256 hex digest (see the module docstring).
        level: normalised level of theory.
        charge: total charge in e.
        multiplicity: spin multiplicity 2S+1.
        n_structures: structures in the input.
    """

    fingerprint: str
    level: str
    charge: int
    multiplicity: int
    n_structures: int


def input_fingerprint(structures: Sequence[Atoms], level: str, charge: int, multiplicity: int) -> LabelInput:
    """The `LabelInput` of labelling `structures` (positions in Angstrom) at `level`."""
    digest = hashlib.sha256()
    for atoms in structures:
        numbers = np.ascontiguousarray(atoms.get_atomic_numbers(), dtype="<i8")
        digest.update(np.int64(len(numbers)).astype("<i8").tobytes())
        digest.update(numbers.tobytes())
        digest.update(np.ascontiguousarray(atoms.get_positions(), dtype="<f8").tobytes())
    digest.update(json.dumps([level, int(charge), int(multiplicity)]).encode())
    return LabelInput(digest.hexdigest(), level, int(charge), int(multiplicity), len(structures))


def input_record_path(out_path: str | Path) -> Path:
    """The side file of `out_path`: ``OUTPUT.input.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".input.json")


def claim_output(out_path: str | Path, label_input: LabelInput) -> None:
    """Check that `out_path` is new or an output of `label_input`, then record `label_input` beside it.

    InputError (naming the file and what differs) for a folder, a non-empty file without the side
    file, or a side file of another fingerprint. Nothing is truncated or removed here.
    """
    out_path = Path(out_path)
    if out_path.is_dir():
        raise InputError(f"{out_path}: is a folder; --out is the extended XYZ file to write")
    if out_path.exists() and out_path.stat().st_size > 0:
        _check_record(out_path, label_input)
    record = input_record_path(out_path)
    write_json_atomically(record, {"format": FORMAT, "version": VERSION, **asdict(label_input)})


def _check_record(out_path: Path, label_input: LabelInput) -> None:
    """InputError unless the side file of the non-empty `out_path` holds `label_input`'s fingerprint."""
    record = input_record_path(out_path)
    if not record.is_file():
        raise InputError(_unrecorded_message(out_path))
    try:
        stored = json.loads(record.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        stored = None
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise InputError(f"{record}: not a metamlip label record; choose another --out")
    if stored.get("fingerprint") == label_input.fingerprint:
        return
    settings = [
        f"{name} {stored.get(name)!r} (this run: {getattr(label_input, name)!r})"
        for name in ("level", "charge", "multiplicity")
        if stored.get(name) != getattr(label_input, name)
    ]
    what = ", ".join(settings) if settings else f"other input structures ({stored.get('n_structures')} of them; this input has {label_input.n_structures})"
    raise InputError(f"{out_path}: labelled with {what}, so it cannot be resumed with this input; choose another --out")


def _unrecorded_message(out_path: Path) -> str:
    """Why a non-empty `out_path` without a side file is refused, and what to do."""
    record = input_record_path(out_path).name
    try:
        first = ase.io.read(out_path, index=0, format="extxyz")
    except Exception:  # noqa: BLE001 - any parse failure means: not a label output
        first = None
    if isinstance(first, Atoms) and {"level_of_theory", "source_index"} <= set(first.info):
        return (
            f"{out_path}: a label output from a metamlip without input fingerprints (no {record}), so it cannot be "
            "checked against this input; move it aside and label into a new --out (the old file stays readable)"
        )
    return f"{out_path}: exists and is not a metamlip label output; choose another --out (it is left unchanged)"

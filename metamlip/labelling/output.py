"""The labelling output: an extended XYZ file appended one structure at a time, and its failure log.

Each frame carries energy (eV) and forces (eV/Angstrom) as a SinglePointCalculator,
and ``info['level_of_theory']``, ``info['energy_unit'] = 'eV'`` and
``info['source_index']`` (index of the structure in the input). Frames are written
whole and fsync'ed, so a killed run leaves complete frames plus at most one torn
frame at the end, which `completed_indices` cuts off before resuming (only after
`metamlip.labelling.fingerprint.claim_output` has matched the output to its input).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import ase.io
import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from metamlip.atomic_files import write_json_atomically
from metamlip.errors import InputError
from metamlip.labelling.calculation import Label


def failures_path(out_path: str | Path) -> Path:
    """Side file with the failed structures of `out_path`: ``OUTPUT.failed.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".failed.json")


def labelled_atoms(
    numbers: np.ndarray, positions_angstrom: np.ndarray, label: Label, level: str, source_index: int
) -> Atoms:
    """An ASE Atoms with `label` attached as a SinglePointCalculator and the metadata in ``info``."""
    atoms = Atoms(numbers=numbers, positions=positions_angstrom)
    results = {"energy": float(label.energy_ev)}
    if label.forces_ev_per_angstrom is not None:
        results["forces"] = np.asarray(label.forces_ev_per_angstrom)
    atoms.calc = SinglePointCalculator(atoms, **results)
    atoms.info["level_of_theory"] = level
    atoms.info["energy_unit"] = "eV"
    atoms.info["source_index"] = int(source_index)
    return atoms


def append_frame(out_path: str | Path, atoms: Atoms) -> None:
    """Append one frame to the extended XYZ file in one write, then flush and fsync."""
    buffer = io.StringIO()
    ase.io.write(buffer, atoms, format="extxyz")
    with open(out_path, "a", encoding="utf-8") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def _complete_frames_end(path: Path) -> int:
    """Byte offset just after the last complete XYZ frame of `path`."""
    end = 0
    with open(path, "rb") as handle:
        while True:
            header = handle.readline()
            if not header.strip():
                return end
            try:
                n_atoms = int(header.split()[0])
            except ValueError:
                return end
            lines = [handle.readline() for _ in range(n_atoms + 1)]
            if not lines or not all(line.endswith(b"\n") for line in lines):
                return end
            end = handle.tell()


def completed_indices(out_path: str | Path, level: str) -> set[int]:
    """Source indices already labelled in `out_path` (empty if it does not exist).

    A torn last frame (from a killed run) is cut off. Raises `InputError` if the file
    holds another level of theory or frames without ``source_index``.
    """
    path = Path(out_path)
    if not path.exists():
        return set()
    end = _complete_frames_end(path)
    if end < path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(end)
    if end == 0:
        return set()
    done: set[int] = set()
    for frame_index, atoms in enumerate(ase.io.iread(path, index=":", format="extxyz")):
        frame_level = atoms.info.get("level_of_theory")
        if frame_level != level:
            raise InputError(
                f"{path}: frame {frame_index} is at level {frame_level!r}, not {level!r}; choose another --out"
            )
        if "source_index" not in atoms.info:
            raise InputError(f"{path}: frame {frame_index} has no source_index; choose another --out")
        done.add(int(atoms.info["source_index"]))
    return done


def write_failures(out_path: str | Path, failures: dict[int, str]) -> None:
    """Write ``OUTPUT.failed.json`` (a list of {index, reason}) atomically; remove it when nothing failed."""
    path = failures_path(out_path)
    if not failures:
        path.unlink(missing_ok=True)
        return
    records = [{"index": index, "reason": failures[index]} for index in sorted(failures)]
    write_json_atomically(path, records)

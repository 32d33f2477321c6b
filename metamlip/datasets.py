"""Datasets shipped inside the package, loaded by name.

    from metamlip.datasets import list_bundled, load_bundled
    ethanol = load_bundled("ethanol-multilevel")
    ethanol.levels["mp2/cc-pvdz"]               # LevelDataset, eV and Angstrom
    ethanol.scans["torsion_hocc"]["hf/sto-3g"]  # Scan: coordinate (degree), energies_ev

Each bundled dataset is a folder under ``metamlip/bundled/`` with one extended XYZ
file per level of theory, reference scans under ``scans/``, a ``manifest.json``
and a README with its source and license.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.resources import as_file, files
from typing import TYPE_CHECKING

import numpy as np

from metamlip.data.level_dataset import LevelDataset
from metamlip.errors import InputError
from metamlip.levels import normalise_level
from metamlip.readers import read_level
from metamlip.scans import Scan, read_scan

if TYPE_CHECKING:  # importlib.resources.abc is Python >= 3.11
    from importlib.resources.abc import Traversable

# Bundled dataset name -> folder under metamlip/bundled/.
BUNDLED: dict[str, str] = {
    "ethanol-multilevel": "ethanol_multilevel",
    "methyl-formate-multilevel": "methyl_formate_multilevel",
    "organic-pretraining": "organic_pretraining",
    "paracetamol-target": "paracetamol_target",
}


@dataclass(frozen=True)
class BundledDataset:
    """A bundled multi-level dataset.

    Attributes:
        name: dataset name, e.g. ``'ethanol-multilevel'``.
        levels: level name -> structures at that level (eV, Angstrom, eV/Angstrom).
        target_level: the expensive level meant for fine-tuning (None for a pre-training set).
        scans: scan name -> level name -> `Scan` (coordinate in degree or Angstrom, energies in eV).
        source_frames: level name -> (n_structures,) index of each structure in the original
            geometry pool (MD17 frame index for ethanol, MD frame for methyl formate), the key
            that matches geometries across levels.
        manifest: the parsed ``manifest.json`` (levels, files, counts, scan definitions).
    """

    name: str
    levels: dict[str, LevelDataset]
    target_level: str | None
    scans: dict[str, dict[str, Scan]]
    source_frames: dict[str, np.ndarray] = field(repr=False)
    manifest: dict = field(repr=False)


def list_bundled() -> list[str]:
    """Names of the datasets shipped with metamlip."""
    return sorted(BUNDLED)


def _folder(name: str) -> tuple[str, Traversable]:
    key = str(name).strip().lower().replace("_", "-")
    if key not in BUNDLED:
        raise InputError(f"unknown bundled dataset {name!r}; available: {', '.join(list_bundled())}")
    return key, files("metamlip").joinpath("bundled", BUNDLED[key])


def _read_level_file(resource: Traversable, level: str) -> LevelDataset:
    with as_file(resource) as path:
        dataset = read_level(path)
    if dataset.level != normalise_level(level):
        raise InputError(f"{resource}: holds level {dataset.level!r}, the manifest says {level!r}")
    return dataset


def _read_scan_file(resource: Traversable, kind: str, name: str) -> Scan:
    with as_file(resource) as path:
        return read_scan(path, kind=kind, name=name)


def load_bundled(name: str) -> BundledDataset:
    """Load a bundled dataset by name (see `list_bundled`); `InputError` for an unknown name."""
    key, folder = _folder(name)
    manifest = json.loads(folder.joinpath("manifest.json").read_text(encoding="utf-8"))
    levels = {
        level: _read_level_file(folder.joinpath(entry["file"]), level) for level, entry in manifest["levels"].items()
    }
    source_frames = {
        level: np.asarray(entry["source_frames"], dtype=np.int64) for level, entry in manifest["levels"].items()
    }
    scans = {
        scan_name: {
            level: _read_scan_file(folder.joinpath(path), definition["kind"], f"{scan_name} {level}")
            for level, path in definition["files"].items()
        }
        for scan_name, definition in manifest["scans"].items()
    }
    return BundledDataset(
        name=key,
        levels=levels,
        target_level=manifest["target_level"],
        scans=scans,
        source_frames=source_frames,
        manifest=manifest,
    )

"""Scanning fine-tuned models along reference 1-D scans, and their roughness."""

from __future__ import annotations

from dataclasses import dataclass

import ase.io
from ase import Atoms

import numpy as np

from metamlip.data.batching import StructureBatcher
from metamlip.data.level_dataset import LevelDataset
from metamlip.errors import InputError
from metamlip.evaluation.metrics import predict
from metamlip.experiment.config import ScanSource
from metamlip.model.potential import Potential
from metamlip.scans import Roughness, Scan, dense_grid, read_scan, roughness, scan_geometries


@dataclass
class ScanReference:
    """A reference scan and how to rebuild its geometries: start structure, kind, atom indices."""

    name: str
    reference: Scan
    structure: Atoms
    kind: str
    indices: list[int]


@dataclass
class ModelScan:
    """A model's scan on the dense grid of its reference, and its roughness."""

    scan: Scan
    roughness: Roughness


def load_scan_references(sources: list[ScanSource]) -> list[ScanReference]:
    """Read every configured reference scan; the first frame is the rigid scan's start geometry."""
    references = []
    for index, source in enumerate(sources):
        if source.kind not in ("torsion", "bond") or len(source.indices) != (4 if source.kind == "torsion" else 2):
            raise InputError(f"config key scans[{index}]: kind {source.kind!r} with indices {source.indices} is not a torsion (4 atoms) or bond (2 atoms)")
        reference = read_scan(source.path, kind=source.kind, name=source.name or None)
        references.append(ScanReference(source.name or reference.name, reference, ase.io.read(source.path, index=0), source.kind, list(source.indices)))
    return references


def scan_model(model: Potential, reference: ScanReference, level: str) -> ModelScan:
    """Rigid scan of `model` at `level` on the reference's dense grid (all points in one batch),
    with roughness metrics."""
    grid = dense_grid(reference.reference)
    geometries = scan_geometries(reference.structure, reference.kind, reference.indices, grid)
    dataset = LevelDataset.from_structures(
        level, [g.numbers for g in geometries], [g.positions for g in geometries], np.zeros(len(geometries)), source=reference.name
    )
    batcher = StructureBatcher(dataset, model.species, model.config.cutoff_angstrom, next(model.parameters()).dtype)
    energies_ev = predict(model, batcher, level=level, batch_size=len(geometries)).predicted_energies_ev
    scan = Scan(name=reference.name, kind=reference.kind, coordinate=grid, energies_ev=energies_ev, periodic=reference.reference.periodic)
    return ModelScan(scan, roughness(scan, reference.reference))

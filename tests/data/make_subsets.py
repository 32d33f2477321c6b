"""Regenerate the subset files in this folder from the full files in shared/data.

    python tests/data/make_subsets.py [SOURCE_DIR]   (default: /work/shared/data)

Deterministic: the first rows / first molecule groups, same layout and keys as the originals.
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
QM7X_ROWS = 200  # first structures of qm7x_small.npz
COMP6_MOLECULES = ("mol00", "mol01", "mol02", "mol03")  # groups of s66x8 kept


def qm7x_subset(source: Path) -> None:
    with np.load(source / "qm7x_small.npz") as full:
        np.savez(HERE / "qm7x_small_200.npz", **{key: full[key][:QM7X_ROWS] for key in full.files})


def comp6_subset(source: Path) -> None:
    with h5py.File(source / "comp6_s66x8_wb97x_631gd.h5", "r") as full, h5py.File(
        HERE / "comp6_s66x8_wb97x_631gd_4mol.h5", "w"
    ) as subset:
        group = subset.create_group("s66x8")
        for name in COMP6_MOLECULES:
            full.copy(full["s66x8"][name], group, name=name)


if __name__ == "__main__":
    source_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/shared/data")
    qm7x_subset(source_dir)
    comp6_subset(source_dir)

"""Build the bundled `ethanol-multilevel` dataset: MD17 ethanol geometries at several levels of theory.

    python scripts/build_ethanol_multilevel.py [--work-dir build/ethanol_multilevel_work]

Rerunnable and deterministic: a fixed seed picks the MD17 frames, every level is
labelled with `metamlip.labelling.label_structures` into the work directory
(resumable: a rerun continues where a killed one stopped), and the bundled files
are then written from the work files sorted by MD17 frame index / scan point.
Per-level timings go to ``<work-dir>/timings.json``. Shared code: `multilevel_build`.
"""

from __future__ import annotations

import multilevel_build as mb  # first: pins OpenMP and BLAS to one thread before numpy loads  # isort: skip

from pathlib import Path  # noqa: E402

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402

from metamlip.units import KCAL_PER_MOL_TO_EV  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MD17_PATH = REPO_ROOT.parent / "shared" / "data" / "md17_ethanol_dft.npz"
BUNDLE_DIR = REPO_ROOT / "metamlip" / "bundled" / "ethanol_multilevel"
DEFAULT_WORK_DIR = REPO_ROOT / "build" / "ethanol_multilevel_work"

N_CHEAP = 300  # MD17 frames labelled at every cheaper level
MD17_LEVEL = "pbe+vdw-ts"  # level of the original MD17 labels (not recomputed), on the N_CHEAP frames

# Scans start from MD17 frame SCAN_FRAME (the lowest-energy frame of the file). MD17 atom order:
# C0 (bonded to O), C1 (methyl), O2, H3-H4 on C0, H5-H7 on C1, H8 on O.
SCAN_FRAME = 0
SCANS: dict[str, dict] = {
    "torsion_hocc": {
        "kind": "torsion",
        "indices": [1, 0, 2, 8],  # dihedral C1-C0-O2-H8 (= H8-O2-C0-C1); the hydroxyl H rotates about C0-O2
        "coordinates": [float(x) for x in np.linspace(-180.0, 180.0, 36, endpoint=False)],
        "unit": "degree",
    },
    "bond_co": {
        "kind": "bond",
        "indices": [0, 2],  # C0-O2; the OH group moves along the bond
        "coordinates": [round(float(x), 10) for x in np.linspace(1.1, 2.4, 27)],
        "unit": "angstrom",
    },
}

BUILD = mb.MultilevelBuild(
    name="ethanol-multilevel",
    source="MD17 ethanol (Chmiela et al.), file thorben-frank/mlff examples/example_data/ethanol.npz (MIT)",
    selection_rule="numpy default_rng(seed).permutation(2000); each level takes the first n frames, sorted",
    seed=0,
    target_level="mp2/cc-pvdz",
    # Each level is computed on the first n frames of one seeded random draw of MD17 frames, so smaller
    # sets are subsets of larger ones. Order = generation order.
    levels=(
        mb.LevelPlan("gfn2-xtb", N_CHEAP, "cheap"),
        mb.LevelPlan("gfn1-xtb", N_CHEAP, "cheap"),
        mb.LevelPlan("hf/sto-3g", N_CHEAP, "cheap"),
        mb.LevelPlan("hf/3-21g", N_CHEAP, "cheap"),
        mb.LevelPlan("hf/6-31g(d)", N_CHEAP, "cheap"),
        mb.LevelPlan("mp2/cc-pvdz", 150, "target"),
        mb.LevelPlan("b3lyp/6-31g(d)", 100, "extra"),
    ),
    scans=SCANS,
    scan_base={"base_md17_frame": SCAN_FRAME},
)


def write_md17_level(data: np.lib.npyio.NpzFile, frames: np.ndarray, path: Path) -> dict:
    """The original MD17 labels (kcal/mol, kcal/mol/Angstrom) of `frames`, converted to eV; its manifest entry."""
    out = []
    for frame in frames:
        atoms = Atoms(numbers=data["z"], positions=data["R"][frame])
        energy_ev = float(data["E"][frame].reshape(-1)[0]) * KCAL_PER_MOL_TO_EV
        forces = data["F"][frame] * KCAL_PER_MOL_TO_EV
        info = {"level_of_theory": MD17_LEVEL, "energy_unit": "eV", "source_index": int(frame)}
        out.append(mb.labelled_frame(atoms, energy_ev, forces, info))
    ase.io.write(path, out, format="extxyz")
    written = [int(frame) for frame in frames]
    return mb.level_entry(path.name, written, True, "cheap", "MD17 labels, kcal/mol converted to eV")


def main() -> None:
    args = mb.parse_args(__doc__.splitlines()[0], BUNDLE_DIR, DEFAULT_WORK_DIR)
    data = np.load(MD17_PATH)
    pool = [Atoms(numbers=data["z"], positions=positions) for positions in data["R"]]
    frames = mb.select_frames(len(pool), N_CHEAP, BUILD.seed)
    md17_level = write_md17_level(data, frames, args.out_dir / f"{mb.level_slug(MD17_LEVEL)}.xyz")
    mb.run_build(BUILD, pool, pool[SCAN_FRAME], args, levels={MD17_LEVEL: md17_level})


if __name__ == "__main__":
    main()

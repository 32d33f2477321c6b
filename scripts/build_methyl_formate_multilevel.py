"""Build the bundled `methyl-formate-multilevel` dataset: GFN2-xTB MD geometries at several levels of theory.

    python scripts/build_methyl_formate_multilevel.py [--work-dir build/methyl_formate_multilevel_work]

Rerunnable and deterministic: a seeded GFN2-xTB Langevin run at 600 K (tblite + ASE)
samples the geometry pool (cached as ``<work-dir>/md_pool.xyz``), a fixed seed picks
the frames of each level, every level is labelled with `metamlip.labelling.label_structures`
(resumable), and the bundled files are written sorted by MD frame / scan point.
Per-level timings go to ``<work-dir>/timings.json``. Shared code: `multilevel_build`.
"""

from __future__ import annotations

import multilevel_build as mb  # first: pins OpenMP and BLAS to one thread before numpy loads  # isort: skip

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from ase.build import molecule  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "metamlip" / "bundled" / "methyl_formate_multilevel"
DEFAULT_WORK_DIR = REPO_ROOT / "build" / "methyl_formate_multilevel_work"

N_CHEAP = 300  # MD frames labelled at every cheap level (the whole pool)
N_TARGET = 150
MD = mb.MdProtocol(
    method="GFN2-xTB",
    temperature_k=600.0,
    timestep_fs=0.5,
    friction_per_fs=0.01,
    seed=0,
    n_equilibrate=2000,  # 1 ps
    stride=30,  # 15 fs between kept frames
    n_frames=N_CHEAP,
)

# Atom order of ase.build.molecule('HCOOCH3') (G2 geometry, cis/Z ester, all heavy atoms in one plane):
# C0 carbonyl C, O1 carbonyl O, O2 ester O, H3 formyl H, C4 methyl C, H5-H7 methyl H.
SCANS: dict[str, dict] = {
    "torsion_ococ": {
        "kind": "torsion",
        "indices": [1, 0, 2, 4],  # dihedral O1=C0-O2-C4; the O-CH3 side rotates about C0-O2 (0 = cis, 180 = trans)
        "coordinates": [float(x) for x in np.linspace(-180.0, 180.0, 36, endpoint=False)],
        "unit": "degree",
    },
    "bond_och3": {
        "kind": "bond",
        "indices": [2, 4],  # O2-C4; the methyl group moves along the bond
        "coordinates": [round(float(x), 10) for x in np.linspace(1.2, 2.4, 25)],
        "unit": "angstrom",
    },
}

BUILD = mb.MultilevelBuild(
    name="methyl-formate-multilevel",
    source=(
        "computed by metamlip: GFN2-xTB (tblite) Langevin MD of methyl formate at 600 K from the "
        "ase.build.molecule('HCOOCH3') geometry"
    ),
    selection_rule=(
        f"MD pool of {N_CHEAP} frames; numpy default_rng(seed).permutation({N_CHEAP}); "
        "each level takes the first n frames (labelled in draw order, written sorted)"
    ),
    seed=0,
    target_level="mp2/cc-pvdz",
    # Order = generation order: cheap levels, then MP2, CCSD(T) last (torsion scan before the bond scan).
    levels=(
        mb.LevelPlan("gfn2-xtb", N_CHEAP, "cheap"),
        mb.LevelPlan("gfn1-xtb", N_CHEAP, "cheap"),
        mb.LevelPlan("hf/sto-3g", N_CHEAP, "cheap"),
        mb.LevelPlan("hf/3-21g", N_CHEAP, "cheap"),
        mb.LevelPlan("hf/6-31g(d)", N_CHEAP, "cheap"),
        mb.LevelPlan("mp2/cc-pvdz", N_TARGET, "target"),
        mb.LevelPlan("ccsd(t)/cc-pvdz", N_TARGET, "target"),
    ),
    scans=SCANS,
    scan_base={"base_geometry": "ase.build.molecule('HCOOCH3')"},
    provenance={"md": dataclasses.asdict(MD)},
)


def main() -> None:
    args = mb.parse_args(__doc__.splitlines()[0], BUNDLE_DIR, DEFAULT_WORK_DIR)
    start = molecule("HCOOCH3")
    pool = mb.md_pool(start, MD, args.work_dir / "md_pool.xyz")
    mb.run_build(BUILD, pool, start, args)


if __name__ == "__main__":
    main()

"""Build the bundled `paracetamol-target` set: GFN2-xTB MD at 500 K, labelled at B3LYP-D3(BJ)/def2-SVP.

    python scripts/build_paracetamol_target.py [--workers 2] [--only LEVEL [--scans-only]] [--write-only]

Rerunnable and deterministic: the start geometry (``start_geometry.xyz``, RDKit ETKDG + MMFF94
from SMILES, stored) is optimised with GFN2-xTB (cached as ``<work-dir>/optimised.xyz``), a
seeded Langevin run at 500 K samples the pool (``<work-dir>/md_pool.xyz``), a fixed seed picks
the frames of each level and every level is labelled with `metamlip.labelling.label_structures`
(resumable). The target level runs with density fitting (``df-``). Shared code: `multilevel_build`.
"""

from __future__ import annotations

import multilevel_build as mb  # first: pins OpenMP and BLAS to one thread before numpy loads  # isort: skip

import dataclasses  # noqa: E402
from pathlib import Path  # noqa: E402

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "metamlip" / "bundled" / "paracetamol_target"
DEFAULT_WORK_DIR = REPO_ROOT / "build" / "paracetamol_target_work"

TARGET_LEVEL = "df-b3lyp-d3bj/def2-svp"
N_POOL = 300  # MD frames, all labelled at GFN2-xTB
N_TARGET = 260  # frames labelled at the target level
OPTIMISER_FMAX_EV_PER_ANGSTROM = 0.005
MD = mb.MdProtocol(
    method="GFN2-xTB",
    temperature_k=500.0,
    timestep_fs=0.5,
    friction_per_fs=0.01,
    seed=0,
    n_equilibrate=2000,  # 1 ps
    stride=40,  # 20 fs between kept frames
    n_frames=N_POOL,
)

# Atom order of start_geometry.xyz (SMILES CC(=O)Nc1ccc(O)cc1 with hydrogens added):
# C0 methyl C, C1 carbonyl C, O2 carbonyl O, N3 amide N, C4 ring C bonded to N, C5/C10 ring C
# beside C4, C6/C9, C7 ring C bonded to O8 (hydroxyl O), H11-H13 methyl H, H14 amide H, H17 hydroxyl H.
SCANS: dict[str, dict] = {
    "torsion_amide_aryl": {
        "kind": "torsion",
        "indices": [1, 3, 4, 5],  # dihedral C1(=O)-N3-C4-C5: the ring rotates about the N-C(aryl) bond
        "coordinates": [float(x) for x in np.linspace(-180.0, 180.0, 24, endpoint=False)],
        "unit": "degree",
    },
}

BUILD = mb.MultilevelBuild(
    name="paracetamol-target",
    source=(
        "computed by metamlip: GFN2-xTB (tblite) Langevin MD of paracetamol (acetaminophen) at 500 K from "
        "its GFN2-xTB minimum (start: RDKit ETKDG seed 7 + MMFF94 from SMILES CC(=O)Nc1ccc(O)cc1)"
    ),
    selection_rule=(
        f"MD pool of {N_POOL} frames; numpy default_rng(seed).permutation({N_POOL}); "
        "each level takes the first n frames (labelled in draw order, written sorted)"
    ),
    seed=0,
    target_level=TARGET_LEVEL,
    levels=(
        mb.LevelPlan("gfn2-xtb", N_POOL, "cheap"),
        mb.LevelPlan(TARGET_LEVEL, N_TARGET, "target"),
    ),
    scans=SCANS,
    scan_base={"base_geometry": "GFN2-xTB minimum (optimised.xyz)"},
    provenance={"md": dataclasses.asdict(MD), "optimiser": {"method": "GFN2-xTB", "ase": "BFGS",
                                                            "fmax_ev_per_angstrom": OPTIMISER_FMAX_EV_PER_ANGSTROM}},
)


def gfn2_minimum(start: Atoms, path: Path) -> Atoms:
    """`start` relaxed with GFN2-xTB (ASE BFGS), cached in `path` and always read back from it."""
    if not path.exists():
        from ase.optimize import BFGS
        from tblite.ase import TBLite

        atoms = start.copy()
        atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        BFGS(atoms, logfile=None).run(fmax=OPTIMISER_FMAX_EV_PER_ANGSTROM, steps=1000)
        ase.io.write(path.with_suffix(".partial.xyz"), Atoms(numbers=atoms.numbers, positions=atoms.positions))
        path.with_suffix(".partial.xyz").rename(path)
    return ase.io.read(path)


def main() -> None:
    args = mb.parse_args(__doc__.splitlines()[0], BUNDLE_DIR, DEFAULT_WORK_DIR)
    start = ase.io.read(BUNDLE_DIR / "start_geometry.xyz")
    minimum = gfn2_minimum(start, args.work_dir / "optimised.xyz")
    if not args.only:
        ase.io.write(args.out_dir / "optimised_gfn2-xtb.xyz", minimum)
    pool = mb.md_pool(minimum, MD, args.work_dir / "md_pool.xyz")
    mb.run_build(BUILD, pool, minimum, args)


if __name__ == "__main__":
    main()

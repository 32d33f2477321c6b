"""Build the bundled `organic-pretraining` set: public organic samples + QM7-X relabelled at four levels.

    python scripts/build_organic_pretraining.py [--shared ../shared/data] [--workers 2]

Two parts, one extended XYZ file per level of theory (H, C, N, O only):

- the real public samples of ``--shared`` in their own levels, read with metamlip's readers:
  QM7-X (PBE0+MBD), COMP6 S66x8 and the ANI-1x release sample (wB97X/6-31G(d) share one file),
  ANI-1x's wB97X/def2-TZVPP, HF, MP2 and CCSD(T)*/CBS, SPICE (wB97M-D3BJ/def2-TZVPPD) and
  MD17 ethanol (PBE+vdW-TS). Structures with other elements are left out and counted;
- the C/H/N/O structures of the QM7-X sample (equilibrium and displaced geometries, the pool)
  relabelled with `metamlip label` at GFN2-xTB and GFN1-xTB (every structure) and at
  DF-HF/STO-3G and DF-HF/6-31G(d) (the first ``N_HF`` of a seeded draw), so that levels share
  geometries and geometries share levels.

Rerunnable and deterministic: the labelling is resumable (work files in ``--work-dir``) and
``--from-bundle`` restarts from the bundled files. Shared code: `multilevel_build`.
"""

from __future__ import annotations

import multilevel_build as mb  # first: pins OpenMP and BLAS to one thread before numpy loads  # isort: skip

import dataclasses  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import ase.io  # noqa: E402
from ase import Atoms  # noqa: E402

from metamlip.data.level_dataset import LevelDataset  # noqa: E402
from metamlip.readers import read_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO_ROOT / "metamlip" / "bundled" / "organic_pretraining"
DEFAULT_WORK_DIR = REPO_ROOT / "build" / "organic_pretraining_work"
DEFAULT_SHARED = REPO_ROOT.parent / "shared" / "data"

ELEMENTS: frozenset[int] = frozenset({1, 6, 7, 8})  # H, C, N, O
N_HF = 1000  # QM7-X structures labelled at each HF level

# The real samples: file in --shared, dataset name in the bundle, reader options, levels kept.
ANI1X_LEVELS = ("wb97x/6-31g(d)", "wb97x/def2-tzvpp", "hf/cc-pvdz", "mp2/cc-pvdz", "ccsd(t)/cbs")
REAL_SOURCES: tuple[dict, ...] = (
    {"name": "qm7x", "file": "qm7x_small.npz", "options": {"level": "pbe0+mbd", "energy_unit": "eV"},
     "repository": "thorben-frank/mlff: examples/example_data/qm7x_250_small.npz (MIT)"},
    {"name": "comp6_s66x8", "file": "comp6_s66x8_wb97x_631gd.h5", "options": {"level": "wb97x/6-31g(d)"},
     "repository": "isayev/COMP6: COMP6v1/s66x8/s66x8_wb97x6-31gd.h5 (MIT)"},
    {"name": "ani1x_release_sample", "file": "ani1x_release_sample.h5", "options": {"levels": list(ANI1X_LEVELS)},
     "repository": "choderalab/modelforge: modelforge/tests/data/ani1_n5.hdf5 (MIT)"},
    {"name": "spice_1.1.4_sample", "file": "spice_1.1.4_sample.h5", "options": {},
     "repository": "choderalab/modelforge: modelforge/tests/data/SPICE-1.1.4_n2.hdf5 (MIT)"},
    {"name": "md17_ethanol", "file": "md17_ethanol_dft.npz", "options": {"level": "pbe+vdw-ts", "energy_unit": "kcal/mol"},
     "repository": "thorben-frank/mlff: examples/example_data/ethanol.npz (MIT)"},
)

BUILD = mb.MultilevelBuild(
    name="organic-pretraining",
    source=(
        "public samples of QM7-X, COMP6 S66x8, ANI-1x, SPICE and MD17 (../shared/data, MIT) in their own levels, "
        "and the C/H/N/O structures of the QM7-X sample relabelled by metamlip at GFN2-xTB, GFN1-xTB, "
        "DF-HF/STO-3G and DF-HF/6-31G(d)"
    ),
    selection_rule=(
        "pool = the QM7-X sample's structures with only H, C, N, O, in file order; numpy default_rng(seed)"
        ".permutation(n_pool); each relabelled level takes the first n (labelled in draw order, written sorted)"
    ),
    seed=0,
    target_level=None,
    levels=(),  # set in main(): the counts depend on the pool size
    scans={},
)


def element_filter(dataset: LevelDataset) -> tuple[list[int], Counter]:
    """Indices of the structures with only `ELEMENTS`, and the other elements' symbols -> structures left out."""
    kept, left_out = [], Counter()
    for index in range(len(dataset)):
        numbers = set(dataset.atomic_numbers[dataset.atom_slice(index)].tolist())
        others = numbers - ELEMENTS
        if others:
            left_out.update(Atoms(numbers=sorted(others)).get_chemical_symbols())
        else:
            kept.append(index)
    return kept, left_out


def real_frames(source: dict, shared: Path) -> tuple[dict[str, list[Atoms]], dict]:
    """Level -> labelled frames of one real sample, and its manifest record.

    A frame's ``source_index`` is its position among the sample's kept (H/C/N/O) structures in file
    order: for QM7-X the same index as the relabelling pool's, so one index names one geometry at
    every QM7-X level."""
    path = shared / source["file"]
    frames: dict[str, list[Atoms]] = {}
    record = {"file": source["file"], "repository": source["repository"], "levels": {}}
    for dataset in read_dataset(path, **source["options"]):
        kept, left_out = element_filter(dataset)
        frames[dataset.level] = [
            mb.labelled_frame(
                dataset.to_atoms(index),
                float(dataset.energies_ev[index]),
                None if not dataset.has_forces else dataset.forces_ev_per_angstrom[dataset.atom_slice(index)],
                {"level_of_theory": dataset.level, "energy_unit": "eV", "source": source["name"], "source_index": position},
            )
            for position, index in enumerate(kept)
        ]
        record["levels"][dataset.level] = {
            "n_read": len(dataset),
            "n_kept": len(kept),
            "n_missing_labels": int(dataset.n_skipped),
            "left_out_by_element": dict(sorted(left_out.items())),
        }
    return frames, record


def write_real_levels(shared: Path, out_dir: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Write one file per level of the real samples (frames of one level from several samples
    together, in `REAL_SOURCES` order); return the manifest level entries and the source records."""
    by_level: dict[str, list[Atoms]] = {}
    records = {}
    for source in REAL_SOURCES:
        frames, records[source["name"]] = real_frames(source, shared)
        for level, level_frames in frames.items():
            by_level.setdefault(level, []).extend(level_frames)
    entries = {}
    for level, frames in by_level.items():
        file_name = f"{mb.level_slug(level)}.xyz"
        ase.io.write(out_dir / file_name, frames, format="extxyz")
        entries[level] = {
            "file": file_name,
            "n_structures": len(frames),
            "forces": all("forces" in frame.calc.results for frame in frames),
            "role": "public sample",
            "origin": "copied (units converted to eV, Angstrom) from "
            + ", ".join(sorted({frame.info["source"] for frame in frames})),
            "sources": dict(Counter(frame.info["source"] for frame in frames)),
            "source_frames": [int(frame.info["source_index"]) for frame in frames],
        }
    return entries, records


def qm7x_pool(shared: Path) -> list[Atoms]:
    """The QM7-X sample's H/C/N/O structures in file order (the relabelling pool)."""
    (dataset,) = read_dataset(shared / "qm7x_small.npz", level="pbe0+mbd", energy_unit="eV")
    kept, _ = element_filter(dataset)
    return [dataset.to_atoms(index) for index in kept]


def main() -> None:
    parser_args = mb.parse_args(__doc__.splitlines()[0], BUNDLE_DIR, DEFAULT_WORK_DIR, shared_dir=DEFAULT_SHARED)
    shared = parser_args.shared
    pool = qm7x_pool(shared)
    build = dataclasses.replace(
        BUILD,
        levels=(
            mb.LevelPlan("gfn2-xtb", len(pool), "relabelled QM7-X"),
            mb.LevelPlan("gfn1-xtb", len(pool), "relabelled QM7-X"),
            mb.LevelPlan("df-hf/sto-3g", N_HF, "relabelled QM7-X"),
            mb.LevelPlan("df-hf/6-31g(d)", N_HF, "relabelled QM7-X"),
        ),
        provenance={"n_pool": len(pool)},
    )
    real_levels: dict[str, dict] = {}
    if parser_args.only is None:
        real_levels, records = write_real_levels(shared, parser_args.out_dir)
        build = dataclasses.replace(build, provenance={**build.provenance, "public_samples": records})
    mb.run_build(build, pool, pool[0], parser_args, levels=real_levels)


if __name__ == "__main__":
    main()

"""Build the bundled `ethanol-multilevel` dataset: MD17 ethanol geometries at several levels of theory.

    python scripts/build_ethanol_multilevel.py [--work-dir build/ethanol_multilevel_work]

Rerunnable and deterministic: a fixed seed picks the MD17 frames, every level is
labelled with `metamlip.labelling.label_structures` into the work directory
(resumable: a rerun continues where a killed one stopped), and the bundled files
are then written from the work files sorted by MD17 frame index / scan point.
Per-level timings go to ``<work-dir>/timings.json``.
"""

from __future__ import annotations

import os

# One thread for OpenMP and BLAS, set before numpy and the QM codes load them.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402

from metamlip.labelling import label_structures  # noqa: E402
from metamlip.levels import normalise_level  # noqa: E402
from metamlip.scans.geometry import scan_geometries  # noqa: E402
from metamlip.units import KCAL_PER_MOL_TO_EV  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MD17_PATH = REPO_ROOT.parent / "shared" / "data" / "md17_ethanol_dft.npz"
BUNDLE_DIR = REPO_ROOT / "metamlip" / "bundled" / "ethanol_multilevel"
DEFAULT_WORK_DIR = REPO_ROOT / "build" / "ethanol_multilevel_work"

SEED = 0
N_CHEAP = 300  # MD17 frames labelled at every cheaper level
MD17_LEVEL = "pbe+vdw-ts"  # level of the original MD17 labels (not recomputed), on the N_CHEAP frames
TARGET_LEVEL = "mp2/cc-pvdz"
# (level, n, role): each level is computed on the first n frames of one seeded random draw of MD17
# frames, so smaller sets are subsets of larger ones. Order = generation order.
LEVEL_PLAN: tuple[tuple[str, int, str], ...] = (
    ("gfn2-xtb", N_CHEAP, "cheap"),
    ("gfn1-xtb", N_CHEAP, "cheap"),
    ("hf/sto-3g", N_CHEAP, "cheap"),
    ("hf/3-21g", N_CHEAP, "cheap"),
    ("hf/6-31g(d)", N_CHEAP, "cheap"),
    (TARGET_LEVEL, 150, "target"),
    ("b3lyp/6-31g(d)", 100, "extra"),
)

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


def level_slug(level: str) -> str:
    """File-name form of a level: 'hf/6-31g(d)' -> 'hf_6-31g_d'."""
    return re.sub(r"[^a-z0-9.+-]+", "_", normalise_level(level)).strip("_")


def select_frames(n_frames: int, count: int) -> np.ndarray:
    """The first `count` MD17 frame indices of the seeded random draw, sorted."""
    draw = np.random.default_rng(SEED).permutation(n_frames)
    return np.sort(draw[:count])


def md17_atoms(data: np.lib.npyio.NpzFile, frames: np.ndarray) -> list[Atoms]:
    return [Atoms(numbers=data["z"], positions=data["R"][frame]) for frame in frames]


def labelled_frame(atoms: Atoms, energy_ev: float, forces: np.ndarray | None, info: dict) -> Atoms:
    """A copy of `atoms` with energy (eV), forces (eV/Angstrom) and exactly the given info."""
    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    results = {"energy": float(energy_ev)}
    if forces is not None:
        results["forces"] = np.asarray(forces)
    frame.calc = SinglePointCalculator(frame, **results)
    frame.info.update(info)
    return frame


def label_timed(structures: list[Atoms], level: str, out_path: Path, workers: int, timings: dict) -> list[Atoms]:
    """Label into `out_path` (resumable), record wall and CPU seconds, return frames sorted by source_index."""
    wall, cpu = time.perf_counter(), time.process_time()
    report = label_structures(structures, level, out_path, workers=workers)
    entry = timings.setdefault(out_path.name, {"n": 0, "wall_s": 0.0, "cpu_s": 0.0})
    entry["n"] += report.n_labelled
    entry["wall_s"] += time.perf_counter() - wall
    entry["cpu_s"] += time.process_time() - cpu
    print(report.summary(), flush=True)
    frames = ase.io.read(out_path, ":") if out_path.exists() else []
    return sorted(frames, key=lambda frame: int(frame.info["source_index"]))


def bundle_level(frames: list[Atoms], md17_frames: np.ndarray, level: str, path: Path) -> list[int]:
    """Write `frames` (source_index = position in `md17_frames`) with source_index = MD17 frame index;
    return the MD17 frame indices written, in file order."""
    out = []
    for frame in frames:
        forces = frame.calc.results.get("forces")
        md17_frame = int(md17_frames[int(frame.info["source_index"])])
        info = {"level_of_theory": level, "energy_unit": "eV", "source_index": md17_frame}
        out.append(labelled_frame(frame, frame.get_potential_energy(), forces, info))
    ase.io.write(path, out, format="extxyz")
    return [int(frame.info["source_index"]) for frame in out]


def bundle_scan(frames: list[Atoms], scan_name: str, level: str, path: Path) -> int:
    """Write scan frames with scan_name, scan_coordinate (degree / Angstrom) and source_index = point index."""
    coordinates = SCANS[scan_name]["coordinates"]
    out = []
    for frame in frames:
        point = int(frame.info["source_index"])
        info = {
            "level_of_theory": level,
            "energy_unit": "eV",
            "scan_name": scan_name,
            "scan_kind": SCANS[scan_name]["kind"],
            "scan_coordinate": coordinates[point],
            "source_index": point,
        }
        out.append(labelled_frame(frame, frame.get_potential_energy(), frame.calc.results.get("forces"), info))
    ase.io.write(path, out, format="extxyz")
    return len(out)


def write_md17_level(data: np.lib.npyio.NpzFile, frames: np.ndarray, path: Path) -> list[int]:
    """The original MD17 labels (kcal/mol, kcal/mol/Angstrom) of `frames`, converted to eV."""
    out = []
    for frame, atoms in zip(frames, md17_atoms(data, frames)):
        energy_ev = float(data["E"][frame].reshape(-1)[0]) * KCAL_PER_MOL_TO_EV
        forces = data["F"][frame] * KCAL_PER_MOL_TO_EV
        info = {"level_of_theory": MD17_LEVEL, "energy_unit": "eV", "source_index": int(frame)}
        out.append(labelled_frame(atoms, energy_ev, forces, info))
    ase.io.write(path, out, format="extxyz")
    return [int(frame) for frame in frames]


def level_entry(file_name: str, source_frames: list[int], has_forces: bool, role: str, origin: str) -> dict:
    """Manifest entry of one level: file, count, forces, role, origin and the MD17 frame of each structure."""
    return {
        "file": file_name,
        "n_structures": len(source_frames),
        "forces": has_forces,
        "role": role,
        "origin": origin,
        "source_frames": source_frames,
    }


def compact_json(value: dict) -> str:
    """Indented JSON with lists of numbers kept on one line."""
    text = json.dumps(value, indent=1)
    return re.sub(r"\[[-0-9.,eE+\s]*\]", lambda match: json.dumps(json.loads(match.group(0))), text)


def scan_inputs(data: np.lib.npyio.NpzFile) -> dict[str, list[Atoms]]:
    base = md17_atoms(data, np.array([SCAN_FRAME]))[0]
    return {
        name: scan_geometries(base, spec["kind"], spec["indices"], np.array(spec["coordinates"]))
        for name, spec in SCANS.items()
    }


def build_level(
    data: np.lib.npyio.NpzFile, level: str, role: str, frames: np.ndarray, args: argparse.Namespace, timings: dict
) -> tuple[dict, dict[str, str]]:
    """Label one level on `frames` and on both scans, write its bundled files.

    Returns the manifest entry and scan name -> scan file.
    """
    slug = level_slug(level)
    labelled = label_timed(md17_atoms(data, frames), level, args.work_dir / f"{slug}.xyz", args.workers, timings)
    written = bundle_level(labelled, frames, level, args.out_dir / f"{slug}.xyz")
    has_forces = all("forces" in frame.calc.results for frame in labelled)
    scan_files = {}
    for scan_name, geometries in scan_inputs(data).items():
        work_path = args.work_dir / f"{scan_name}__{slug}.xyz"
        scan_files[scan_name] = f"scans/{scan_name}__{slug}.xyz"
        bundle_scan(label_timed(geometries, level, work_path, args.workers, timings), scan_name, level,
                    args.out_dir / scan_files[scan_name])
    return level_entry(f"{slug}.xyz", written, has_forces, role, "computed with metamlip label"), scan_files


def manifest(levels: dict[str, dict], scan_files: dict[str, dict[str, str]]) -> dict:
    """Contents of manifest.json: source, units, selection rule, levels, target, scan definitions."""
    return {
        "name": "ethanol-multilevel",
        "source": "MD17 ethanol (Chmiela et al.), file thorben-frank/mlff examples/example_data/ethanol.npz (MIT)",
        "units": {"energy": "eV", "forces": "eV/Angstrom", "positions": "Angstrom"},
        "selection": {
            "seed": SEED,
            "rule": "numpy default_rng(seed).permutation(2000); each level takes the first n frames, sorted",
        },
        "target_level": normalise_level(TARGET_LEVEL),
        "levels": levels,
        "scans": {
            name: {**spec, "base_md17_frame": SCAN_FRAME, "n_points": len(spec["coordinates"]), "files": scan_files[name]}
            for name, spec in SCANS.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="resumable labelling outputs")
    parser.add_argument("--out-dir", type=Path, default=BUNDLE_DIR, help="where the bundled files go")
    parser.add_argument("--workers", type=int, default=1, help="labelling processes (default 1)")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scans").mkdir(parents=True, exist_ok=True)
    timings_path = args.work_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    data = np.load(MD17_PATH)
    n_md17 = len(data["E"])
    md17_file = f"{level_slug(MD17_LEVEL)}.xyz"
    written = write_md17_level(data, select_frames(n_md17, N_CHEAP), args.out_dir / md17_file)
    levels = {MD17_LEVEL: level_entry(md17_file, written, True, "cheap", "MD17 labels, kcal/mol converted to eV")}
    scan_files: dict[str, dict[str, str]] = {name: {} for name in SCANS}
    for level, count, role in LEVEL_PLAN:
        name = normalise_level(level)
        levels[name], files_of_level = build_level(data, name, role, select_frames(n_md17, count), args, timings)
        for scan_name, scan_file in files_of_level.items():
            scan_files[scan_name][name] = scan_file
        timings_path.write_text(json.dumps(timings, indent=1) + "\n")
    (args.out_dir / "manifest.json").write_text(compact_json(manifest(levels, scan_files)) + "\n")
    print(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()

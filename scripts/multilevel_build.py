"""Shared machinery of the bundled multi-level datasets (`build_ethanol_multilevel.py`, ...).

A build script only states its molecule: the pool of source geometries, the levels
(level, count, role, scans), the scan definitions and the manifest text. This module
picks the frames, labels every level with `metamlip.labelling.label_structures` into a
work directory (resumable: a rerun continues where a killed one stopped), writes the
bundled extended XYZ files sorted by source frame / scan point and the ``manifest.json``.

Import this module before numpy: it pins OpenMP and BLAS to one thread.
"""

from __future__ import annotations

import os

# One thread for OpenMP and BLAS, set before numpy and the QM codes load them.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import ase.io  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402

from metamlip.labelling import label_structures  # noqa: E402
from metamlip.labelling.calculation import Label  # noqa: E402
from metamlip.labelling.fingerprint import claim_output, input_fingerprint  # noqa: E402
from metamlip.labelling.output import append_frame, labelled_atoms  # noqa: E402
from metamlip.levels import normalise_level  # noqa: E402
from metamlip.scans.geometry import scan_geometries  # noqa: E402


class LevelPlan(NamedTuple):
    """One level of a build: computed on the first `count` frames of the seeded draw and on every scan."""

    level: str
    count: int
    role: str


@dataclass(frozen=True)
class MultilevelBuild:
    """What a build script specifies.

    Attributes:
        name: bundled dataset name, e.g. ``'ethanol-multilevel'``.
        source: one line on where the geometries come from (manifest ``source``).
        selection_rule: how frames are chosen (manifest ``selection.rule``).
        seed: seed of ``numpy.random.default_rng(seed).permutation(n_pool)``.
        target_level: the expensive level meant for fine-tuning (None for a pre-training set).
        levels: the levels in generation order.
        scans: scan name -> {'kind', 'indices', 'coordinates', 'unit'} (degree or Angstrom).
        scan_base: manifest keys naming the geometry the scans start from, e.g. ``{'base_md17_frame': 0}``.
        provenance: manifest keys written after ``selection`` (e.g. the MD protocol), none by default.
    """

    name: str
    source: str
    selection_rule: str
    seed: int
    target_level: str | None
    levels: tuple[LevelPlan, ...]
    scans: dict[str, dict]
    scan_base: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)


def level_slug(level: str) -> str:
    """File-name form of a level: 'hf/6-31g(d)' -> 'hf_6-31g_d'."""
    return re.sub(r"[^a-z0-9.+-]+", "_", normalise_level(level)).strip("_")


def drawn_frames(n_pool: int, count: int, seed: int) -> np.ndarray:
    """The first `count` pool indices of the seeded random draw, in draw order.

    Levels are labelled in this order, so the frames of a level stopped early are still
    the first frames of the draw (a random subset, nested in every larger level).
    """
    return np.random.default_rng(seed).permutation(n_pool)[:count]


def select_frames(n_pool: int, count: int, seed: int) -> np.ndarray:
    """The first `count` pool indices of the seeded random draw, sorted."""
    return np.sort(drawn_frames(n_pool, count, seed))


def labelled_frame(atoms: Atoms, energy_ev: float, forces: np.ndarray | None, info: dict) -> Atoms:
    """A copy of `atoms` with energy (eV), forces (eV/Angstrom) and exactly the given info."""
    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    results = {"energy": float(energy_ev)}
    if forces is not None:
        results["forces"] = np.asarray(forces)
    frame.calc = SinglePointCalculator(frame, **results)
    frame.info.update(info)
    return frame


class Timings:
    """Wall and CPU seconds per work file in ``<work-dir>/timings.json``.

    Accumulates over resumed runs; `save` merges into the file on disk, so builds of
    different levels may run side by side in separate processes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}
        self.touched: set[str] = set()

    def add(self, key: str, n_labelled: int, wall_s: float, cpu_s: float) -> None:
        entry = self.entries.setdefault(key, {"n": 0, "wall_s": 0.0, "cpu_s": 0.0})
        entry["n"] += n_labelled
        entry["wall_s"] += wall_s
        entry["cpu_s"] += cpu_s
        self.touched.add(key)

    def save(self) -> None:
        on_disk = json.loads(self.path.read_text()) if self.path.exists() else {}
        on_disk.update({key: self.entries[key] for key in self.touched})
        self.entries = on_disk
        self.path.write_text(json.dumps(on_disk, indent=1) + "\n")


def label_timed(
    structures: list[Atoms], level: str, out_path: Path, args: argparse.Namespace, timings: Timings
) -> list[Atoms]:
    """Label into `out_path` (resumable; only read with ``args.write_only``), record wall and CPU
    seconds (this process and its worker processes; also when stopped part way), return the
    frames there sorted by source_index."""
    if not args.write_only:
        before, wall, cpu = frames_in(out_path), time.perf_counter(), cpu_seconds()
        try:
            print(label_structures(structures, level, out_path, workers=args.workers).summary(), flush=True)
        finally:
            timings.add(out_path.name, frames_in(out_path) - before, time.perf_counter() - wall, cpu_seconds() - cpu)
            timings.save()
    frames = ase.io.read(out_path, ":") if out_path.exists() else []
    return sorted(frames, key=lambda frame: int(frame.info["source_index"]))


def frames_in(path: Path) -> int:
    """Frames in an extended-XYZ file (0 when there is none)."""
    return len(ase.io.read(path, ":")) if path.exists() else 0


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished child processes (the labelling workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def seed_work_file(
    structures: list[Atoms], level: str, work_path: Path, bundle_path: Path, work_index: dict[int, int] | None = None
) -> int:
    """Rebuild a missing work file from the bundled file, so a build continues on a machine without
    the work directory; returns the frames copied (0 when the work file exists or nothing is bundled).

    `work_index` maps a bundled ``source_index`` (pool frame) to the position in `structures`
    (identity for scans). The bundled positions must be those of `structures`: a pool that
    differs (another MD, another seed) is an error, never a silent mix.
    """
    if work_path.exists() or not bundle_path.exists():
        return 0
    claim_output(work_path, input_fingerprint(structures, level, 0, 1))
    bundled = ase.io.read(bundle_path, ":")
    for frame in bundled:
        index = int(frame.info["source_index"])
        index = work_index[index] if work_index is not None else index
        source = structures[index]
        if not np.allclose(frame.positions, source.positions, atol=1e-6) or list(frame.numbers) != list(source.numbers):
            raise SystemExit(f"{bundle_path}: source_index {frame.info['source_index']} does not match the pool; rebuild without --from-bundle")
        label = Label(frame.get_potential_energy(), frame.calc.results.get("forces"))
        append_frame(work_path, labelled_atoms(source.numbers, source.positions, label, level, index))
    print(f"{work_path.name}: {len(bundled)} frames taken from {bundle_path}", flush=True)
    return len(bundled)


def bundle_level(frames: list[Atoms], pool_frames: np.ndarray, level: str, path: Path) -> list[int]:
    """Write `frames` (source_index = position in `pool_frames`) sorted by pool frame, with
    source_index = pool frame index; return the pool frame indices written, in file order."""
    out = []
    for frame in sorted(frames, key=lambda frame: int(pool_frames[int(frame.info["source_index"])])):
        forces = frame.calc.results.get("forces")
        pool_frame = int(pool_frames[int(frame.info["source_index"])])
        info = {"level_of_theory": level, "energy_unit": "eV", "source_index": pool_frame}
        out.append(labelled_frame(frame, frame.get_potential_energy(), forces, info))
    ase.io.write(path, out, format="extxyz")
    return [int(frame.info["source_index"]) for frame in out]


def bundle_scan(frames: list[Atoms], scan_name: str, spec: dict, level: str, path: Path) -> int:
    """Write scan frames with scan_name, scan_coordinate (degree / Angstrom) and source_index = point index."""
    out = []
    for frame in frames:
        point = int(frame.info["source_index"])
        info = {
            "level_of_theory": level,
            "energy_unit": "eV",
            "scan_name": scan_name,
            "scan_kind": spec["kind"],
            "scan_coordinate": spec["coordinates"][point],
            "source_index": point,
        }
        out.append(labelled_frame(frame, frame.get_potential_energy(), frame.calc.results.get("forces"), info))
    ase.io.write(path, out, format="extxyz")
    return len(out)


def level_entry(file_name: str, source_frames: list[int], has_forces: bool, role: str, origin: str) -> dict:
    """Manifest entry of one level: file, count, forces, role, origin and the pool frame of each structure."""
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


def scan_inputs(build: MultilevelBuild, base: Atoms) -> dict[str, list[Atoms]]:
    """Scan name -> rigid scan geometries from `base`."""
    return {
        name: scan_geometries(base, spec["kind"], spec["indices"], np.array(spec["coordinates"]))
        for name, spec in build.scans.items()
    }


def build_level(
    build: MultilevelBuild,
    plan: LevelPlan,
    pool: list[Atoms],
    scans: dict[str, list[Atoms]],
    args: argparse.Namespace,
    timings: Timings,
) -> tuple[dict | None, dict[str, str]]:
    """Label one level on its frames of `pool` (in draw order) and on its scans, write its bundled files.

    Returns the manifest entry (None when no frame is labelled or ``args.scans_only``) and
    scan name -> scan file of the complete scans (an incomplete one is left out).
    """
    level = normalise_level(plan.level)
    slug = level_slug(level)
    frames = drawn_frames(len(pool), plan.count, build.seed)
    entry = None
    if not args.scans_only:
        structures = [pool[frame] for frame in frames]
        if args.from_bundle:
            work_index = {int(frame): position for position, frame in enumerate(frames)}
            seed_work_file(structures, level, args.work_dir / f"{slug}.xyz", args.bundle_dir / f"{slug}.xyz", work_index)
        labelled = label_timed(structures, level, args.work_dir / f"{slug}.xyz", args, timings)
        if labelled:
            written = bundle_level(labelled, frames, level, args.out_dir / f"{slug}.xyz")
            has_forces = all("forces" in frame.calc.results for frame in labelled)
            entry = level_entry(f"{slug}.xyz", written, has_forces, plan.role, "computed with metamlip label")
    scan_files = {}
    for scan_name in build.scans:
        work_path = args.work_dir / f"{scan_name}__{slug}.xyz"
        if args.from_bundle:
            seed_work_file(scans[scan_name], level, work_path, args.bundle_dir / "scans" / work_path.name)
        scan_frames = label_timed(scans[scan_name], level, work_path, args, timings)
        if len(scan_frames) < len(scans[scan_name]):
            print(f"{level}: scan {scan_name} has {len(scan_frames)} of {len(scans[scan_name])} points, left out")
            continue
        scan_files[scan_name] = f"scans/{scan_name}__{slug}.xyz"
        bundle_scan(scan_frames, scan_name, build.scans[scan_name], level, args.out_dir / scan_files[scan_name])
    return entry, scan_files


def manifest(build: MultilevelBuild, levels: dict[str, dict], scan_files: dict[str, dict[str, str]]) -> dict:
    """Contents of manifest.json: source, units, selection rule, levels, target, scan definitions."""
    return {
        "name": build.name,
        "source": build.source,
        "units": {"energy": "eV", "forces": "eV/Angstrom", "positions": "Angstrom"},
        "selection": {"seed": build.seed, "rule": build.selection_rule},
        **build.provenance,
        "target_level": normalise_level(build.target_level) if build.target_level else None,
        "levels": levels,
        "scans": {
            name: {**spec, **build.scan_base, "n_points": len(spec["coordinates"]), "files": scan_files[name]}
            for name, spec in build.scans.items()
        },
    }


def parse_args(description: str, bundle_dir: Path, work_dir: Path, shared_dir: Path | None = None) -> argparse.Namespace:
    """Command line shared by the build scripts; creates the work and output folders.

    `shared_dir`: default of ``--shared``, the folder of source data files (the option exists only when given).
    """
    parser = argparse.ArgumentParser(description=description)
    if shared_dir is not None:
        parser.add_argument("--shared", type=Path, default=shared_dir, help=f"source data files (default {shared_dir})")
    parser.add_argument("--work-dir", type=Path, default=work_dir, help="resumable labelling outputs")
    parser.add_argument("--out-dir", type=Path, default=bundle_dir, help="where the bundled files go")
    parser.add_argument("--workers", type=int, default=1, help="labelling processes (default 1)")
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="LEVEL",
        help="label only this level (repeatable) into the work directory and write no manifest; "
        "lets expensive levels run in a separate process; a final run without --only writes the bundle",
    )
    parser.add_argument("--scans-only", action="store_true", help="label the scans, not the frames (with --only)")
    parser.add_argument(
        "--write-only",
        action="store_true",
        help="label nothing: write the bundle and manifest from the work directory as it is "
        "(a level stopped early keeps the first frames of the draw; incomplete scans are left out)",
    )
    parser.add_argument(
        "--from-bundle",
        action="store_true",
        help="first rebuild missing work files from the bundled files (a fresh machine continues a build "
        "instead of recomputing what is bundled)",
    )
    args = parser.parse_args()
    args.bundle_dir = bundle_dir
    args.work_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "scans").mkdir(parents=True, exist_ok=True)
    return args


def run_build(
    build: MultilevelBuild,
    pool: list[Atoms],
    scan_base: Atoms,
    args: argparse.Namespace,
    levels: dict[str, dict] | None = None,
) -> None:
    """Label every planned level on `pool` (index = source frame) and the scans from `scan_base`,
    write the bundled files and, unless ``args.only`` is set, the manifest.

    `levels`: manifest entries of levels written by the caller (e.g. original labels), listed first.
    """
    timings = Timings(args.work_dir / "timings.json")
    only = None if args.only is None else {normalise_level(level) for level in args.only}
    levels = dict(levels or {})
    scan_files: dict[str, dict[str, str]] = {name: {} for name in build.scans}
    scans = scan_inputs(build, scan_base)
    for plan in build.levels:
        name = normalise_level(plan.level)
        if only is not None and name not in only:
            continue
        entry, files_of_level = build_level(build, plan, pool, scans, args, timings)
        if entry is not None:
            levels[name] = entry
        for scan_name, scan_file in files_of_level.items():
            scan_files[scan_name][name] = scan_file
    if only is None and not args.scans_only:
        (args.out_dir / "manifest.json").write_text(compact_json(manifest(build, levels, scan_files)) + "\n")
    print(json.dumps(timings.entries, indent=1))


@dataclass(frozen=True)
class MdProtocol:
    """Langevin MD that samples the geometry pool of a build.

    Attributes:
        method: tblite method, e.g. ``'GFN2-xTB'``.
        temperature_k: thermostat temperature and initial Maxwell-Boltzmann temperature (K).
        timestep_fs: time step (fs).
        friction_per_fs: Langevin friction (1/fs).
        seed: seeds the initial velocities and the thermostat noise.
        n_equilibrate: steps run before the first frame is kept.
        stride: steps between kept frames.
        n_frames: frames kept.
    """

    method: str
    temperature_k: float
    timestep_fs: float
    friction_per_fs: float
    seed: int
    n_equilibrate: int
    stride: int
    n_frames: int


def md_pool(start: Atoms, protocol: MdProtocol, path: Path) -> list[Atoms]:
    """Frames of a tblite Langevin run from `start`, cached in `path` (extended XYZ).

    The pool is always read back from `path`, so a fresh run and a cached one hand the
    same (text-rounded) positions to the labelling.
    """
    if not path.exists():
        from ase import units
        from ase.constraints import FixCom
        from ase.md.langevin import Langevin
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
        from tblite.ase import TBLite

        atoms = start.copy()
        atoms.calc = TBLite(method=protocol.method, verbosity=0)
        atoms.set_constraint(FixCom())  # ASE's recommended replacement of Langevin(fixcm=True)
        rng = np.random.default_rng(protocol.seed)
        MaxwellBoltzmannDistribution(atoms, temperature_K=protocol.temperature_k, rng=rng)
        Stationary(atoms)
        ZeroRotation(atoms)
        dynamics = Langevin(
            atoms,
            timestep=protocol.timestep_fs * units.fs,
            temperature_K=protocol.temperature_k,
            friction=protocol.friction_per_fs / units.fs,
            fixcm=False,
            rng=rng,
        )
        dynamics.run(protocol.n_equilibrate)
        frames = []
        for index in range(protocol.n_frames):
            dynamics.run(protocol.stride)
            frame = Atoms(numbers=atoms.numbers, positions=atoms.positions)
            frame.info.update({"md_frame": index, "md_step": protocol.n_equilibrate + (index + 1) * protocol.stride,
                               "temperature_k": float(atoms.get_temperature())})
            frames.append(frame)
        ase.io.write(path.with_suffix(".partial.xyz"), frames, format="extxyz")
        path.with_suffix(".partial.xyz").rename(path)
    return [Atoms(numbers=frame.numbers, positions=frame.positions) for frame in ase.io.read(path, ":")]

"""The output folder of a training run: claimed once (no silent overwrite), tidied on start.

A folder holds a finished run when it has `model.pt`, a resumable one when it has
`checkpoint.pt`. `claim_run_dir` refuses such a folder unless the caller resumes or
overwrites; `prepare_run_dir` creates the folder and removes the temporary files an
atomic write leaves when the process is killed mid-write (`.NAME.*.tmp`,
`metamlip.atomic_files.write_atomically`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from metamlip.errors import InputError

log = logging.getLogger("metamlip.training")

RUN_FILES: tuple[str, ...] = ("model.pt", "checkpoint.pt")  # a folder holding one of these holds a run


def _check_is_folder(run_dir: Path, key: str) -> None:
    """InputError naming `key` when `run_dir` (or a folder above it) is an existing file."""
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"config key {key!r}: {folder} is an existing file, not a folder")


def claim_run_dir(run_dir: str | Path, resume: bool, overwrite: bool, key: str = "output_dir") -> None:
    """Refuse `run_dir` when it holds a finished or resumable run, unless resuming or overwriting;
    with `overwrite` the previous run's model and checkpoint are removed first."""
    run_dir = Path(run_dir)
    _check_is_folder(run_dir, key)
    existing = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if resume or not existing:
        return
    if not overwrite:
        hint = "--resume to continue it or " if (run_dir / "checkpoint.pt").exists() else ""
        raise InputError(f"{run_dir} already holds a run ({', '.join(p.name for p in existing)}); pass {hint}--overwrite to replace it")
    for path in existing:
        path.unlink(missing_ok=True)  # every torchrun process claims the folder
    log.info("--overwrite: removed %s", ", ".join(str(path) for path in existing))


def prepare_run_dir(run_dir: str | Path, key: str = "output_dir") -> Path:
    """Create `run_dir` and remove temporary files left by an interrupted atomic write."""
    run_dir = Path(run_dir)
    _check_is_folder(run_dir, key)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        for leftover in run_dir.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted checkpoint write", leftover)
    return run_dir

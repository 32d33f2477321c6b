"""Label many structures at one level of theory: parallel, resumable, failures skipped.

Each finished structure is appended to the output at once, so a killed run loses
only the structures in flight; a rerun skips the source indices already there. Ctrl-C
(SIGINT) to a run with workers starts no new structure and writes the ones in flight when
they finish (pool workers ignore SIGINT); a second Ctrl-C stops at once, dropping them.
Work runs in the calling process for ``workers=1`` and in a pool of spawned,
single-threaded processes otherwise (spawned, so a script that calls
`label_structures` with ``workers > 1`` needs the ``if __name__ == "__main__":``
guard). Output order follows completion order; ``info['source_index']`` ties
frames to the input.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from ase import Atoms
from tqdm.auto import tqdm

from metamlip.errors import InputError, OptionError
from metamlip.labelling.calculation import Label, calculate, electron_count
from metamlip.labelling.fingerprint import claim_output, input_fingerprint
from metamlip.labelling.methods import LevelSpec, resolve_level
from metamlip.labelling.output import (
    append_frame,
    completed_indices,
    labelled_atoms,
    write_failures,
)
from metamlip.parent_watch import end_with_parent, stop_pool
from metamlip.labelling.threads import single_threaded, single_threaded_worker

log = logging.getLogger(__name__)

# (source index, atomic numbers (n,), positions (n, 3) in Angstrom)
Job = tuple[int, np.ndarray, np.ndarray]
# (source index, label or None, failure reason or None)
Outcome = tuple[int, Label | None, str | None]


@dataclass
class LabelReport:
    """What one `label_structures` run did.

    Attributes:
        level: normalised level of theory.
        out_path: the extended XYZ output.
        n_structures: structures in the input.
        n_already_done: structures skipped because the output already had them.
        n_labelled: structures labelled and written by this run.
        failures: input index -> reason, for structures that failed in this run.
        wall_time_s: wall-clock time of the run in seconds.
    """

    level: str
    out_path: Path
    n_structures: int
    n_already_done: int = 0
    n_labelled: int = 0
    failures: dict[int, str] = field(default_factory=dict)
    wall_time_s: float = 0.0

    def summary(self) -> str:
        """One line for the terminal."""
        text = (
            f"{self.level}: {self.n_labelled} labelled, {self.n_already_done} already in {self.out_path}, "
            f"{len(self.failures)} failed, of {self.n_structures} structures in {self.wall_time_s:.1f} s"
        )
        if self.failures:
            shown = ", ".join(f"{index} ({reason})" for index, reason in sorted(self.failures.items())[:5])
            text += f"; failed: {shown}" + (" ..." if len(self.failures) > 5 else "")
        return text


def _label_job(spec: LevelSpec, job: Job, charge: int, multiplicity: int) -> Outcome:
    """Run one calculation; any error becomes a failure reason instead of an exception."""
    index, numbers, positions_angstrom = job
    try:
        return index, calculate(spec, numbers, positions_angstrom, charge, multiplicity), None
    except Exception as error:  # noqa: BLE001 - a failing structure must not stop the others
        return index, None, f"{type(error).__name__}: {error}".strip()


def _start_worker(backend: str, parent_pid: int) -> None:
    """Process-pool initializer: end with the parent (no orphans after a kill -9), leave Ctrl-C to the
    parent (which lets the structure in hand finish), run single-threaded."""
    end_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    single_threaded_worker(backend)


class _Calculations:
    """The calculations of one run, here (workers=1) or in a pool of spawned processes."""

    def __init__(self, spec: LevelSpec, jobs: list[Job], workers: int, charge: int, multiplicity: int) -> None:
        self.spec, self.jobs, self.workers = spec, jobs, workers
        self.charge, self.multiplicity = charge, multiplicity
        self.pool: ProcessPoolExecutor | None = None
        self.pending: set[Future] = set()

    def outcomes(self) -> Iterator[Outcome]:
        """Outcomes in completion order."""
        if self.workers == 1 or len(self.jobs) <= 1:
            with single_threaded(self.spec.backend):
                for job in self.jobs:
                    yield _label_job(self.spec, job, self.charge, self.multiplicity)
            return
        self.pool = ProcessPoolExecutor(
            max_workers=min(self.workers, len(self.jobs)),
            mp_context=get_context("spawn"),
            initializer=_start_worker,
            initargs=(self.spec.backend, os.getpid()),
        )
        waiting = iter(self.jobs)
        for _ in range(min(self.workers, len(self.jobs))):
            self._submit_next(waiting)
        while self.pending:
            finished, _ = wait(self.pending, return_when=FIRST_COMPLETED)
            for future in finished:
                self.pending.discard(future)
                yield future.result()
                self._submit_next(waiting)  # after the caller has written it: an interrupt there starts nothing new

    def _submit_next(self, waiting: Iterator[Job]) -> None:
        """Hand the next job to the pool: at most one per worker is ever submitted, so none sits in the
        pool's queue where an interrupt could no longer cancel it."""
        job = next(waiting, None)
        if job is not None:
            self.pending.add(self.pool.submit(_label_job, self.spec, job, self.charge, self.multiplicity))

    def in_flight(self) -> Iterator[Outcome]:
        """After an interrupt: cancel the structures not started, yield the running ones as they finish."""
        running = [future for future in self.pending if not future.cancel()]
        if running:
            log.warning("stopping: %d structure(s) in flight are finished and written first (Ctrl-C again to drop them)", len(running))
        for future in as_completed(running):
            self.pending.discard(future)
            yield future.result()

    def close(self) -> None:
        """Shut the pool down; workers still computing (after a second interrupt) are killed."""
        if self.pool is not None:
            stop_pool(self.pool, kill=any(not future.done() for future in self.pending))


def _check_electrons(index: int, numbers: np.ndarray, charge: int, multiplicity: int) -> None:
    """OptionError naming the flag if `charge` leaves structure `index` no electrons, or fewer than
    `multiplicity` - 1 unpaired ones (parity is checked per structure by `calculate`)."""
    electrons = electron_count(numbers, charge)
    if electrons <= 0:
        raise OptionError(f"structure {index}: {{setting}} leaves {electrons} electrons ({int(np.sum(numbers))} protons)", "charge", charge)
    if multiplicity - 1 > electrons:
        raise OptionError(
            f"structure {index}: {{setting}} needs {multiplicity - 1} unpaired electrons but the structure has {electrons}",
            "multiplicity", multiplicity,
        )


def _check_structures(structures: Sequence[Atoms], charge: int, multiplicity: int) -> None:
    """InputError for a periodic structure or an impossible charge or spin, before anything runs."""
    for index, atoms in enumerate(structures):
        if atoms.pbc.any():
            raise InputError(f"structure {index} is periodic; labelling handles molecules only")
        _check_electrons(index, atoms.get_atomic_numbers(), charge, multiplicity)


def _jobs(structures: Sequence[Atoms], skip: set[int]) -> list[Job]:
    """The structures still to label (indices not in `skip`)."""
    return [(index, atoms.get_atomic_numbers(), atoms.get_positions()) for index, atoms in enumerate(structures) if index not in skip]


def label_structures(
    structures: Sequence[Atoms],
    level: str,
    out_path: str | Path,
    workers: int = 1,
    charge: int = 0,
    multiplicity: int = 1,
    progress: bool = True,
) -> LabelReport:
    """Label `structures` (positions in Angstrom) at `level`, appending to the extended XYZ `out_path`.

    Energies go out in eV, forces in eV/Angstrom (where the method has analytic
    gradients). An existing `out_path` is resumed only if it was labelled from the same
    structures and settings (`metamlip.labelling.fingerprint`: ``OUTPUT.input.json``), and
    its indices are skipped; any other existing file is refused. Failed structures are
    reported by index in the report and in ``OUTPUT.failed.json``.
    """
    if workers < 1:
        raise OptionError(f"{{option}} must be at least 1, got {workers}", "workers", workers)
    if multiplicity < 1:
        raise OptionError(f"{{option}} (the spin multiplicity) must be at least 1, got {multiplicity}", "multiplicity", multiplicity)
    spec = resolve_level(level)
    out_path = Path(out_path)
    _check_structures(structures, charge, multiplicity)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    claim_output(out_path, input_fingerprint(structures, spec.name, charge, multiplicity))
    start = time.perf_counter()
    done = completed_indices(out_path, spec.name)
    jobs = _jobs(structures, done)
    report = LabelReport(spec.name, out_path, len(structures), n_already_done=len(done & set(range(len(structures)))))
    bar = tqdm(total=len(jobs), desc=f"label {spec.name}", unit="structure", disable=not progress)

    def record(outcome: Outcome) -> None:
        index, label, reason = outcome
        if label is None:
            report.failures[index] = reason or "unknown error"
            write_failures(out_path, report.failures)
            log.warning("structure %d failed at %s: %s", index, spec.name, reason)
        else:
            numbers, positions = structures[index].get_atomic_numbers(), structures[index].get_positions()
            append_frame(out_path, labelled_atoms(numbers, positions, label, spec.name, index))
            report.n_labelled += 1
        bar.update(1)
        bar.set_postfix(failed=len(report.failures))

    calculations = _Calculations(spec, jobs, workers, charge, multiplicity)
    try:
        try:
            for outcome in calculations.outcomes():
                record(outcome)
        except KeyboardInterrupt:
            for outcome in calculations.in_flight():
                record(outcome)
            raise
    finally:
        calculations.close()
        bar.close()
        report.wall_time_s = time.perf_counter() - start
    write_failures(out_path, report.failures)
    return report

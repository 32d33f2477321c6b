"""Timing two implementations fairly on a shared machine: their repetitions interleaved (A B, then
B A, ...) so that load from other jobs falls on both alike, and speed compared per back-to-back pair.

Used by the benchmark scripts of this folder (`bench_hipnn.py`, `bench_mace.py`).
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Timing:
    """Seconds per repetition of one measurement, conformers per repetition, and the minor page
    faults of each repetition (fresh pages the process touched: see `metamlip.allocator`)."""

    seconds: list[float]
    conformers: int
    page_faults: list[int] = field(default_factory=list)

    def rates(self) -> list[float]:
        """Conformers per second of each repetition."""
        return [self.conformers / s for s in self.seconds]

    def median_rate(self) -> float:
        return statistics.median(self.rates())


def timed(run: Callable[[], None]) -> float:
    """Wall-clock seconds of one call of `run`."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def minor_page_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(runs: dict[str, Callable[[], None]], repeats: int, conformers: int) -> dict[str, Timing]:
    """Time each run `repeats` times, alternating between them (A B A B ...; the first alternates too)."""
    timings = {name: Timing([], conformers) for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        for name in order:
            faults = minor_page_faults()
            timings[name].seconds.append(timed(runs[name]))
            timings[name].page_faults.append(minor_page_faults() - faults)
    return timings


def paired_speedups(timings: dict[str, Timing], fast: str, slow: str) -> list[float]:
    """Time of `slow` / time of `fast` for each repetition pair (run back to back, so under similar
    load): above 1 where `fast` was the faster of the pair."""
    return [s / f for f, s in zip(timings[fast].seconds, timings[slow].seconds)]


def spread(values: list[float], digits: int = 2) -> str:
    """'median [min - max]' of `values`."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f} - {max(values):.{digits}f}]"

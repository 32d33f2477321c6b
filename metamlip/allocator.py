"""Keep freed memory in the process instead of handing it back to the system after every call.

PyTorch allocates CPU tensors with the C library's `malloc`. glibc hands large blocks back to the
system when they are freed (blocks above the mmap threshold are unmapped, and the heap's free top
is trimmed above the trim threshold), so a batch whose temporaries total tens of MB maps fresh,
zero-filled pages on every call: one page fault per 4 KiB touched. Inference of 64 molecules of
27 atoms took up to 12,600 such faults per batch and up to 1.9x the time, depending on what the
process had run before (BENCHMARKS.md). Raising the two thresholds keeps the memory in the process
(its resident size stays at its peak) and the faults stop.

The `metamlip` command does this at start and `MetamlipCalculator` when built (unless told not to);
other library users call `keep_freed_memory()` themselves, since it changes the whole process. glibc's `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`
environment variables, when set, are left to rule.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB for this process;
    True when done. Does nothing (False) off Linux, without glibc's `mallopt`, or when the user
    has set either threshold through glibc's environment variables."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the process runs on
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1

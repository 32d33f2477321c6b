"""Worker processes end when their parent does, so a kill -9 of `metamlip label`, `experiment` or
`select` leaves no orphans.

A pool worker blocked in a QM calculation never notices that the parent is gone (each holds
hundreds of MB). On Linux the kernel sends the worker SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)`` through ctypes); everywhere a daemon thread also checks once a
second whether the parent's process id has changed (the worker was re-parented) and exits.
Linux sends the signal when the parent *thread* that started the worker ends; `label_structures`
starts its pool from the calling thread and shuts it down before returning, so that thread
outlives the workers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
WATCH_INTERVAL_S = 1.0


def end_with_parent(parent_pid: int) -> None:
    """Make this process exit when the process `parent_pid` (its parent) ends."""
    _set_parent_death_signal()
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="metamlip-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was set up
        os._exit(1)


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    """Exit the process (no cleanup: the parent owns the output) once `parent_pid` is no longer the parent."""
    while os.getppid() == parent_pid:
        time.sleep(WATCH_INTERVAL_S)
    os._exit(1)


def stop_pool(pool: ProcessPoolExecutor, kill: bool) -> None:
    """Shut `pool` down without waiting for queued jobs; with `kill`, its workers are killed (jobs in
    flight are dropped), else they finish what they hold. Returns when every worker has exited."""
    processes = list((pool._processes or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    if kill:
        for process in processes:
            process.kill()
    for process in processes:
        process.join()

"""Keep QM backends single-threaded: one calculation per core is faster than threads.

OpenMP runtimes read OMP_NUM_THREADS once, when the library is loaded, and an
oversubscribed OpenMP runtime on a busy machine can be a hundred times slower
than one thread. So the backend package is imported with the thread variables
set to 1; PySCF's thread count is also set directly (``pyscf.lib.num_threads``).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

THREAD_ENVIRONMENT: tuple[str, ...] = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
BACKEND_IMPORTS: dict[str, str] = {"pyscf": "pyscf.lib", "tblite": "tblite.interface"}


def import_backend_single_threaded(backend: str) -> None:
    """Import the backend's package with the thread variables at 1 (no effect if already imported)."""
    module = BACKEND_IMPORTS[backend]
    if module in sys.modules:
        if backend == "tblite" and os.environ.get("OMP_NUM_THREADS") != "1":
            log.debug("tblite was imported before labelling; its thread count stays as it was")
        return
    saved = {name: os.environ.get(name) for name in THREAD_ENVIRONMENT}
    os.environ.update({name: "1" for name in THREAD_ENVIRONMENT})
    try:
        importlib.import_module(module)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def single_threaded_worker(backend: str) -> None:
    """Process-pool initializer: this worker process runs its backend on one thread."""
    os.environ.update({name: "1" for name in THREAD_ENVIRONMENT})
    import_backend_single_threaded(backend)
    if backend == "pyscf":
        from pyscf import lib

        lib.num_threads(1)


@contextmanager
def single_threaded(backend: str) -> Iterator[None]:
    """Run the backend single-threaded in this process, restoring PySCF's thread count afterwards."""
    import_backend_single_threaded(backend)
    if backend != "pyscf":
        yield
        return
    from pyscf import lib

    previous = lib.num_threads()
    lib.num_threads(1)
    try:
        yield
    finally:
        lib.num_threads(previous)

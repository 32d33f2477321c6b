"""Ctrl-C and SIGTERM during training: finish the epoch, checkpoint, then stop.

`StopRequests` catches SIGINT and SIGTERM while the training loop runs. The first signal
only records the request; the loop checks it after each epoch, writes the resumable
checkpoint and raises `TrainingInterrupted` (exit code 130 for SIGINT, 143 for SIGTERM,
as a shell reports a process ended by that signal). A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("metamlip.training")

HANDLED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal after writing its checkpoint; `exit_code` is 128 + signal number."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_code = 128 + signal_number

    def __reduce__(self) -> tuple:
        """Pickled whole, so that it crosses from a pool worker to the parent intact."""
        return type(self), (str(self), self.exit_code - 128)


class StopRequests:
    """Context manager: while inside, SIGINT/SIGTERM set `signal_number` instead of ending the process.

    Outside the main thread (where handlers cannot be installed) it does nothing.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in HANDLED_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt  # second signal: stop now
        self.signal_number = number
        log.warning("%s: finishing this epoch to write a checkpoint (send it again to stop at once)", signal.Signals(number).name)

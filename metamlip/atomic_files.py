"""Files written atomically: to a temporary file beside the target (`.NAME.*.tmp`), flushed to
disk, then renamed over it, so a killed process leaves the old file or the new one, never half of
one (a leftover temporary file is all it can leave; `metamlip.training.run_dir` removes those)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write` on a binary stream that becomes `path` only once it is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomically(path: str | Path, data: Any, indent: int = 1) -> None:
    """`data` as indented JSON with a final newline, written atomically."""
    text = json.dumps(data, indent=indent) + "\n"  # serialised first: an unserialisable value leaves no file
    write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))

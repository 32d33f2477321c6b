"""Errors about library options, reworded to name the command-line flags a user typed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from metamlip.errors import InputError, OptionError


@contextmanager
def options_as_flags(flags: dict[str, str]) -> Iterator[None]:
    """Inside, an `OptionError` about an option in `flags` (keyword -> flag, e.g.
    ``{"energy_unit": "--energy-unit"}``) becomes an InputError naming the flag."""
    try:
        yield
    except OptionError as error:
        if error.option not in flags:
            raise
        raise InputError(error.for_flag(flags[error.option])) from None

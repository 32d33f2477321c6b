"""Reader options, and how a file's own units and level name combine with them.

Every reader resolves units and level names here, so the precedence is the same for
all layouts: an explicit option, then what the file stores, then the layout's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metamlip.errors import InputError, OptionError
from metamlip.levels import normalise_level
from metamlip.units import energy_unit_to_ev, length_unit_to_angstrom


@dataclass(frozen=True)
class ReadOptions:
    """What the caller of `read_dataset` asked for (see its docstring)."""

    level: str | None = None
    levels: tuple[str, ...] | None = None
    energy_unit: str | None = None
    length_unit: str | None = None
    energy_key: str | None = None
    forces_key: str | None = None


@dataclass(frozen=True)
class Units:
    """Factors that take a file's values to eV, Angstrom and eV/Angstrom."""

    energy_to_ev: float
    length_to_angstrom: float

    @property
    def force_to_ev_per_angstrom(self) -> float:
        return self.energy_to_ev / self.length_to_angstrom


def require_file(path: str | Path, what: str = "file") -> Path:
    """`path` as a Path, or InputError if there is no such file (`what`: e.g. "structure file")."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a {what}")
    if not path.is_file():
        raise InputError(f"{path}: no such {what}")
    return path


def resolve_units(
    where: str,
    options: ReadOptions,
    file_energy_unit: str | None,
    file_length_unit: str | None = None,
) -> Units:
    """Unit factors: an option overrides the file's unit; lengths default to Angstrom.

    An energy unit must come from somewhere: if neither the option nor the file gives one,
    OptionError names `where` and the option `energy_unit`.
    """
    energy_unit = options.energy_unit or file_energy_unit
    length_unit = options.length_unit or file_length_unit or "angstrom"
    if not energy_unit:
        raise OptionError(
            f"{where}: the file does not say its energy unit; pass {{option}} (e.g. {{setting}})", "energy_unit", "kcal/mol"
        )
    try:
        return Units(energy_unit_to_ev(energy_unit), length_unit_to_angstrom(length_unit))
    except ValueError as error:
        raise InputError(f"{where}: {error}") from None


def resolve_level(where: str, options: ReadOptions, stored: str | None, default: str | None = None) -> str:
    """Normalised level name: the `level` option, else the file's, else the layout's default."""
    name = options.level or stored or default
    if not name:
        raise OptionError(
            f"{where}: the file does not say its level of theory; pass {{option}} (e.g. {{setting}})", "level", "wb97x/6-31g(d)"
        )
    try:
        return normalise_level(name)
    except ValueError as error:
        raise InputError(f"{where}: level of theory {name!r}: {error}") from None


def check_levels_found(where: str, wanted: tuple[str, ...] | None, available: list[str]) -> None:
    """InputError naming `where` and the levels it has if a wanted level is not among them."""
    missing = [name for name in wanted or () if name not in available]
    if missing:
        raise InputError(f"{where}: no level {missing[0]!r} in the file; levels found: {available}")

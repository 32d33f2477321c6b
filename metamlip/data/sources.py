"""The configured data sources (``datasets:`` entries) as levels of theory.

A source is read into memory by `metamlip.readers.read_dataset`, except a packed level folder
(``format: packed``, written by `metamlip pack`), which is opened lazily by memory map. Every
command that reads configured data (`train`, `pretrain`, `finetune`, `experiment`) goes
through here, so each of them accepts both.
"""

from __future__ import annotations

from metamlip.config import DataSource
from metamlip.data.lazy_batching import LevelData
from metamlip.data.packed import open_packed
from metamlip.errors import InputError
from metamlip.levels import normalise_level
from metamlip.readers import read_dataset
from metamlip.readers.dispatch import only_level


def read_source(source: DataSource) -> list[LevelData]:
    """The levels of one source: a packed folder opened lazily, any other file read into memory."""
    options = source.reader_options()
    if str(options["format"] or "").strip().lower() == "packed":
        del options["format"]
        return open_packed(source.path, **options)
    return read_dataset(source.path, **options)


def read_source_level(source: DataSource) -> LevelData:
    """The one level of a source (choose with ``levels: [...]`` when the file holds several)."""
    return only_level(source.path, read_source(source))


def read_sources(sources: list[DataSource], wanted: list[str] | None = None) -> dict[str, LevelData]:
    """The levels of the sources, by normalised name: all of them, or the `wanted` ones in that
    order. A level found in two sources, or a wanted level found nowhere, is an InputError."""
    if not sources:
        raise InputError("config key 'datasets' lists no data")
    found: dict[str, LevelData] = {}
    for source in sources:
        for dataset in read_source(source):
            if dataset.level in found:
                raise InputError(f"level {dataset.level!r} comes from both {found[dataset.level].source} and {dataset.source}")
            found[dataset.level] = dataset
    if wanted is None:
        return found
    names = [normalise_level(level) for level in wanted]
    missing = [level for level in names if level not in found]
    if missing:
        raise InputError(f"levels {missing} are in none of the datasets; the datasets hold {sorted(found)}")
    return {level: found[level] for level in names}

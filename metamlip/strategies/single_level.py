"""`single:LEVEL`: single-level transfer, the baseline of "pre-train on the one closest dataset":
joint training on one pre-training level alone, then fine-tuning as `joint`."""

from __future__ import annotations

from metamlip.errors import InputError
from metamlip.levels import normalise_level
from metamlip.strategies.joint import Joint

PREFIX = "single:"


class SingleLevel(Joint):
    def __init__(self, level: str):
        self.level = normalise_level(level)
        self.name = PREFIX + self.level

    def pretraining_splits(self, splits: dict) -> dict:
        if self.level not in splits:
            raise InputError(f"strategy {self.name!r}: {self.level!r} is not a pre-training level: {sorted(splits)}")
        return {self.level: splits[self.level]}

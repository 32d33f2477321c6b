"""`embedding`: one shared head, and a learned vector per level of theory appended to the atom
features of the backbone's input (as SevenNet's multi-fidelity "modal" input, multi-fidelity
M3GNet, UMA's task input). Trained like `joint`; a new level gets a new vector, the mean of the
pre-trained ones, which fine-tuning trains with the rest of the model."""

from __future__ import annotations

import dataclasses

from metamlip.config import ModelSection
from metamlip.strategies.joint import Joint

DEFAULT_LEVEL_FEATURES = 16


class Embedding(Joint):
    name = "embedding"

    def model_section(self, section: ModelSection) -> ModelSection:
        """The model with level embeddings (`model.n_level_features`, 16 when the config leaves it 0)."""
        return dataclasses.replace(section, n_level_features=section.n_level_features or DEFAULT_LEVEL_FEATURES)

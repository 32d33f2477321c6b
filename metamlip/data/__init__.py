"""Level datasets, per-level energy references, neighbour pairs and batches."""

from metamlip.data.level_dataset import LevelDataset

__all__ = ["LevelDataset"]

"""Optional TensorBoard logging of every epoch (`training.tensorboard: true`).

Scalars go to OUTPUT_DIR/tensorboard: the epoch record of `log.jsonl` (train and validation
losses and errors, learning rate) and, with several levels, each level's validation metrics
under ``<metric>/<level>``. Needs the `tensorboard` package (``pip install metamlip[tensorboard]``).
"""

from __future__ import annotations

import math
from pathlib import Path

from metamlip.errors import InputError

TENSORBOARD_DIR = "tensorboard"


class EpochBoard:
    """A `torch.utils.tensorboard.SummaryWriter` fed one epoch record at a time."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise InputError(
                "config key 'training.tensorboard' is true but the tensorboard package is missing: pip install metamlip[tensorboard]"
            ) from None
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def write(self, record: dict, per_level: dict[str, dict[str, float]]) -> None:
        """Scalars of one epoch: `record` (keys of log.jsonl) and per-level validation metrics."""
        epoch = record["epoch"]
        for name, value in record.items():
            if name != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(name, value, epoch)
        for level, metrics in per_level.items():
            for name, value in metrics.items():
                self.writer.add_scalar(f"{name}/{level}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

"""Typed configuration of `metamlip pretrain`, `finetune` and `experiment` (keys in the README)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metamlip.config import DataSource, ModelSection, TrainingSection
from metamlip.strategies import PretrainBudget, ReptileSettings


@dataclass
class PretrainSection:
    """The budget every strategy gets, and how pre-training levels are split.

    `reference_anchors`: level -> anchor level; the level's per-element energy reference is the
    anchor's plus a correction fitted on the geometries both label (`EnergyReference.fit_anchored`),
    for a level of too few formulas to determine its own."""

    gradient_steps: int = 3000
    wall_seconds: float | None = None
    steps_per_epoch: int = 100
    task_sampling: str = "size"
    validation_fraction: float = 0.1
    until: str = "steps"
    patience: int = 10
    training: TrainingSection = field(default_factory=TrainingSection)
    reptile: ReptileSettings = field(default_factory=ReptileSettings)
    reference_anchors: dict[str, str] = field(default_factory=dict)

    def budget(self) -> PretrainBudget:
        return PretrainBudget(
            gradient_steps=self.gradient_steps,
            wall_seconds=self.wall_seconds,
            steps_per_epoch=self.steps_per_epoch,
            task_sampling=self.task_sampling,
            reptile=self.reptile,
            until=self.until,
            patience=self.patience,
        )


@dataclass
class FinetuneSection:
    """Fine-tuning: sizes N of the target training set, seeds, validation, training settings."""

    n_finetune: list[int] = field(default_factory=lambda: [10, 25, 100])
    seeds: int = 2
    validation_fraction: float = 0.2
    min_validation: int = 2
    freeze_backbone: bool = False
    head_source: str | None = None
    training: TrainingSection = field(default_factory=TrainingSection)

    def n_validation(self, n_finetune: int) -> int:
        """Validation structures drawn beside N training structures."""
        return max(self.min_validation, int(round(self.validation_fraction * n_finetune)))


@dataclass
class ScanSource:
    """A reference 1-D scan at the target level: extended XYZ frames with info['scan_coordinate'].
    The model is scanned rigidly from the first frame's geometry with the same atoms."""

    name: str = ""
    path: str = ""
    kind: str = "torsion"
    indices: list[int] = field(default_factory=list)


@dataclass
class PretrainConfig:
    """`metamlip pretrain`: one strategy on the listed levels; writes OUTPUT_DIR/model.pt."""

    datasets: list[DataSource] = field(default_factory=list)
    levels: list[str] | None = None
    strategy: str = "reptile"
    split_seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    output_dir: str = "runs/pretrain"


@dataclass
class FinetuneConfig:
    """`metamlip finetune`: a pre-trained checkpoint (a file, or the name of a shipped model:
    `metamlip.pretrained`) refitted to one target level. `new_elements`: error (default) or add,
    what an element of the target data that the model does not know does (`FinetuneOptions`)."""

    checkpoint: str = ""
    dataset: DataSource = field(default_factory=DataSource)
    n_finetune: int = 50
    n_validation: int | None = None
    n_test: int | None = None
    split_seed: int = 0
    freeze_backbone: bool = False
    head_source: str | None = None
    new_elements: str = "error"
    training: TrainingSection = field(default_factory=TrainingSection)
    output_dir: str = "runs/finetune"


@dataclass
class SelectionSection:
    """`metamlip select`: leave-one-level-out proxy tasks. Each proxy level in turn plays the target
    (same N, its own held-out test set of `n_test`), pre-training on the other pre-training levels;
    every point of a strategy's `grid` (dotted keys of `pretrain.`, `finetune.` or `model.` with lists
    of values; all combinations) is scored by the geometric mean of its proxy test energy MAEs over
    proxies, N and seeds. The target level is never read."""

    proxy_levels: list[str] = field(default_factory=list)
    n_finetune: list[int] = field(default_factory=lambda: [10])
    seeds: int = 2
    n_test: int = 50
    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    """`metamlip experiment`: every strategy pre-trained with one budget, fine-tuned for every N and seed,
    tested on a held-out target test set that no training or validation ever sees.

    `selection_file`: a ``selection.json`` of `metamlip select`; its chosen settings apply to the
    strategies run that `strategy_settings` does not list, and its proxy scores go into the results."""

    datasets: list[DataSource] = field(default_factory=list)
    pretrain_levels: list[str] = field(default_factory=list)
    target_level: str = ""
    strategies: list[str] = field(default_factory=lambda: ["scratch", "joint", "multihead", "reptile"])
    strategy_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    selection_file: str | None = None
    n_test: int = 50
    split_seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    scans: list[ScanSource] = field(default_factory=list)
    selection: SelectionSection = field(default_factory=SelectionSection)
    threads: int | None = None
    workers: int = 1
    output_dir: str = "runs/experiment"

"""Fine-tuning a (pre-trained) potential to a target level of theory with few structures."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from metamlip import distributed
from metamlip.config import SplitConfig
from metamlip.data.batching import Batcher
from metamlip.data.lazy_batching import LevelData, make_batcher
from metamlip.data.references import EnergyReference
from metamlip.data.sources import read_source_level
from metamlip.errors import InputError
from metamlip.evaluation.metrics import ErrorMetrics, evaluate
from metamlip.experiment.config import FinetuneConfig
from metamlip.model.new_species import add_species, elements_to_add
from metamlip.model.potential import Potential
from metamlip.pretrained import checkpoint_or_shipped
from metamlip.strategies import Strategy, get_strategy
from metamlip.training.checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from metamlip.training.loop import FitResult, MixedBatchEpochs, Task, TrainingSettings, fit
from metamlip.training.refit import refit_reference
from metamlip.training.run_training import split_dataset, training_settings, use_threads, write_test_metrics


@dataclass(frozen=True)
class FinetuneOptions:
    """How the target level joins the model.

    Attributes:
        freeze_backbone: train only the energy head(s), keep the backbone fixed.
        head_source: multihead only: the pre-training level whose head the new head copies
            (default: the mean of all heads).
        refit_reference: after training, refit the target reference on the fine-tuning
            structures (`metamlip.training.refit`).
        new_elements: "error": an element of the fine-tuning structures that the model does not
            know is an InputError naming it; "add": it joins the model's species with freshly
            initialised weights (`metamlip.model.new_species.add_species`), learnt from the
            fine-tuning structures, which must hold it.
    """

    freeze_backbone: bool = False
    head_source: str | None = None
    refit_reference: bool = True
    new_elements: str = "error"


def finetune(
    pretrained: Potential,
    strategy: Strategy,
    train: LevelData,
    validation: LevelData,
    settings: TrainingSettings,
    run_dir: str | Path,
    options: FinetuneOptions = FinetuneOptions(),
    resume: bool = False,
) -> tuple[Potential, FitResult]:
    """A copy of `pretrained` refitted to the level of `train`; `pretrained` is left unchanged.

    The target reference is fitted on `train` only; validation drives early stopping and
    the choice of the best weights. Nothing else of the target level is seen. Elements the model
    does not know: `options.new_elements`. With `resume` training continues from
    RUN_DIR/checkpoint.pt (`fit`).
    """
    model = with_target_level(pretrained, strategy, train, validation, options)
    level = train.level
    if options.freeze_backbone:
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(False)
    dtype = next(model.parameters()).dtype

    def batcher(dataset: LevelData) -> Batcher:
        return make_batcher(dataset, model.species, model.config.cutoff_angstrom, dtype)

    task = Task(level, batcher(train), batcher(validation) if len(validation) else None)
    result = fit(model, MixedBatchEpochs([task], settings), [task], settings, run_dir, resume=resume)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if options.refit_reference:
        refit_reference(model, task.train, level)
    return model, result


def with_target_level(
    pretrained: Potential, strategy: Strategy, train: LevelData, validation: LevelData, options: FinetuneOptions = FinetuneOptions()
) -> Potential:
    """A copy of `pretrained` that knows the level of `train`, untrained: the strategy's head for it,
    its reference fitted on `train`, elements it lacked per `options.new_elements`. Where
    fine-tuning starts."""
    model = copy.deepcopy(pretrained)
    level = train.level
    if level in model.level_heads:
        raise InputError(f"target level {level!r} is already one of the model's levels {model.levels}")
    add_species(model, elements_to_add(model.species, [train, validation], train, options.new_elements))
    head = strategy.finetune_head(model, level, options.head_source)
    model.add_level(EnergyReference.fit(train, model.species), head, embedding_from_mean=True)
    return model


def run_finetuning(config: FinetuneConfig, resume: bool = False) -> tuple[Path, ErrorMetrics | None]:
    """`metamlip finetune`: split the target level, refit the checkpoint, test, save OUTPUT_DIR/model.pt
    (and OUTPUT_DIR/test_metrics.json when there is a test set)."""
    checkpoint = checkpoint_or_shipped(config.checkpoint, Path(config.checkpoint).expanduser())
    payload = read_checkpoint(checkpoint)
    pretrained = model_from_checkpoint(payload, checkpoint)
    strategy = get_strategy(payload["extra"].get("strategy", "joint"))
    target = read_source_level(config.dataset)
    use_threads(config.training.threads, [target])
    n_validation = config.n_validation if config.n_validation is not None else max(2, round(0.2 * config.n_finetune))
    split = SplitConfig(seed=config.split_seed, train=config.n_finetune, validation=n_validation, test=config.n_test)
    parts = split_dataset(target, split, keys=("n_finetune", "n_validation", "n_test"))
    elements_to_add(pretrained.species, [target], parts.train, config.new_elements)  # test structures too, before training
    run_dir = Path(config.output_dir)
    options = FinetuneOptions(config.freeze_backbone, config.head_source, config.training.refit_reference, config.new_elements)
    model, _ = finetune(pretrained, strategy, parts.train, parts.validation, training_settings(config.training), run_dir, options, resume)
    if distributed.is_main_process():
        save_checkpoint(run_dir / "model.pt", model, extra={"strategy": strategy.name, "finetuned_level": target.level})
    distributed.barrier()
    metrics = None
    if len(parts.test):
        metrics = evaluate(model, make_batcher(parts.test, model.species, model.config.cutoff_angstrom, next(model.parameters()).dtype))
        if distributed.is_main_process():
            write_test_metrics(run_dir, {target.level: metrics})
    return run_dir / "model.pt", metrics

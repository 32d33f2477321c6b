"""Strategies: Reptile's meta-step arithmetic, its k = 1 equivalence with joint training,
per-level references, multi-head fine-tuning and the untouched target test set."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from metamlip.config import ModelSection
from metamlip.data.references import EnergyReference
from metamlip.errors import InputError
from metamlip.finetune import finetune
from metamlip.pretrain import level_tasks, pretrain
from metamlip.readers import read_level
from metamlip.strategies import PretrainBudget, ReptileSettings, get_strategy
from metamlip.strategies.reptile import ReptileEpochs, annealed_epsilon, meta_step_update
from metamlip.training.loop import TrainingSettings, train_steps
from metamlip.training.run_training import LevelSplit, new_potential

SMALL_MODEL = ModelSection(n_features=12, n_sensitivities=6, n_interaction_layers=1, n_atom_layers=1, cutoff_angstrom=5.0, seed=1)
SETTINGS = TrainingSettings(batch_size=8, learning_rate=1e-3, max_epochs=2, progress=False)


@pytest.fixture(scope="module")
def splits(data_dir) -> dict[str, LevelSplit]:
    """Two real levels: MD17 ethanol (PBE+vdW-TS) and a QM7-X C6H12 isomer (PBE0+MBD)."""
    ethanol = read_level(data_dir / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level="pbe+vdw-ts")
    qm7x = read_level(data_dir / "qm7x_226_raw.npz")
    return {
        dataset.level: LevelSplit(dataset.subset(range(0, 40)), dataset.subset(range(40, 50)), dataset.subset(range(50, 60)))
        for dataset in (ethanol, qm7x)
    }


def model_and_tasks(splits, strategy_name="joint"):
    strategy = get_strategy(strategy_name)
    model = new_potential(SMALL_MODEL, [1, 6, 8])
    for index, (level, split) in enumerate(splits.items()):
        model.add_level(EnergyReference.fit(split.train, model.species), strategy.head_for_level(level, index))
    return model, level_tasks(model, splits, SMALL_MODEL.cutoff_angstrom, torch.float32)


def test_reptile_with_one_inner_step_one_task_and_epsilon_one_is_joint_training(splits):
    model, tasks = model_and_tasks(splits)
    joint_model = copy.deepcopy(model)
    initial_weights = parameters_to_vector(model.parameters()).detach().clone()
    reptile = ReptileSettings(inner_steps=1, tasks_per_meta_step=1, epsilon_start=1.0, epsilon_end=1.0, inner_learning_rate=1e-3)
    plan = ReptileEpochs(tasks, SETTINGS, reptile, meta_steps_per_epoch=6)
    optimizer = plan.make_optimizer(list(model.parameters()), SETTINGS)
    plan.run_epoch(model, optimizer, epoch=1)

    batches = [batch for _, work in plan.epoch_meta_steps(1) for _, task_batches in work for batch in task_batches]
    assert len(batches) == 6 and len({batch.level for batch in batches}) == 2
    joint_optimizer = torch.optim.Adam(joint_model.parameters(), lr=1e-3, fused=True)
    train_steps(joint_model, joint_optimizer, batches, SETTINGS.loss)

    reptile_weights, joint_weights = parameters_to_vector(model.parameters()), parameters_to_vector(joint_model.parameters())
    assert not torch.allclose(reptile_weights, initial_weights)
    torch.testing.assert_close(reptile_weights, joint_weights, rtol=1e-6, atol=1e-7)


def test_meta_step_moves_weights_by_epsilon_times_mean_inner_difference(splits):
    model, tasks = model_and_tasks(splits)
    reptile = ReptileSettings(inner_steps=3, tasks_per_meta_step=2, inner_learning_rate=3e-3)
    plan = ReptileEpochs(tasks, SETTINGS, reptile, meta_steps_per_epoch=1)
    optimizer = plan.make_optimizer(list(model.parameters()), SETTINGS)
    (_, work), = list(plan.epoch_meta_steps(1))
    assert {task.level for task, _ in work} == set(splits)

    theta = parameters_to_vector(model.parameters()).detach().clone()
    adapted = []
    for _, batches in work:
        inner_model = copy.deepcopy(model)
        inner_optimizer = torch.optim.Adam(inner_model.parameters(), lr=3e-3, fused=True)
        train_steps(inner_model, inner_optimizer, batches, SETTINGS.loss)
        adapted.append(parameters_to_vector(inner_model.parameters()).detach())
    epsilon = 0.3
    expected = theta + epsilon * ((adapted[0] - theta) + (adapted[1] - theta)) / 2

    meta_step_update(model, list(model.parameters()), optimizer, work, epsilon, SETTINGS)
    torch.testing.assert_close(parameters_to_vector(model.parameters()).detach(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(expected, theta)


def test_epsilon_anneals_linearly():
    settings = ReptileSettings(epsilon_start=1.0, epsilon_end=0.2)
    assert annealed_epsilon(settings, 0, 5) == pytest.approx(1.0)
    assert annealed_epsilon(settings, 2, 5) == pytest.approx(0.6)
    assert annealed_epsilon(settings, 4, 5) == pytest.approx(0.2)


@pytest.mark.parametrize("strategy_name", ["joint", "multihead", "reptile"])
def test_pretraining_keeps_one_reference_per_level(splits, strategy_name, tmp_path):
    budget = PretrainBudget(gradient_steps=12, steps_per_epoch=6, reptile=ReptileSettings(inner_steps=2, tasks_per_meta_step=2))
    model, result = pretrain(get_strategy(strategy_name), splits, [1, 6, 8], SMALL_MODEL, SETTINGS, budget, tmp_path)
    assert result.epochs_run == 2
    for level, split in splits.items():
        expected = EnergyReference.fit(split.train, model.species).energy_per_element_ev
        np.testing.assert_allclose(model.references[level].energy_per_element_ev, expected)
    first, second = (model.references[level].energy_per_element_ev for level in splits)
    assert not np.allclose(first, second)
    heads = set(model.level_heads.values())
    assert len(heads) == (2 if strategy_name == "multihead" else 1)


def test_multihead_finetuning_starts_from_the_mean_head(splits, tmp_path):
    strategy = get_strategy("multihead")
    model, _ = model_and_tasks(splits, "multihead")
    with torch.no_grad():
        for parameter in model.heads.parameters():
            parameter.normal_()
    target = splits["pbe+vdw-ts"].train
    renamed = copy.deepcopy(target)
    renamed.level = "mp2/cc-pvdz"
    head = strategy.finetune_head(model, "mp2/cc-pvdz", None)
    for key, value in model.heads[head].state_dict().items():
        mean = (model.heads["level0"].state_dict()[key] + model.heads["level1"].state_dict()[key]) / 2
        torch.testing.assert_close(value, mean)
    with pytest.raises(InputError, match="head_source"):
        strategy.finetune_head(model, "mp2/cc-pvdz", "ccsd(t)/cbs")


def test_finetuning_sees_only_its_train_and_validation_data(splits, tmp_path, monkeypatch):
    pretrained, _ = model_and_tasks(splits)
    target = splits["pbe0+mbd"]
    seen: list[int] = []
    import metamlip.data.batching as batching

    original = batching.StructureBatcher.__init__

    def recording_init(self, dataset, *args, **kwargs):
        seen.extend(np.round(dataset.energies_ev, 9).tolist())
        original(self, dataset, *args, **kwargs)

    monkeypatch.setattr(batching.StructureBatcher, "__init__", recording_init)
    renamed_train, renamed_validation = copy.deepcopy(target.train), copy.deepcopy(target.validation)
    renamed_train.level = renamed_validation.level = "target-level"
    model, _ = finetune(pretrained, get_strategy("joint"), renamed_train, renamed_validation, SETTINGS, tmp_path)
    test_energies = set(np.round(target.test.energies_ev, 9).tolist())
    assert seen and not test_energies & set(seen)
    assert "target-level" in model.levels and "target-level" not in pretrained.levels


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(InputError, match="unknown strategy 'maml'"):
        get_strategy("maml")

"""The Reptile family, level embeddings, single-level transfer and convergence-based pre-training:
their arithmetic against hand-made references on real data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from metamlip.config import ModelSection
from metamlip.data.references import EnergyReference
from metamlip.finetune import finetune
from metamlip.pretrain import level_tasks, pretrain, pretraining_summary
from metamlip.readers import read_level
from metamlip.strategies import PretrainBudget, ReptileSettings, get_strategy
from metamlip.strategies.fomaml import FomamlEpochs
from metamlip.strategies.reptile import ReptileEpochs, meta_step_update, task_specific_mask
from metamlip.training.checkpoint import load_potential, save_checkpoint
from metamlip.training.loop import TrainingSettings, train_steps
from metamlip.training.loss import batch_loss
from metamlip.training.run_training import LevelSplit, new_potential

SMALL_MODEL = ModelSection(n_features=12, n_sensitivities=6, n_interaction_layers=1, n_atom_layers=1, cutoff_angstrom=5.0, seed=1)
SETTINGS = TrainingSettings(batch_size=8, learning_rate=1e-3, max_epochs=2, progress=False)


@pytest.fixture(scope="module")
def splits(data_dir) -> dict[str, LevelSplit]:
    """Three real levels: MD17 ethanol (PBE+vdW-TS), a QM7-X C6H12 isomer (PBE0+MBD) and the ethanol
    energies again under another level name (energy-only, a stand-in for a third level)."""
    ethanol = read_level(data_dir / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level="pbe+vdw-ts")
    qm7x = read_level(data_dir / "qm7x_226_raw.npz")
    return {
        dataset.level: LevelSplit(dataset.subset(range(0, 40)), dataset.subset(range(40, 50)), dataset.subset(range(50, 60)))
        for dataset in (ethanol, qm7x)
    }


def model_and_tasks(splits, strategy_name):
    strategy = get_strategy(strategy_name)
    model = new_potential(strategy.model_section(SMALL_MODEL), [1, 6, 8])
    for index, (level, split) in enumerate(splits.items()):
        model.add_level(EnergyReference.fit(split.train, model.species), strategy.head_for_level(level, index))
    return model, level_tasks(model, splits, SMALL_MODEL.cutoff_angstrom, torch.float32)


def adapted_copy(model, batches, optimizer_factory):
    inner = copy.deepcopy(model)
    train_steps(inner, optimizer_factory(inner.parameters()), batches, SETTINGS.loss)
    return inner


def test_reptile_multihead_interpolates_the_backbone_and_keeps_each_adapted_head(splits):
    model, tasks = model_and_tasks(splits, "reptile_multihead")
    assert set(model.level_heads.values()) == {"level0", "level1"}
    reptile = ReptileSettings(inner_steps=3, tasks_per_meta_step=2, inner_learning_rate=3e-3)
    plan = ReptileEpochs(tasks, SETTINGS, reptile, meta_steps_per_epoch=1, per_level_heads=True)
    parameters = list(model.parameters())
    optimizer = plan.make_optimizer(parameters, SETTINGS)
    (_, work), = list(plan.epoch_meta_steps(1))
    inner = [adapted_copy(model, batches, lambda p: torch.optim.Adam(p, lr=3e-3, fused=True)) for _, batches in work]
    epsilon = 0.3
    meta_step_update(model, parameters, optimizer, work, epsilon, SETTINGS, task_specific_mask(model, parameters))

    backbone = lambda m: parameters_to_vector(m.backbone.parameters()).detach()  # noqa: E731
    theta = backbone(model_and_tasks(splits, "reptile_multihead")[0])
    expected = theta + epsilon * ((backbone(inner[0]) - theta) + (backbone(inner[1]) - theta)) / 2
    torch.testing.assert_close(backbone(model), expected, rtol=1e-6, atol=1e-7)
    for (task, _), adapted in zip(work, inner):
        head = model.level_heads[task.level]
        torch.testing.assert_close(
            parameters_to_vector(model.heads[head].parameters()), parameters_to_vector(adapted.heads[head].parameters()), rtol=1e-6, atol=1e-7
        )


def test_reptile_multihead_one_task_leaves_the_other_heads_and_their_optimiser_state(splits):
    model, tasks = model_and_tasks(splits, "reptile_multihead")
    plan = ReptileEpochs(tasks, SETTINGS, ReptileSettings(inner_steps=2, tasks_per_meta_step=1), meta_steps_per_epoch=1, per_level_heads=True)
    parameters = list(model.parameters())
    optimizer = plan.make_optimizer(parameters, SETTINGS)
    (_, work), = list(plan.epoch_meta_steps(1))
    trained_head = model.level_heads[work[0][0].level]
    other = next(name for name in model.heads if name != trained_head)
    before = parameters_to_vector(model.heads[other].parameters()).detach().clone()
    meta_step_update(model, parameters, optimizer, work, 0.5, SETTINGS, task_specific_mask(model, parameters))
    torch.testing.assert_close(parameters_to_vector(model.heads[other].parameters()), before)
    assert all(p not in optimizer.state for p in model.heads[other].parameters())


def test_fomaml_with_one_step_is_joint_training(splits):
    model, tasks = model_and_tasks(splits, "fomaml")
    joint_model = copy.deepcopy(model)
    plan = FomamlEpochs(tasks, SETTINGS, ReptileSettings(inner_steps=1, tasks_per_meta_step=1), meta_steps_per_epoch=5)
    optimizer = plan.make_optimizer(list(model.parameters()), SETTINGS)
    plan.run_epoch(model, optimizer, 1)
    batches = [batch for _, work in plan.epoch_meta_steps(1) for _, task_batches in work for batch in task_batches]
    train_steps(joint_model, torch.optim.Adam(joint_model.parameters(), lr=SETTINGS.learning_rate, fused=True), batches, SETTINGS.loss)
    torch.testing.assert_close(parameters_to_vector(model.parameters()), parameters_to_vector(joint_model.parameters()), rtol=1e-6, atol=1e-7)


def test_fomaml_steps_along_the_mean_gradient_at_the_adapted_weights(splits):
    model, tasks = model_and_tasks(splits, "fomaml")
    start = copy.deepcopy(model)
    reptile = ReptileSettings(inner_steps=3, tasks_per_meta_step=2, inner_learning_rate=1e-3)
    plan = FomamlEpochs(tasks, SETTINGS, reptile, meta_steps_per_epoch=1)
    optimizer = plan.make_optimizer(list(model.parameters()), SETTINGS)
    plan.run_epoch(model, optimizer, 1)

    (_, work), = list(plan.epoch_meta_steps(1))
    gradients = []
    for _, batches in work:
        inner = adapted_copy(start, batches[:-1], lambda p: torch.optim.SGD(p, lr=1e-3))
        inner.zero_grad()
        batch_loss(inner, batches[-1], SETTINGS.loss).total.backward()
        gradients.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in inner.parameters()])
    expected = copy.deepcopy(start)
    for parameter, *task_gradients in zip(expected.parameters(), *gradients):
        parameter.grad = sum(task_gradients) / len(task_gradients)
    torch.optim.Adam(expected.parameters(), lr=SETTINGS.learning_rate, fused=True).step()
    torch.testing.assert_close(parameters_to_vector(model.parameters()), parameters_to_vector(expected.parameters()), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(parameters_to_vector(model.parameters()), parameters_to_vector(start.parameters()))


def test_level_embeddings_change_the_energy_start_new_levels_at_the_mean_and_survive_a_checkpoint(splits, tmp_path):
    model, tasks = model_and_tasks(splits, "embedding")
    assert model.config.n_level_features == 16 and len(model.level_embeddings) == 2
    first, second = (model.level_features(level) for level in splits)
    assert not torch.allclose(first, second)
    batch = next(tasks[0].train.batches(4))
    energies = {level: model(batch, level=level, forces=False).residual_energy_ev.detach() for level in splits}
    assert not torch.allclose(*energies.values())

    target = copy.deepcopy(splits["pbe0+mbd"].train)
    target.level = "target-level"
    settings = TrainingSettings(batch_size=8, max_epochs=2, progress=False)
    tuned, _ = finetune(model, get_strategy("embedding"), target, splits["pbe0+mbd"].validation.subset(range(4)), settings, tmp_path / "ft")
    tuned_vector = tuned.level_features("target-level").detach()
    assert not torch.allclose(tuned_vector, (first + second).detach() / 2)  # trained away from its start
    untouched = copy.deepcopy(model)
    untouched.add_level(EnergyReference.fit(target, model.species), "shared", embedding_from_mean=True)
    torch.testing.assert_close(untouched.level_features("target-level"), (first + second) / 2)

    save_checkpoint(tmp_path / "model.pt", tuned)
    loaded = load_potential(tmp_path / "model.pt")
    for level in tuned.levels:
        torch.testing.assert_close(loaded.level_features(level), tuned.level_features(level))
        torch.testing.assert_close(loaded(batch, level=level, forces=False).residual_energy_ev, tuned(batch, level=level, forces=False).residual_energy_ev)


def test_single_level_transfer_pretrains_on_its_level_alone(splits, tmp_path):
    budget = PretrainBudget(gradient_steps=4, steps_per_epoch=2)
    strategy = get_strategy("single:PBE0+MBD")
    model, result = pretrain(strategy, splits, [1, 6, 8], SMALL_MODEL, SETTINGS, budget, tmp_path)
    assert model.levels == ["pbe0+mbd"] and result.epochs_run == 2
    summary = pretraining_summary(strategy, model, splits, result, budget)
    assert list(summary["validation"]) == ["pbe0+mbd"] and summary["gradient_steps"] == 4


@pytest.mark.parametrize("strategy_name", ["joint", "reptile_multihead", "fomaml", "embedding"])
def test_pretraining_until_converged_uses_the_same_patience_rule_and_records_its_cost(splits, strategy_name, tmp_path, monkeypatch):
    import metamlip.pretrain as pretrain_module

    seen = {}
    original = pretrain_module.fit

    def recording_fit(model, plan, tasks, settings, run_dir, resume=False):
        seen["settings"] = settings
        return original(model, plan, tasks, settings, run_dir, resume=resume)

    monkeypatch.setattr(pretrain_module, "fit", recording_fit)
    budget = PretrainBudget(gradient_steps=40, steps_per_epoch=4, until="converged", patience=3, reptile=ReptileSettings(inner_steps=2, tasks_per_meta_step=2))
    strategy = get_strategy(strategy_name)
    model, result = pretrain(strategy, splits, [1, 6, 8], SMALL_MODEL, SETTINGS, budget, tmp_path)
    assert seen["settings"].early_stopping_patience == 3 and seen["settings"].restore_best
    assert result.stop_reason in ("early_stopping", "max_epochs") and result.epochs_run <= 10
    if result.stop_reason == "early_stopping":
        assert result.epochs_run - result.best_epoch == 3
    summary = pretraining_summary(strategy, model, splits, result, budget)
    assert summary["gradient_steps"] == 4 * result.epochs_run
    for level in splits:
        assert summary["validation"][level]["energy_mae_ev"] > 0 and summary["validation"][level]["force_mae_ev_per_angstrom"] > 0


def test_bad_budget_settings_are_clear_errors():
    from metamlip.errors import InputError

    with pytest.raises(InputError, match="pretrain.until"):
        PretrainBudget(until="forever")
    with pytest.raises(InputError, match="unknown strategy 'maml'"):
        get_strategy("maml")

"""Shipped pre-trained models and elements a model has not seen.

The registry (`metamlip.pretrained`) is tested on a temporary folder holding a tiny HIP-NN
pre-trained on the bundled ethanol levels (GFN2-xTB, HF/3-21G) for H, C, N, O, shipped with its
model card; `metamlip finetune` takes its name as `checkpoint:`. Unseen elements: real QM7-X
molecules with sulfur and chlorine (tests/data/qm7x_small_200.npz) are a one-line error naming the
elements, or, with `new_elements: add`, join the model (`metamlip.model.new_species`) with the old
elements' weights and predictions kept, for HIP-NN and MACE.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
import yaml
from ase.data import chemical_symbols

import metamlip.pretrained as pretrained
from metamlip.cli.main import main
from metamlip.config import ModelSection, load_config
from metamlip.data.references import EnergyReference
from metamlip.errors import InputError
from metamlip.experiment.config import ExperimentConfig, FinetuneConfig
from metamlip.data.lazy_batching import LevelData, make_batcher
from metamlip.evaluation.metrics import ErrorMetrics, evaluate
from metamlip.finetune import FinetuneOptions, finetune, with_target_level
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.mace_config import MaceConfig, MaceSection
from metamlip.model.new_species import add_species
from metamlip.model.potential import Potential, build_potential
from metamlip.pretrain import pretrain, pretraining_summary
from metamlip.pretrained.ship import ship
from metamlip.readers import read_level
from metamlip.strategies import PretrainBudget, get_strategy
from metamlip.testing import predict_structures
from metamlip.training.checkpoint import load_potential, read_checkpoint, save_checkpoint
from metamlip.training.loop import TrainingSettings
from metamlip.training.refit import refit_reference
from metamlip.training.run_training import LevelSplit, training_settings

REPOSITORY = Path(__file__).parent.parent
BUNDLED = REPOSITORY / "metamlip" / "bundled" / "ethanol_multilevel"
PARACETAMOL = REPOSITORY / "metamlip" / "bundled" / "paracetamol_target" / "df-b3lyp-d3bj_def2-svp.xyz"
SHIPPED = "qm7x-pbe0mbd-hcno-v1"
NAME = "tiny-hcno"
HCNO = [1, 6, 7, 8]
SMALL_MODEL = ModelSection(n_features=12, n_sensitivities=6, n_interaction_layers=1, n_atom_layers=1, cutoff_angstrom=5.0, seed=1)
SETTINGS = TrainingSettings(batch_size=8, learning_rate=1e-2, max_epochs=3, progress=False)
FINETUNE_SETTINGS = dataclasses.replace(SETTINGS, max_epochs=10)
ORGANIC_STUDY = REPOSITORY / "metamlip" / "configs" / "organic_paracetamol_study.yaml"
BUDGET = PretrainBudget(gradient_steps=8, steps_per_epoch=4)
TINY_MACE = MaceSection(num_channels=8, max_L=1, max_ell=2, correlation=2, num_bessel=6, radial_MLP=[16])  # as tests/test_backbones.py
QM7X_SULFUR = list(range(130, 140))  # C4H5NOS, 10 conformers; 120-129 is C4H3SCl
QM7X_HCNO = list(range(0, 10)) + list(range(30, 40))  # C5H11NO and C4H8N2O
needs_mace = pytest.mark.skipif(importlib.util.find_spec("mace") is None, reason='needs the mace extra: pip install -e ".[mace]"')
mace_warnings = pytest.mark.filterwarnings(  # e3nn compiles its modules with TorchScript, which torch 2.13 deprecates
    "ignore:`torch.jit.:DeprecationWarning", "ignore:The TorchScript type system:UserWarning"
)


PROSE = {
    "description": "tiny test model",
    "training_data": "metamlip/bundled/ethanol_multilevel: 24 structures per level",
    "intended_use": "tests",
    "limits": ["none worth the name"],
    "budget_notes": {"hardware": "one CPU thread"},
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    """A registry folder with NAME: joint HIP-NN pre-trained on two bundled ethanol levels, species
    H, C, N, O, shipped by `metamlip.pretrained.ship` from its checkpoint as a release would."""
    folder = tmp_path_factory.mktemp("registry")
    levels = [read_level(BUNDLED / name) for name in ("gfn2-xtb.xyz", "hf_3-21g.xyz")]
    splits = {level.level: LevelSplit(level.subset(range(24)), level.subset(range(24, 32)), level.subset(range(0))) for level in levels}
    strategy = get_strategy("joint")
    model, result = pretrain(strategy, splits, HCNO, SMALL_MODEL, SETTINGS, BUDGET, folder.parent / "pretrain")
    summary = pretraining_summary(strategy, model, splits, result, BUDGET)
    checkpoint = folder.parent / "pretrained.pt"
    save_checkpoint(checkpoint, model, extra={"strategy": "joint", "pretraining": json.dumps(summary)})
    ship(checkpoint, NAME, folder, **PROSE)
    return folder


def test_ship_writes_the_checkpoint_and_a_card_read_from_it(registry, tmp_path):
    card = pretrained.model_card(NAME, registry)
    summary = json.loads(read_checkpoint(registry.parent / "pretrained.pt")["extra"]["pretraining"])
    assert card["name"] == NAME and card["strategy"] == "joint" and card["source_checkpoint"] == "pretrained.pt"
    budget_keys = ("gradient_steps", "epochs", "best_epoch", "wall_seconds", "stop_reason")
    assert card["budget"] == {key: summary[key] for key in budget_keys} | {"hardware": "one CPU thread"}
    assert card["budget"]["gradient_steps"] == BUDGET.gradient_steps
    assert sorted(card["validation_errors"]) == ["gfn2-xtb", "hf/3-21g"]
    for level, errors in card["validation_errors"].items():
        assert errors["energy_mae_mev"] == round(1000 * summary["validation"][level]["energy_mae_ev"], 2) > 0
    assert card["architecture"]["backbone"] == "hipnn" and card["architecture"]["n_features"] == SMALL_MODEL.n_features
    shipped = tmp_path / "shipped"
    with pytest.raises(InputError, match="model name 'a/b'"):
        ship(registry.parent / "pretrained.pt", "a/b", shipped, **PROSE)
    with pytest.raises(InputError, match=r"give \['intended_use'\]"):
        ship(registry.parent / "pretrained.pt", "other", shipped, **{k: v for k, v in PROSE.items() if k != "intended_use"})
    bare = tmp_path / "bare.pt"  # a checkpoint written without a pre-training summary
    save_checkpoint(bare, load_potential(registry / f"{NAME}.pt"))
    with pytest.raises(InputError, match="no pre-training summary"):
        ship(bare, "other", shipped, **PROSE)
    assert not shipped.exists() or pretrained.list_pretrained(shipped) == []


@pytest.fixture(scope="module")
def qm7x(data_dir):
    return read_level(data_dir / "qm7x_small_200.npz", energy_unit="eV", level="pbe0+mbd")


def ethanol_frames(n: int = 6) -> list:
    level = read_level(BUNDLED / "mp2_cc-pvdz.xyz")
    return [level.to_atoms(index) for index in range(n)]


def test_registry_lists_loads_and_reads_model_cards(registry):
    assert pretrained.list_pretrained(registry) == [NAME]
    assert pretrained.checkpoint_path(NAME, registry) == registry / f"{NAME}.pt"
    card = pretrained.model_card(NAME, registry)
    assert set(pretrained.CARD_KEYS) <= set(card) and card["elements"] == ["H", "C", "N", "O"]
    model = pretrained.load(NAME, folder=registry)
    assert model.species == HCNO and sorted(model.levels) == ["gfn2-xtb", "hf/3-21g"] and not model.training
    assert next(model.parameters()).dtype == torch.float32
    double = pretrained.load(NAME, dtype="float64", folder=registry)
    assert next(double.parameters()).dtype == torch.float64
    frames = ethanol_frames()
    np.testing.assert_allclose(predict_structures(double, frames, "gfn2-xtb").energy_ev, predict_structures(model, frames, "gfn2-xtb").energy_ev, atol=1e-3)


def test_unknown_name_or_card_lists_what_there_is(registry, tmp_path):
    with pytest.raises(InputError, match=f"no pre-trained model 'organic'; shipped: {NAME}"):
        pretrained.load("organic", folder=registry)
    with pytest.raises(InputError, match="this metamlip ships none"):
        pretrained.model_card(NAME, tmp_path)
    (tmp_path / f"{NAME}.pt").write_bytes((registry / f"{NAME}.pt").read_bytes())
    with pytest.raises(InputError, match="model card .* is missing"):
        pretrained.model_card(NAME, tmp_path)
    (tmp_path / f"{NAME}.json").write_text(json.dumps({"description": "no more"}), encoding="utf-8")
    with pytest.raises(InputError, match="lacks \\['strategy'"):
        pretrained.model_card(NAME, tmp_path)


def test_every_shipped_model_has_a_card_that_matches_its_checkpoint():
    """The models inside the package (none may be shipped yet): complete card, same elements,
    levels and strategy as the checkpoint, which loads with weights_only=True."""
    for name in pretrained.list_pretrained():
        card = pretrained.model_card(name)
        payload = read_checkpoint(pretrained.checkpoint_path(name))
        model = pretrained.load(name)
        assert card["elements"] == [chemical_symbols[z] for z in model.species], name
        assert sorted(card["levels"]) == sorted(model.levels), name
        assert card["strategy"] == payload["extra"]["strategy"], name


def first_drawn_paracetamol(count: int) -> LevelData:
    """The bundled target structures of the first `count` MD frames of the build's draw (numpy
    default_rng(0).permutation(300), the bundle's README): the same structures however many more
    the bundle holds."""
    target = read_level(PARACETAMOL)
    md_frames = [atoms.info["source_index"] for atoms in ase.io.read(PARACETAMOL, ":")]
    drawn = set(np.random.default_rng(0).permutation(300)[:count].tolist())
    chosen = [index for index, frame in enumerate(md_frames) if frame in drawn]
    assert len(chosen) == count, f"{PARACETAMOL} lacks frames of the first {count} of the draw"
    return target.subset(chosen)


def test_the_shipped_model_refits_to_paracetamol_from_ten_structures(tmp_path):
    """The shipped model fine-tuned on 10 bundled paracetamol structures at the organic study's target
    level (B3LYP-D3(BJ)/def2-SVP), with the study's fine-tuning settings: energy and force errors on
    50 other structures fall well below the pre-trained model's own (its network unchanged, the new
    level's reference fitted to the 10 structures' energies minus the network's, so no constant
    offset is counted against it). The 64 structures are fixed by the build's draw. About 20 s on
    one core of this machine (README)."""
    target = first_drawn_paracetamol(64)
    order = np.random.default_rng(0).permutation(len(target))
    train, validation, test = (target.subset(order[a:b]) for a, b in ((0, 10), (10, 14), (14, 64)))
    model = pretrained.load(SHIPPED)
    strategy = get_strategy(pretrained.model_card(SHIPPED)["strategy"])

    def test_errors(potential: Potential) -> ErrorMetrics:
        return evaluate(potential, make_batcher(test, potential.species, potential.config.cutoff_angstrom, torch.float32))

    untrained = with_target_level(model, strategy, train, validation)
    refit_reference(untrained, make_batcher(train, untrained.species, untrained.config.cutoff_angstrom, torch.float32), target.level)
    start = test_errors(untrained)
    settings = training_settings(load_config(ORGANIC_STUDY, ExperimentConfig).finetune.training)
    tuned, result = finetune(model, strategy, train, validation, settings, tmp_path / "run")
    after = test_errors(tuned)
    assert result.best_epoch > 1 and tuned.levels == ["pbe0+mbd", target.level]
    config = finetune_config(tmp_path, SHIPPED, {"path": str(PARACETAMOL)})  # `metamlip finetune` finds it by name
    assert load_config(config, FinetuneConfig).checkpoint == str(pretrained.checkpoint_path(SHIPPED))
    # measured: energy 146 -> 74 meV, forces 375 -> 171 meV/A (seeds 1-3 of the split: 0.65-0.68x, 0.46-0.49x)
    assert after.energy_mae_ev < 0.85 * start.energy_mae_ev, (start, after)
    assert after.force_mae_ev_per_angstrom < 0.6 * start.force_mae_ev_per_angstrom, (start, after)


def finetune_config(tmp_path: Path, checkpoint: str, dataset: dict, **changes) -> Path:
    config = {
        "checkpoint": checkpoint,
        "dataset": dataset,
        "n_finetune": 8,
        "n_validation": 4,
        "n_test": 4,
        "training": {"max_epochs": 2, "batch_size": 4, "progress": False, "threads": 1},
        "output_dir": str(tmp_path / "finetuned"),
    } | changes
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_cli_finetune_takes_a_shipped_name(registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "SHIPPED_FOLDER", registry)
    config = finetune_config(tmp_path, NAME, {"path": str(BUNDLED / "mp2_cc-pvdz.xyz")})
    assert load_config(config, FinetuneConfig).checkpoint == str(registry / f"{NAME}.pt")
    assert main(["finetune", str(config)]) == 0
    tuned = load_potential(tmp_path / "finetuned" / "model.pt")
    assert "mp2/cc-pvdz" in tuned.levels and tuned.species == HCNO
    assert "fine-tuned model" in capsys.readouterr().out


def test_checkpoint_neither_file_nor_name_is_one_line_naming_both(registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "SHIPPED_FOLDER", registry)
    config = finetune_config(tmp_path, "organic-hcno-v9", {"path": str(BUNDLED / "mp2_cc-pvdz.xyz")})
    assert main(["finetune", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    for fragment in ("'checkpoint'", "'organic-hcno-v9' is neither a checkpoint file", str(tmp_path / "organic-hcno-v9"), f"shipped: {NAME}"):
        assert fragment in error, error


def test_unseen_element_is_one_line_naming_it(registry, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "SHIPPED_FOLDER", registry)
    dataset = {"path": str(data_dir / "qm7x_small_200.npz"), "energy_unit": "eV", "level": "pbe0+mbd"}
    config = finetune_config(tmp_path, NAME, dataset, n_finetune=40, n_validation=10, n_test=10)
    assert main(["finetune", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    expected = "elements S (Z=16), Cl (Z=17) in", "qm7x_small_200.npz are unknown to the pre-trained model (elements H, C, N, O)", "new_elements: add"
    for fragment in expected:
        assert fragment in error, error
    assert not (tmp_path / "finetuned" / "model.pt").exists()


def test_new_elements_key_is_checked(registry, tmp_path, qm7x):
    config = finetune_config(tmp_path, str(registry / f"{NAME}.pt"), {"path": str(BUNDLED / "mp2_cc-pvdz.xyz")}, new_elements="ignore")
    with pytest.raises(InputError, match="'new_elements' must be one of \\['error', 'add'\\]"):
        load_config(config, FinetuneConfig)
    model = pretrained.load(NAME, folder=registry)
    train, validation = qm7x.subset(QM7X_HCNO), qm7x.subset(QM7X_SULFUR)
    with pytest.raises(InputError, match="element S \\(Z=16\\) in .* occurs in none of the 20 fine-tuning training structures"):
        finetune(model, get_strategy("joint"), train, validation, SETTINGS, tmp_path / "run", FinetuneOptions(new_elements="add"))


def random_potential(config: HipnnConfig | MaceConfig) -> Potential:
    """float64 potential for H, C, O with one MP2 level and nonzero per-element read-outs."""
    model = build_potential([1, 6, 8], config, seed=0, dtype=torch.float64)
    model.add_level(EnergyReference.fit(read_level(BUNDLED / "mp2_cc-pvdz.xyz"), model.species))
    with torch.no_grad():
        model.heads["shared"].layers[0].weight.normal_(generator=torch.Generator().manual_seed(0))
    return model


BACKBONES = {
    "hipnn": HipnnConfig(n_features=12, n_sensitivities=6, n_interaction_layers=2, n_atom_layers=1, cutoff_angstrom=5.0),
    "hipnn-level-embedding": HipnnConfig(n_features=12, n_sensitivities=6, n_interaction_layers=2, n_atom_layers=1, cutoff_angstrom=5.0, n_level_features=3),
    "mace": MaceConfig(**dataclasses.asdict(TINY_MACE)),
    "mace-level-embedding": MaceConfig(**dataclasses.asdict(TINY_MACE), n_level_features=3),
    "mace-level-embedding-in-attributes": MaceConfig(
        **(dataclasses.asdict(TINY_MACE) | {"level_embedding_into": "node_attributes"}), n_level_features=3
    ),
}


@pytest.mark.parametrize("backbone", list(BACKBONES))
@mace_warnings
def test_added_elements_keep_the_old_weights_and_predictions(backbone, tmp_path):
    """N (between C and O) and S join an H, C, O model: every old weight is kept (moved to its new
    species position; e3nn's fan-in-normalised MACE weights rescaled, so the same function), the
    new elements' references are 0, and ethanol's energies and forces are those of the original
    model to the last bits (1e-12 eV); the grown model's checkpoint loads with weights_only=True."""
    if backbone.startswith("mace") and importlib.util.find_spec("mace") is None:
        pytest.skip('needs the mace extra: pip install -e ".[mace]"')
    model = random_potential(BACKBONES[backbone])
    grown = copy.deepcopy(model)
    add_species(grown, [16, 7])
    assert grown.species == [1, 6, 7, 8, 16] and model.species == [1, 6, 8]
    old_positions = [0, 1, 3] + [5 + index for index in range(model.config.n_level_features)]
    assert_old_weights_kept(model, grown, old_positions)
    reference = grown.references["mp2/cc-pvdz"]
    assert reference.elements == [1, 6, 7, 8, 16] and reference.energy_per_element_ev[[2, 4]].tolist() == [0.0, 0.0]
    np.testing.assert_array_equal(reference.energy_per_element_ev[[0, 1, 3]], model.references["mp2/cc-pvdz"].energy_per_element_ev)
    frames = ethanol_frames()
    before, after = predict_structures(model, frames), predict_structures(grown, frames)
    np.testing.assert_allclose(after.energy_ev, before.energy_ev, rtol=1e-15, atol=1e-12)
    np.testing.assert_allclose(np.concatenate(after.forces_ev_per_angstrom), np.concatenate(before.forces_ev_per_angstrom), rtol=0, atol=1e-12)
    save_checkpoint(tmp_path / "grown.pt", grown)
    reloaded = load_potential(tmp_path / "grown.pt")  # weights_only=True
    assert reloaded.species == grown.species
    again = predict_structures(reloaded, frames)
    np.testing.assert_array_equal(again.energy_ev, after.energy_ev)


def assert_old_weights_kept(model: Potential, grown: Potential, old_positions: list[int]) -> None:
    """Every weight of `grown` equals `model`'s; along an input-attribute axis at `old_positions`
    (as many of them as the axis had: species first; e3nn fan-in-normalised pieces: times
    sqrt(new / old attributes))."""
    old_layout, new_layout = model.backbone.species_weights(), grown.backbone.species_weights()
    old_state, new_state = model.backbone.state_dict(), grown.backbone.state_dict()
    for name, new in new_state.items():
        if name not in new_layout:
            assert torch.equal(new, old_state[name]), name
            continue
        for old_block, new_block in zip(old_layout[name], new_layout[name]):
            old_piece = old_state[name].reshape(-1)[old_block.offset : old_block.offset + np.prod(old_block.shape)].reshape(old_block.shape)
            new_piece = new.reshape(-1)[new_block.offset : new_block.offset + np.prod(new_block.shape)].reshape(new_block.shape)
            kept = new_piece.index_select(new_block.axis, torch.as_tensor(old_positions[: old_block.shape[old_block.axis]]))
            if old_block.fan_in_scaled:
                scale = (new_block.shape[new_block.axis] / old_block.shape[old_block.axis]) ** 0.5
                torch.testing.assert_close(kept, old_piece * scale, rtol=1e-15, atol=0)
            else:
                assert torch.equal(kept, old_piece), name
    for name, head in grown.heads.items():
        assert torch.equal(head.layers[0].weight[:, old_positions], model.heads[name].layers[0].weight), name
        for new, old in zip(head.layers[1:].parameters(), model.heads[name].layers[1:].parameters()):
            assert torch.equal(new, old), name


def finetune_with_sulfur(model: Potential, qm7x, run_dir: Path, settings: TrainingSettings = FINETUNE_SETTINGS):
    """Fine-tune `model` with new_elements add on QM7-X molecules, C4H5NOS among them (8 + 2 of its conformers)."""
    train = qm7x.subset(QM7X_SULFUR[:8] + QM7X_HCNO[:6] + QM7X_HCNO[10:16])
    validation = qm7x.subset(QM7X_SULFUR[8:] + QM7X_HCNO[6:8] + QM7X_HCNO[16:18])
    return finetune(model, get_strategy("joint"), train, validation, settings, run_dir, FinetuneOptions(new_elements="add"))


def test_new_elements_add_finetunes_on_the_new_element(registry, qm7x, tmp_path):
    model = pretrained.load(NAME, folder=registry)
    with pytest.raises(InputError, match="element S \\(Z=16\\) in .* is unknown to the pre-trained model \\(elements H, C, N, O\\)"):
        finetune(model, get_strategy("joint"), qm7x.subset(QM7X_SULFUR[:8]), qm7x.subset(QM7X_SULFUR[8:]), SETTINGS, tmp_path / "refused")
    tuned, result = finetune_with_sulfur(model, qm7x, tmp_path / "run")
    assert tuned.species == [1, 6, 7, 8, 16] and model.species == HCNO
    assert tuned.references["gfn2-xtb"].energy_per_element_ev[4] == 0.0 and tuned.references["pbe0+mbd"].energy_per_element_ev[4] != 0.0
    losses = [epoch["val_loss"] for epoch in result.history]
    assert losses[-1] < 0.9 * losses[0], losses
    save_checkpoint(tmp_path / "tuned.pt", tuned, extra={"strategy": "joint"})
    frames = [qm7x.to_atoms(index) for index in QM7X_SULFUR[8:]]
    reloaded = load_potential(tmp_path / "tuned.pt")
    np.testing.assert_array_equal(predict_structures(reloaded, frames, "pbe0+mbd").energy_ev, predict_structures(tuned, frames, "pbe0+mbd").energy_ev)


@needs_mace
@mace_warnings
def test_new_elements_add_finetunes_mace(qm7x, tmp_path):
    model = build_potential(HCNO, MaceConfig(**dataclasses.asdict(TINY_MACE)), seed=0)
    model.add_level(EnergyReference.fit(read_level(BUNDLED / "gfn2-xtb.xyz"), model.species))
    tuned, result = finetune_with_sulfur(model, qm7x, tmp_path / "run", dataclasses.replace(FINETUNE_SETTINGS, max_epochs=5))
    assert tuned.species == [1, 6, 7, 8, 16]
    losses = [epoch["val_loss"] for epoch in result.history]
    assert losses[-1] < losses[0], losses
    save_checkpoint(tmp_path / "tuned.pt", tuned)
    assert load_potential(tmp_path / "tuned.pt").species == [1, 6, 7, 8, 16]

"""The MACE backbone next to HIP-NN: mace-torch's own model computes the same features, the model
contracts hold, every strategy pre-trains and fine-tunes on it, checkpoints load with
weights_only=True, the ASE calculator's forces and stress are derivatives of its energy, and the
CLI evaluates and scans a MACE checkpoint; without mace-torch, choosing it is a one-line error.

Real data: the bundled ethanol multi-level set (GFN2-xTB and HF/3-21G to pre-train, MP2/cc-pVDZ
to fine-tune) and MD17 ethanol. The MACE is tiny (8 channels, L = 1, l = 2, correlation 2)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ase.build import molecule
from test_calculator import finite_difference_stress, water_box

from metamlip import distributed
from metamlip.calculator import MetamlipCalculator
from metamlip.config import ModelSection, TrainConfig, load_config
from metamlip.data.batching import StructureBatcher
from metamlip.data.references import EnergyReference
from metamlip.errors import InputError
from metamlip.finetune import FinetuneOptions, finetune
from metamlip.model.mace_config import LEVEL_EMBEDDING_PLACES, MaceConfig, MaceSection
from metamlip.model.potential import Potential, build_potential
from metamlip.pretrain import pretrain
from metamlip.readers import read_level
from metamlip.strategies import PretrainBudget, ReptileSettings, get_strategy
from metamlip.testing import check_all_contracts, predict_structures
from metamlip.training.checkpoint import load_potential, read_checkpoint, save_checkpoint
from metamlip.training.loop import TrainingSettings
from metamlip.training.run_training import LevelSplit, backbone_shape, new_potential

REPOSITORY = Path(__file__).parent.parent
BUNDLED = REPOSITORY / "metamlip" / "bundled" / "ethanol_multilevel"
MD17_LEVEL = "pbe+vdw-ts"
TARGET_LEVEL = "mp2/cc-pvdz"
TINY_MACE = MaceSection(num_channels=8, max_L=1, max_ell=2, correlation=2, num_bessel=6, radial_MLP=[16])
MACE_MODEL = ModelSection(backbone="mace", mace=TINY_MACE, seed=1)
SETTINGS = TrainingSettings(batch_size=8, learning_rate=1e-2, max_epochs=3, progress=False)  # pre-training (epochs: the budget's)
FINETUNE_SETTINGS = dataclasses.replace(SETTINGS, learning_rate=3e-3)
BUDGET = PretrainBudget(gradient_steps=8, steps_per_epoch=4, reptile=ReptileSettings(inner_steps=2, tasks_per_meta_step=2, inner_learning_rate=1e-2))
STRATEGIES = ["scratch", "joint", "multihead", "embedding", "reptile", "reptile_multihead", "fomaml", "single:GFN2-xTB"]
pytestmark = pytest.mark.filterwarnings(  # e3nn compiles its modules with TorchScript, which torch 2.13 deprecates
    "ignore:`torch.jit.:DeprecationWarning", "ignore:The TorchScript type system:UserWarning"
)
needs_mace = pytest.mark.skipif(importlib.util.find_spec("mace") is None, reason='needs the mace extra: pip install -e ".[mace]"')


@pytest.fixture(scope="module")
def ethanol():
    return read_level(REPOSITORY / "tests" / "data" / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level=MD17_LEVEL)


def level_splits() -> dict[str, LevelSplit]:
    """Two cheap bundled levels, 24 training and 8 validation structures each."""
    levels = [read_level(BUNDLED / name) for name in ("gfn2-xtb.xyz", "hf_3-21g.xyz")]
    return {level.level: LevelSplit(level.subset(range(24)), level.subset(range(24, 32)), level.subset(range(0))) for level in levels}


@pytest.fixture(scope="module")
def splits() -> dict[str, LevelSplit]:
    return level_splits()


@pytest.fixture(scope="module")
def target() -> LevelSplit:
    """The bundled MP2/cc-pVDZ level: 16 structures to fine-tune, 8 to validate."""
    level = read_level(BUNDLED / "mp2_cc-pvdz.xyz")
    return LevelSplit(level.subset(range(16)), level.subset(range(16, 24)), level.subset(range(0)))


def mace_potential(ethanol, dtype: torch.dtype = torch.float64, n_level_features: int = 0, level_embedding_into: str = "node_embedding") -> Potential:
    """A random-weight MACE potential with the MD17 level's fitted reference."""
    shape = dataclasses.asdict(TINY_MACE) | {"level_embedding_into": level_embedding_into}
    config = MaceConfig(**shape, n_level_features=n_level_features)
    model = build_potential([1, 6, 8], config, seed=0, dtype=dtype)
    model.add_level(EnergyReference.fit(ethanol.subset(np.arange(100)), model.species))
    return model


@pytest.fixture(scope="module")
def model(ethanol) -> Potential:
    return mace_potential(ethanol)


def test_choosing_mace_without_mace_torch_is_one_line_naming_the_extra(monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] in ("mace", "e3nn")] + ["mace", "e3nn"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError, as when not installed
    monkeypatch.delitem(sys.modules, "metamlip.model.mace", raising=False)  # imported afresh, it meets the failure
    with pytest.raises(InputError) as error:
        new_potential(MACE_MODEL, [1, 6, 8])
    message = str(error.value)
    assert "\n" not in message and 'pip install -e ".[mace]"' in message and "mace-torch" in message and "e3nn" in message
    hipnn = ModelSection(n_features=8, n_sensitivities=4, n_interaction_layers=1, n_atom_layers=1)
    assert isinstance(new_potential(hipnn, [1, 6, 8]), Potential)


def test_config_chooses_the_backbone_and_keeps_the_hipnn_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"datasets": [], "model": {"backbone": "mace", "mace": {"num_channels": 12, "radial_MLP": [8, 8]}}}))
    config = load_config(path, TrainConfig, ["model.mace.max_L=0", "model.n_level_features=4"])
    shape = backbone_shape(config.model)
    assert isinstance(shape, MaceConfig)
    assert (shape.num_channels, shape.max_L, shape.radial_MLP, shape.n_level_features) == (12, 0, [8, 8], 4)
    assert shape.correlation == MaceSection.correlation and shape.cutoff_angstrom == 5.0
    hipnn = backbone_shape(load_config(path, TrainConfig, ["model.backbone=hipnn", "model.n_features=8"]).model)
    assert type(hipnn).__name__ == "HipnnConfig" and hipnn.n_features == 8
    for override, key in (("model.backbone=schnet", "model.backbone"), ("model.mace.max_L=-1", "model.mace.max_L"),
                          ("model.mace.radial_MLP=[8, 0]", "model.mace.radial_MLP"), ("model.mace.channels=8", "model.mace.channels")):
        with pytest.raises(InputError, match=key.replace(".", r"\.")):
            load_config(path, TrainConfig, [override])


@needs_mace
def test_features_are_mace_torch_own_model_features(model, ethanol):
    """mace-torch's `MACE` with the backbone's weights gives the same features per block, vectors
    (1o) included, so the edge direction convention is mace-torch's too; the backbone's output is
    their scalar part. mace-torch is imported after `model` has imported it through metamlip (see
    the fresh-process test)."""
    from e3nn import o3
    from mace.data import AtomicData, config_from_atoms
    from mace.modules import MACE, RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock
    from mace.tools import torch_geometric
    from mace.tools.utils import AtomicNumberTable

    frames = [ethanol.to_atoms(index) for index in (0, 999)]
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # mace-torch builds its model and data in the default dtype
    try:
        reference = MACE(
            r_max=TINY_MACE.cutoff_angstrom, num_bessel=TINY_MACE.num_bessel, num_polynomial_cutoff=TINY_MACE.num_polynomial_cutoff,
            max_ell=TINY_MACE.max_ell, interaction_cls=RealAgnosticResidualInteractionBlock, interaction_cls_first=RealAgnosticInteractionBlock,
            num_interactions=TINY_MACE.num_interactions, num_elements=3, hidden_irreps=o3.Irreps("8x0e + 8x1o"), MLP_irreps=o3.Irreps("4x0e"),
            atomic_energies=np.zeros(3), avg_num_neighbors=TINY_MACE.avg_num_neighbors, atomic_numbers=[1, 6, 8],
            correlation=TINY_MACE.correlation, gate=torch.nn.functional.silu, radial_MLP=TINY_MACE.radial_MLP, use_reduced_cg=False,
        )
        table = AtomicNumberTable([1, 6, 8])
        graphs = [AtomicData.from_config(config_from_atoms(atoms), z_table=table, cutoff=TINY_MACE.cutoff_angstrom) for atoms in frames]
        data = next(iter(torch_geometric.dataloader.DataLoader(graphs, batch_size=2))).to_dict()
    finally:
        torch.set_default_dtype(default_dtype)
    missing, unexpected = reference.load_state_dict(model.backbone.state_dict(), strict=False)
    not_in_backbone = {"atomic_numbers", "r_max", "num_interactions", "atomic_energies_fn.atomic_energies"}  # the readouts neither
    assert not unexpected and all(key in not_in_backbone or key.startswith("readouts.") for key in missing), missing
    expected = reference(data, compute_force=False)["node_feats"].detach()

    batch = StructureBatcher(ethanol.subset([0, 999]), model.species, 5.0, torch.float64).batch(np.arange(2))
    arguments = (batch.species_index, batch.neighbour_index, batch.neighbour_mask, model.neighbour_vectors_angstrom(batch, batch.positions_angstrom))
    attributes, blocks = model.backbone.equivariant_features(*arguments)
    torch.testing.assert_close(attributes, data["node_attrs"])
    assert [block.shape[1] for block in blocks] == [8 + 3 * 8, 8]  # 8x0e + 8x1o, then 8x0e
    torch.testing.assert_close(torch.cat(blocks, dim=1).detach(), expected, rtol=1e-10, atol=1e-12)
    assert blocks[0][:, 8:].abs().max() > 1e-3 and blocks[1].abs().max() > 1e-3
    features = model.backbone(*arguments)
    assert [f.shape[1] for f in features] == model.backbone.feature_sizes == [3, 8, 8]
    for feature, block in zip(features[1:], blocks):
        torch.testing.assert_close(feature, block[:, :8])


@needs_mace
def test_mace_meets_the_model_contracts(model, ethanol):
    geometries = [ethanol.to_atoms(index) for index in (0, 777, 1999)]
    check_all_contracts(model, [geometries[1], molecule("H2O")], periodic=water_box(), level=MD17_LEVEL, seed=3)
    for place in LEVEL_EMBEDDING_PLACES:
        embedded = mace_potential(ethanol, n_level_features=4, level_embedding_into=place)
        embedded.add_level(EnergyReference("second", [1, 6, 8], np.zeros(3)))
        check_all_contracts(embedded, [geometries[2]], level="second", seed=4)
        first, second = (predict_structures(embedded, geometries[:1], level).residual_energy_ev for level in (MD17_LEVEL, "second"))
        assert abs(first - second).max() > 1e-6, place  # the level vector enters the features


@needs_mace
def test_level_embedding_enters_the_node_embedding_or_every_block(ethanol):
    """`node_embedding` (the default): the vector feeds the linear node embedding only, and the blocks'
    per-element weights (product basis, skip connections) stay per species; `node_attributes`: it
    joins every block's node attributes. The head reads species and vector in both."""
    n_species, n_level = 3, 4
    for place, block_attributes in (("node_embedding", n_species), ("node_attributes", n_species + n_level)):
        backbone = mace_potential(ethanol, n_level_features=n_level, level_embedding_into=place).backbone
        assert backbone.node_embedding.linear.irreps_in.dim == n_species + n_level
        for interaction, product in zip(backbone.interactions, backbone.products):
            assert interaction.node_attrs_irreps.dim == block_attributes, place
            for contraction in product.symmetric_contractions.contractions:
                assert contraction.weights_max.shape[0] == block_attributes, place
        assert backbone.feature_sizes[0] == n_species + n_level


@needs_mace
def test_a_checkpoint_from_before_the_placement_key_keeps_its_placement(ethanol, tmp_path):
    """MACE checkpoints written before `level_embedding_into` existed fed the level vector into every
    block; loaded now, they build that model and predict what they did."""
    original = mace_potential(ethanol, n_level_features=4, level_embedding_into="node_attributes")
    save_checkpoint(tmp_path / "model.pt", original)
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    del payload["model"]["backbone"]["level_embedding_into"]
    torch.save(payload, tmp_path / "older.pt")
    loaded = load_potential(tmp_path / "older.pt")
    assert loaded.config.level_embedding_into == "node_attributes"
    frames = [ethanol.to_atoms(index) for index in (5, 500)]
    np.testing.assert_allclose(predict_structures(loaded, frames).energy_ev, predict_structures(original, frames).energy_ev, rtol=1e-12)


@needs_mace
def test_float32_is_the_float64_model_rounded(model, ethanol):
    single = mace_potential(ethanol, dtype=torch.float32)
    assert next(single.parameters()).dtype == torch.float32
    frames = [ethanol.to_atoms(index) for index in (3, 30)]
    double, rounded = predict_structures(model, frames), predict_structures(single, frames)
    np.testing.assert_allclose(rounded.residual_energy_ev, double.residual_energy_ev, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(rounded.forces_ev_per_angstrom), np.concatenate(double.forces_ev_per_angstrom), atol=1e-4)


@needs_mace
@pytest.mark.parametrize("strategy_name", STRATEGIES)
def test_every_strategy_pretrains_and_finetunes_mace(strategy_name, splits, target, tmp_path):
    strategy = get_strategy(strategy_name)
    pretrained, result = pretrain(strategy, splits, [1, 6, 8], MACE_MODEL, SETTINGS, BUDGET, tmp_path / "pretrain")
    assert type(pretrained.config) is MaceConfig
    if strategy.pretrains:
        losses = [epoch["val_loss"] for epoch in result.history]
        assert len(losses) == 2 and losses[-1] < losses[0], losses
    if strategy_name == "embedding":
        assert pretrained.config.n_level_features > 0 and len(pretrained.level_embeddings) == 2
    tuned, tuning = finetune(pretrained, strategy, target.train, target.validation, FINETUNE_SETTINGS, tmp_path / "finetune")
    assert TARGET_LEVEL in tuned.levels and TARGET_LEVEL not in pretrained.levels
    losses = [epoch["val_loss"] for epoch in tuning.history]
    assert losses[-1] < losses[0], losses
    moved = [not torch.equal(a, b) for a, b in zip(tuned.backbone.parameters(), pretrained.backbone.parameters())]
    assert all(moved)


@needs_mace
def test_frozen_backbone_finetuning_trains_the_head_only(splits, target, tmp_path):
    pretrained, _ = pretrain(get_strategy("joint"), splits, [1, 6, 8], MACE_MODEL, SETTINGS, BUDGET, tmp_path / "pretrain")
    options = FinetuneOptions(freeze_backbone=True)
    tuned, tuning = finetune(pretrained, get_strategy("joint"), target.train, target.validation, FINETUNE_SETTINGS, tmp_path / "finetune", options)
    for (name, after), before in zip(tuned.backbone.state_dict().items(), pretrained.backbone.state_dict().values()):
        assert torch.equal(after, before), name
    assert any(not torch.equal(a, b) for a, b in zip(tuned.heads.parameters(), pretrained.heads.parameters()))
    losses = [epoch["val_loss"] for epoch in tuning.history]
    assert losses[-1] < losses[0], losses


def run_pretraining(strategy_name: str, run_dir: Path, epochs: int = 2, resume: bool = False) -> None:
    """float64 MACE pre-training in batches of 7 (data parallel on 2 ranks: shards of 4 + 3;
    Reptile: one task per rank), checkpoint after every epoch."""
    budget = dataclasses.replace(BUDGET, gradient_steps=epochs * BUDGET.steps_per_epoch)
    settings = dataclasses.replace(SETTINGS, batch_size=7, checkpoint_interval_seconds=0)
    model_section = dataclasses.replace(MACE_MODEL, dtype="float64")
    pretrain(get_strategy(strategy_name), level_splits(), [1, 6, 8], model_section, settings, budget, run_dir, resume=resume)


def checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run_dir / "checkpoint.pt")["state_dict"]


@needs_mace
def test_resumed_pretraining_matches_uninterrupted(tmp_path):
    run_pretraining("joint", tmp_path / "whole")
    run_pretraining("joint", tmp_path / "resumed", epochs=1)
    once = checkpoint_weights(tmp_path / "resumed")
    run_pretraining("joint", tmp_path / "resumed", resume=True)
    whole, resumed = checkpoint_weights(tmp_path / "whole"), checkpoint_weights(tmp_path / "resumed")
    assert any(not torch.equal(once[key], whole[key]) for key in whole)
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-12, atol=1e-14, msg=key)


DISTRIBUTED_STRATEGIES = ("joint", "reptile")  # data parallel (DDP), task parallel


def distributed_main(out: Path) -> None:
    """The torchrun side of `test_two_processes_match_one`."""
    torch.set_num_threads(1)
    assert distributed.init_from_environment() and distributed.world_size() == 2
    for name in DISTRIBUTED_STRATEGIES:
        run_pretraining(name, out / name)
    distributed.shutdown()


@needs_mace
@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """torchrun with 2 gloo processes gives the single-process weights, joint and reptile, on MACE."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(tmp_path / "parallel")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    for name in DISTRIBUTED_STRATEGIES:
        run_pretraining(name, tmp_path / "serial" / name)
        serial, parallel = checkpoint_weights(tmp_path / "serial" / name), checkpoint_weights(tmp_path / "parallel" / name)
        assert serial.keys() == parallel.keys()
        for key in serial:
            torch.testing.assert_close(parallel[key], serial[key], rtol=1e-9, atol=1e-11, msg=f"{name}: {key}")


@needs_mace
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_checkpoint_loads_with_weights_only_and_predicts_the_same(ethanol, dtype, tmp_path):
    original = mace_potential(ethanol, dtype=dtype, n_level_features=4)
    with torch.no_grad():
        for parameter in original.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # off the initial weights (zero one-hot read-out)
    save_checkpoint(tmp_path / "model.pt", original)
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert payload["model"]["backbone_name"] == "mace"
    assert payload["model"]["backbone"] == dataclasses.asdict(original.config)
    assert payload["format_version"] == 2  # a metamlip without MACE says "newer format", not "damaged"
    payload["format_version"] = 3
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(InputError, match="format 3 is newer than this metamlip .*upgrade"):
        load_potential(tmp_path / "future.pt")
    loaded = load_potential(tmp_path / "model.pt")
    assert next(loaded.parameters()).dtype == dtype and loaded.config == original.config
    frames = [ethanol.to_atoms(index) for index in (5, 500)]
    expected, got = predict_structures(original, frames), predict_structures(loaded, frames)
    # the same weights, but BLAS may sum in another order for differently aligned copies: equal to rounding
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    np.testing.assert_allclose(got.energy_ev, expected.energy_ev, **tolerance)
    np.testing.assert_allclose(np.concatenate(got.forces_ev_per_angstrom), np.concatenate(expected.forces_ev_per_angstrom), **tolerance)


@pytest.fixture(scope="module")
def checkpoint(ethanol, tmp_path_factory) -> Path:
    """A float64 MACE checkpoint with weights moved off their start."""
    potential = mace_potential(ethanol)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in potential.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    path = tmp_path_factory.mktemp("mace") / "model.pt"
    save_checkpoint(path, potential)
    return path


# Central differences at h = 1e-4 Angstrom; see metamlip.testing.model_contract for the measured error
# budget (truncation ~1e-7 eV/Angstrom); a wrong sign or a missing term is off by >= 1e-3.
FORCE_TOLERANCE_EV_PER_ANGSTROM = 1.0e-5


@needs_mace
def test_calculator_forces_and_stress_are_energy_derivatives(checkpoint, ethanol):
    atoms = ethanol.to_atoms(11)
    atoms.calc = MetamlipCalculator.from_checkpoint(checkpoint)
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-2
    step = 1.0e-4
    for atom in (0, 4, 8):
        for axis in range(3):
            energies = []
            for sign in (1.0, -1.0):
                moved = atoms.copy()
                moved.calc = atoms.calc
                moved.positions[atom, axis] += sign * step
                energies.append(moved.get_potential_energy())
            assert forces[atom, axis] == pytest.approx(-(energies[0] - energies[1]) / (2 * step), abs=FORCE_TOLERANCE_EV_PER_ANGSTROM)
    box = water_box()
    box.calc = MetamlipCalculator.from_checkpoint(checkpoint)
    stress = box.get_stress()
    assert np.abs(stress).min() > 1e-6
    np.testing.assert_allclose(stress, finite_difference_stress(box, step=1.0e-5), rtol=0, atol=1.0e-8)


FRESH_PROCESS_SCRIPT = """
import os, sys
from metamlip.cli.main import main
checkpoint, data, structure, out = sys.argv[1:]
code = main(["evaluate", checkpoint, data, "--energy-unit", "kcal/mol", "--data-level", "pbe+vdw-ts"])
code = code or main(["scan", checkpoint, "--torsion", "8", "2", "0", "1", "--points", "7", "--structure", structure,
                     "--reference", structure, "--out", out])
print("weights_only switched off:", os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"))
sys.exit(code)
"""


@needs_mace
def test_cli_evaluates_and_scans_a_mace_checkpoint_in_a_fresh_process(checkpoint, tmp_path):
    """A new Python process: loading the checkpoint imports e3nn and mace-torch there, under torch's
    weights_only default, and leaves safe loading on for the rest of the process."""
    structure = BUNDLED / "scans" / "torsion_hocc__mp2_cc-pvdz.xyz"
    data = REPOSITORY / "tests" / "data" / "md17_ethanol_20.db"  # 20 MD17 frames
    command = [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(checkpoint), str(data), str(structure), str(tmp_path / "scan")]
    environment = {name: value for name, value in os.environ.items() if name != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**environment, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pbe+vdw-ts" in result.stdout and "spurious extrema" in result.stdout
    assert "weights_only switched off: None" in result.stdout
    assert {path.name for path in (tmp_path / "scan").iterdir()} >= {"scan.csv", "scan.png", "roughness.json"}


def test_hipnn_checkpoints_keep_their_keys_and_old_descriptions_load(ethanol, tmp_path):
    """HIP-NN parameter names are hippynn's, unchanged; a description without `backbone_name`
    (written before MACE existed) is HIP-NN."""
    hipnn = new_potential(ModelSection(n_features=8, n_sensitivities=4, n_interaction_layers=1, n_atom_layers=1), [1, 6, 8])
    hipnn.add_level(EnergyReference.fit(ethanol.subset(np.arange(50)), hipnn.species))
    assert all(key.startswith(("backbone.blocks.0.", "heads.shared.")) for key in hipnn.state_dict())
    description = copy.deepcopy(hipnn.describe())
    assert description.pop("backbone_name") == "hipnn"
    rebuilt = Potential.from_description(description)
    assert rebuilt.config == hipnn.config and rebuilt.state_dict().keys() == hipnn.state_dict().keys()


if __name__ == "__main__":
    distributed_main(Path(sys.argv[1]))

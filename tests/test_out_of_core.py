"""Out-of-core data: a packed, memory-mapped level gives the same batches and the same training
as the in-memory dataset read from the same ANI-1x release file."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector

from metamlip.config import ModelSection
from metamlip.data.batching import StructureBatcher
from metamlip.data.lazy_batching import PackedBatcher
from metamlip.data.packed import PackedLevel, pack_hdf5
from metamlip.data.references import EnergyReference
from metamlip.errors import InputError
from metamlip.readers import read_dataset
from metamlip.training.loop import MixedBatchEpochs, Task, TrainingSettings
from metamlip.training.run_training import new_potential

LEVEL = "wb97x/6-31g(d)"


@pytest.fixture(scope="module")
def packed_and_memory(data_dir, tmp_path_factory):
    path = data_dir / "ani1x_release_sample.h5"
    folders = pack_hdf5(path, tmp_path_factory.mktemp("packed"), levels=[LEVEL])
    (in_memory,) = read_dataset(path, levels=[LEVEL])
    return PackedLevel.open(folders[LEVEL]), in_memory


def test_packed_level_holds_the_same_structures(packed_and_memory):
    packed, memory = packed_and_memory
    assert len(packed) == len(memory) >= 8 and packed.level == memory.level and packed.has_forces == memory.has_forces
    np.testing.assert_array_equal(packed.n_atoms, memory.n_atoms)
    np.testing.assert_array_equal(packed.energies_ev, memory.energies_ev)
    np.testing.assert_array_equal(packed.composition_matrix(memory.elements), memory.composition_matrix(memory.elements))
    subset = np.array([5, 0, 3])
    np.testing.assert_array_equal(packed.subset(subset).energies_ev, memory.subset(subset).energies_ev)


def test_packed_batches_equal_in_memory_batches(packed_and_memory):
    packed, memory = packed_and_memory
    species = memory.elements
    lazy, eager = PackedBatcher(packed, species, 5.0), StructureBatcher(memory, species, 5.0)
    for lazy_batch, eager_batch in zip(lazy.batches(3, seed=3), eager.batches(3, seed=3), strict=True):
        for name in eager_batch.__dataclass_fields__:
            first, second = getattr(lazy_batch, name), getattr(eager_batch, name)
            if isinstance(second, torch.Tensor):
                torch.testing.assert_close(first, second, rtol=0, atol=0, msg=name)
            else:
                assert first == second, name


def test_training_on_packed_data_matches_in_memory(packed_and_memory):
    packed, memory = packed_and_memory
    section = ModelSection(n_features=8, n_sensitivities=4, n_interaction_layers=1, n_atom_layers=1, cutoff_angstrom=5.0, seed=2)
    model = new_potential(section, memory.elements)
    model.add_level(EnergyReference.fit(packed, model.species))
    twin = copy.deepcopy(model)
    settings = TrainingSettings(batch_size=3, progress=False)
    results = []
    for potential, batcher in ((model, PackedBatcher(packed, model.species, 5.0)), (twin, StructureBatcher(memory, model.species, 5.0))):
        plan = MixedBatchEpochs([Task(LEVEL, batcher)], settings, steps_per_epoch=4)
        plan.run_epoch(potential, plan.make_optimizer(list(potential.parameters()), settings), epoch=1)
        results.append(parameters_to_vector(potential.parameters()).detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_packed_level_pickles_without_open_maps(packed_and_memory):
    """Worker processes reopen the memory maps instead of sharing them across fork or spawn."""
    packed, _ = packed_and_memory
    packed.energies_of(np.arange(2))
    clone = pickle.loads(pickle.dumps(packed))
    assert clone._arrays is None and np.array_equal(clone.energies_of(np.arange(2)), packed.energies_of(np.arange(2)))


def test_not_a_packed_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="not a packed level"):
        PackedLevel.open(tmp_path)


def test_pack_command_writes_one_folder_per_requested_level(tmp_path, data_dir, capsys):
    from metamlip.cli.main import main

    assert main(["pack", str(data_dir / "ani1x_release_sample.h5"), "--out", str(tmp_path), "--levels", "wb97x/6-31g*"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("wb97x/6-31g(d): ")
    assert (tmp_path / printed[0].split(": ")[1] / "meta.json").is_file()


# --- `metamlip pretrain` on a packed folder (`format: packed`) ---------------------------------


def write_synthetic_release(path, groups: int = 8, conformers: int = 30, seed: int = 0) -> None:
    """A small ANI-1x release-layout file: `groups` random H/C/N/O formulas (3 to 7 atoms) of
    `conformers` jittered geometries each; energies and forces in Hartree(/Angstrom), not physical."""
    import h5py

    generator = np.random.default_rng(seed)
    with h5py.File(path, "w") as file:
        for index in range(groups):
            n_atoms = int(generator.integers(3, 8))
            numbers = generator.choice([1, 6, 7, 8], size=n_atoms, p=[0.5, 0.3, 0.1, 0.1])
            base = np.cumsum(generator.uniform(0.9, 1.4, size=(n_atoms, 3)) * generator.choice([-1, 1], size=(n_atoms, 3)) / 1.7, axis=0)
            group = file.create_group(f"mol{index:03d}")
            group["atomic_numbers"] = numbers
            group["coordinates"] = base + generator.normal(0.0, 0.05, size=(conformers, n_atoms, 3))
            group["wb97x_dz.energy"] = -0.5 * (numbers == 1).sum() - 38.0 * (numbers > 1).sum() + generator.normal(0.0, 0.01, size=conformers)
            group["wb97x_dz.forces"] = generator.normal(0.0, 0.02, size=(conformers, n_atoms, 3))


@pytest.fixture(scope="module")
def synthetic_release(tmp_path_factory) -> tuple:
    """(release-layout HDF5 file, its packed wb97x/6-31g(d) folder) with 240 conformers."""
    folder = tmp_path_factory.mktemp("synthetic")
    path = folder / "release.h5"
    write_synthetic_release(path)
    return path, pack_hdf5(path, folder / "packed", levels=[LEVEL])[LEVEL]


def write_pretrain_config(tmp_path, name: str, datasets: list[dict], strategy: str = "reptile") -> str:
    import yaml

    config = {
        "datasets": datasets,
        "strategy": strategy,
        "split_seed": 3,
        "model": {"n_features": 8, "n_sensitivities": 4, "n_interaction_layers": 1, "n_atom_layers": 1, "cutoff_angstrom": 5.0, "seed": 2},
        "pretrain": {
            "gradient_steps": 6, "steps_per_epoch": 3, "validation_fraction": 0.2,
            "training": {"batch_size": 16, "progress": False, "checkpoint_interval_seconds": 1000.0},
        },
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def test_pretrain_command_trains_on_a_packed_folder_without_a_pair_table(synthetic_release, tmp_path, monkeypatch):
    from metamlip.cli.main import main

    def no_pair_table(*args, **kwargs):
        raise AssertionError("a packed level must not build a whole-dataset pair table")

    monkeypatch.setattr("metamlip.data.batching.build_pair_table", no_pair_table)
    _, folder = synthetic_release
    config = write_pretrain_config(tmp_path, "packed", [{"path": str(folder), "format": "packed", "levels": ["wB97X/6-31G*"]}], "joint")
    assert main(["pretrain", config]) == 0
    assert (tmp_path / "packed" / "model.pt").is_file()


def test_pretraining_from_a_packed_folder_equals_pretraining_in_memory(synthetic_release, tmp_path, data_dir):
    """Same split, same references, same batches: a packed level beside an in-memory one gives the
    weights of reading both into memory."""
    from metamlip.cli.main import main

    path, folder = synthetic_release
    qm7x = {"path": str(data_dir / "qm7x_226_raw.npz")}
    packed = write_pretrain_config(tmp_path, "packed", [{"path": str(folder), "format": "packed"}, qm7x])
    memory = write_pretrain_config(tmp_path, "memory", [{"path": str(path)}, qm7x])
    assert main(["pretrain", packed]) == 0 and main(["pretrain", memory]) == 0
    first, second = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("packed", "memory"))
    assert first["model"] == second["model"]  # levels, heads and fitted references
    assert first["state_dict"].keys() == second["state_dict"].keys()
    for name, tensor in first["state_dict"].items():
        torch.testing.assert_close(tensor, second["state_dict"][name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("make_folder", [False, True], ids=["missing", "not-packed"])
def test_a_bad_packed_folder_in_a_config_is_one_line_naming_it(tmp_path, capsys, make_folder):
    from metamlip.cli.main import main

    folder = tmp_path / "no_such_level"
    if make_folder:
        folder.mkdir()
    config = write_pretrain_config(tmp_path, "run", [{"path": str(folder), "format": "packed"}])
    assert main(["pretrain", config]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and str(folder) in message
    assert ("not a packed level" if make_folder else "no such file") in message
    assert not (tmp_path / "run" / "model.pt").exists()


def test_packed_source_options_are_checked(synthetic_release):
    from metamlip.data.packed import open_packed

    _, folder = synthetic_release
    with pytest.raises(InputError, match="no level 'hf/cc-pvdz'"):
        open_packed(folder, levels=["hf/cc-pvdz"])
    with pytest.raises(InputError, match=r"the option `energy_unit` does not apply"):
        open_packed(folder, energy_unit="kcal/mol")
    with pytest.raises(InputError, match="opened lazily from a config"):
        read_dataset(folder, format="packed")


# --- every command that reads configured data accepts packed levels ----------------------------

TARGET = "wb97x/def2-tzvpp"
SMALL_MODEL = {"n_features": 8, "n_sensitivities": 4, "n_interaction_layers": 1, "n_atom_layers": 1, "cutoff_angstrom": 5.0, "seed": 2}
QUIET = {"batch_size": 4, "progress": False, "checkpoint_interval_seconds": 1000.0}


@pytest.fixture(scope="module")
def packed_target(data_dir, tmp_path_factory) -> tuple[dict, dict]:
    """The real ANI-1x sample's wB97X/def2-TZVPP level (8 conformers, forces) as
    (packed source, the same level read into memory)."""
    path = data_dir / "ani1x_release_sample.h5"
    folder = pack_hdf5(path, tmp_path_factory.mktemp("target"), levels=[TARGET])[TARGET]
    return {"path": str(folder), "format": "packed"}, {"path": str(path), "levels": [TARGET]}


def write_yaml(tmp_path, name: str, config: dict) -> str:
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return str(path)


def assert_same_model(first_path, second_path) -> None:
    first, second = (torch.load(path, weights_only=True) for path in (first_path, second_path))
    assert first["model"] == second["model"]
    for name, tensor in first["state_dict"].items():
        torch.testing.assert_close(tensor, second["state_dict"][name], rtol=1e-6, atol=1e-7, msg=name)


def test_train_command_on_a_packed_folder_equals_training_in_memory(synthetic_release, tmp_path):
    import json

    from metamlip.cli.main import main

    path, folder = synthetic_release
    sources = {"packed": {"path": str(folder), "format": "packed"}, "memory": {"path": str(path)}}
    for name, source in sources.items():
        config = {"datasets": [source], "split": {"seed": 1, "train": 0.6, "validation": 0.2}, "model": SMALL_MODEL,
                  "training": {**QUIET, "batch_size": 16, "max_epochs": 2}, "output_dir": str(tmp_path / name)}
        assert main(["train", write_yaml(tmp_path, name, config)]) == 0
    assert_same_model(tmp_path / "packed" / "model.pt", tmp_path / "memory" / "model.pt")
    packed, memory = (json.loads((tmp_path / name / "test_metrics.json").read_text())[LEVEL] for name in sources)
    assert packed["n_structures"] == memory["n_structures"] == 48
    for key, value in memory.items():
        assert packed[key] == pytest.approx(value, rel=1e-6), key


def test_finetune_and_evaluate_commands_on_a_packed_target_equal_in_memory(synthetic_release, packed_target, tmp_path, capsys):
    from metamlip.cli.main import main

    _, folder = synthetic_release
    pretrain_config = write_pretrain_config(tmp_path, "pretrained", [{"path": str(folder), "format": "packed"}], "joint")
    assert main(["pretrain", pretrain_config]) == 0
    for name, source in zip(("packed", "memory"), packed_target):
        config = {"checkpoint": str(tmp_path / "pretrained" / "model.pt"), "dataset": source, "n_finetune": 4, "n_validation": 2,
                  "n_test": 2, "training": {**QUIET, "max_epochs": 3}, "output_dir": str(tmp_path / name)}
        assert main(["finetune", write_yaml(tmp_path, f"finetune-{name}", config)]) == 0
    assert_same_model(tmp_path / "packed" / "model.pt", tmp_path / "memory" / "model.pt")
    capsys.readouterr()
    packed_source, memory_source = packed_target
    tables = []
    for arguments in (["--format", "packed", packed_source["path"]], [memory_source["path"]]):
        assert main(["evaluate", str(tmp_path / "packed" / "model.pt"), *arguments, "--model-level", TARGET]) == 0
        tables.append([line for line in capsys.readouterr().out.splitlines() if line.startswith(TARGET)])
    assert len(tables[0]) == 1 and tables[0] == tables[1]  # the file in memory holds more levels; its TARGET row is the same


def test_experiment_on_packed_levels_equals_experiment_in_memory(synthetic_release, packed_target, tmp_path):
    from metamlip.config import load_config
    from metamlip.experiment.config import ExperimentConfig
    from metamlip.experiment.run import run_experiment

    path, folder = synthetic_release
    sources = {"packed": [{"path": str(folder), "format": "packed"}, packed_target[0]], "memory": [{"path": str(path)}, packed_target[1]]}
    results = {}
    for name, datasets in sources.items():
        config = {
            "datasets": datasets, "pretrain_levels": [LEVEL], "target_level": TARGET, "strategies": ["scratch", "joint"], "n_test": 2,
            "model": SMALL_MODEL,
            "pretrain": {"gradient_steps": 4, "steps_per_epoch": 2, "training": QUIET},
            "finetune": {"n_finetune": [4], "seeds": 1, "training": {**QUIET, "max_epochs": 2}},
            "threads": 1, "output_dir": str(tmp_path / name),
        }
        results[name] = run_experiment(load_config(write_yaml(tmp_path, name, config), ExperimentConfig))
    packed, memory = (sorted(results[name]["records"], key=lambda record: record["strategy"]) for name in sources)
    assert [record["strategy"] for record in packed] == ["joint", "scratch"]
    for first, second in zip(packed, memory):
        assert first["energy_mae_ev"]["mean"] == pytest.approx(second["energy_mae_ev"]["mean"], rel=1e-6)
        assert first["force_mae_ev_per_angstrom"]["mean"] == pytest.approx(second["force_mae_ev_per_angstrom"]["mean"], rel=1e-6)


def test_packing_some_levels_reads_only_their_label_keys(data_dir, tmp_path, monkeypatch):
    import metamlip.readers.ani1x_release as release

    read_keys = set()
    original = release._values

    def recording(name, group, key, shape):
        read_keys.add(key)
        return original(name, group, key, shape)

    monkeypatch.setattr(release, "_values", recording)
    folders = pack_hdf5(data_dir / "ani1x_release_sample.h5", tmp_path, levels=[LEVEL, "mp2/cc-pvdz"])
    assert sorted(folders) == ["mp2/cc-pvdz", LEVEL]
    assert read_keys == {"wb97x_dz.energy", "wb97x_dz.forces", "hf_dz.energy", "mp2_dz.corr_energy"}
    (in_memory,) = read_dataset(data_dir / "ani1x_release_sample.h5", levels=["mp2/cc-pvdz"])
    np.testing.assert_array_equal(PackedLevel.open(folders["mp2/cc-pvdz"]).energies_ev, in_memory.energies_ev)


@pytest.mark.parametrize(
    "name, options",
    [("spice_1.1.4_sample.h5", {}), ("comp6_s66x8_wb97x_631gd_4mol.h5", {}), ("ani1x_release_sample.h5", {"levels": [LEVEL]})],
    ids=["spice", "comp6", "ani1x-release"],
)
def test_every_hdf5_layout_packs_to_the_structures_read_into_memory(data_dir, tmp_path, name, options):
    folders = pack_hdf5(data_dir / name, tmp_path, **options)
    in_memory = read_dataset(data_dir / name, **options)
    assert sorted(folders) == sorted(dataset.level for dataset in in_memory)
    for memory in in_memory:
        packed = PackedLevel.open(folders[memory.level])
        assert len(packed) == len(memory) > 0 and packed.has_forces == memory.has_forces
        np.testing.assert_array_equal(packed.n_atoms, memory.n_atoms)
        np.testing.assert_array_equal(packed.energies_ev, memory.energies_ev)
        np.testing.assert_array_equal(packed.forces_ev_per_angstrom, memory.forces_ev_per_angstrom)
        batch, twin = PackedBatcher(packed, memory.elements, 5.0).batch(np.arange(len(memory))), StructureBatcher(memory, memory.elements, 5.0).batch(np.arange(len(memory)))
        torch.testing.assert_close(batch.positions_angstrom, twin.positions_angstrom, rtol=0, atol=0)
        torch.testing.assert_close(batch.species_index, twin.species_index, rtol=0, atol=0)


def test_an_hdf5_file_of_no_known_layout_is_a_clear_error(tmp_path):
    import h5py

    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file.create_group("mol")["xyz"] = np.zeros((2, 3))
    with pytest.raises(InputError, match="no molecule groups of a known HDF5 layout"):
        pack_hdf5(path, tmp_path / "out")

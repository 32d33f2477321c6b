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
from metamlip.data.packed import PackedLevel, pack_release
from metamlip.data.references import EnergyReference
from metamlip.errors import InputError
from metamlip.readers import read_dataset
from metamlip.training.loop import MixedBatchEpochs, Task, TrainingSettings
from metamlip.training.run_training import new_potential

LEVEL = "wb97x/6-31g(d)"


@pytest.fixture(scope="module")
def packed_and_memory(data_dir, tmp_path_factory):
    path = data_dir / "ani1x_release_sample.h5"
    folders = pack_release(path, tmp_path_factory.mktemp("packed"), levels=[LEVEL])
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

"""Checkpoints (metamlip.training.checkpoint): exact round trip, safe loading, atomic writes,
clear errors for files that are not checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from metamlip.data.references import EnergyReference
from metamlip.errors import InputError
from metamlip.model.hipnn import HipnnConfig
from metamlip.model.potential import Potential, build_potential
from metamlip.readers import read_level
from metamlip.testing import predict_structures
from metamlip.training.checkpoint import load_potential, read_checkpoint, save_checkpoint

DATA = Path(__file__).parent / "data"
SMALL_HIPNN = HipnnConfig(n_features=12, n_sensitivities=6, n_interaction_layers=2, n_atom_layers=1, cutoff_angstrom=5.0)


@pytest.fixture(scope="module")
def ethanol_frames() -> list[Atoms]:
    dataset = read_level(DATA / "md17_ethanol_dft.npz", energy_unit="kcal/mol", level="pbe+vdw-ts")
    return [dataset.to_atoms(index) for index in (0, 500, 1500)]


def two_level_model(dtype: torch.dtype, seed: int = 0) -> Potential:
    """Two heads, two made-up per-element references, non-trivial weights in every head."""
    model = build_potential([1, 6, 8], SMALL_HIPNN, seed=seed, dtype=dtype)
    model.add_level(EnergyReference("pbe+vdw-ts", [1, 6, 8], np.array([-13.7, -1030.1, -2043.0])))
    model.add_level(EnergyReference("ccsd(t)/cc-pvdz", [1, 6, 8], np.array([-13.5, -1029.0, -2041.9])), head="coupled")
    with torch.no_grad():
        for head in model.heads.values():
            head.layers[0].weight.normal_(generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_gives_identical_predictions(tmp_path: Path, ethanol_frames: list[Atoms], dtype: torch.dtype) -> None:
    model = two_level_model(dtype)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    loaded = load_potential(path)
    assert loaded.describe() == model.describe()
    assert next(loaded.parameters()).dtype == dtype
    assert not loaded.training
    for level in model.levels:
        before = predict_structures(model, ethanol_frames, level)
        after = predict_structures(loaded, ethanol_frames, level)
        np.testing.assert_array_equal(after.energy_ev, before.energy_ev)
        for forces_after, forces_before in zip(after.forces_ev_per_angstrom, before.forces_ev_per_angstrom):
            np.testing.assert_array_equal(forces_after, forces_before)


def test_loads_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, two_level_model(torch.float64), training_state={"epoch": 3}, extra={"note": "x"})
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["format"] == "metamlip-checkpoint"
    assert payload["units"] == {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom"}
    assert payload["dtype"] == "float64"
    assert payload["model"]["level_heads"] == {"pbe+vdw-ts": "shared", "ccsd(t)/cc-pvdz": "coupled"}
    assert payload["training_state"] == {"epoch": 3} and payload["extra"] == {"note": "x"}
    assert all(isinstance(tensor, torch.Tensor) for tensor in payload["state_dict"].values())


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, two_level_model(torch.float64, seed=0))
    previous = path.read_bytes()

    def crash(payload: object, target, *args, **kwargs) -> None:
        """Write half a file, then fail, as a full disk or a kill mid-write would."""
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(b"PK half a checkpoint")
        else:
            target.write(b"PK half a checkpoint")
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, two_level_model(torch.float64, seed=1))
    assert path.read_bytes() == previous
    assert sorted(child.name for child in tmp_path.iterdir()) == ["model.pt"]
    monkeypatch.undo()
    load_potential(path)


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint\n", encoding="utf-8")
    with pytest.raises(InputError, match="notes.pt"):
        load_potential(path)


def test_foreign_torch_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, path)
    with pytest.raises(InputError, match="foreign.pt: not a metamlip checkpoint"):
        read_checkpoint(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="absent.pt"):
        load_potential(tmp_path / "absent.pt")

"""Checkpoints: one file with weights, model description, per-level references, species,
units, package version and (optionally) the state needed to resume training.

Written atomically (temporary file in the same folder, fsync, rename), and loaded with
``torch.load(..., weights_only=True)``: a checkpoint holds only tensors and plain types.
"""

from __future__ import annotations

from pathlib import Path

import torch

from metamlip import __version__
from metamlip.atomic_files import write_atomically
from metamlip.errors import InputError
from metamlip.model.potential import Potential

CHECKPOINT_FORMAT = "metamlip-checkpoint"
CHECKPOINT_FORMAT_VERSION = 2  # the newest format this metamlip reads
# Format a checkpoint is written in, by backbone: 1 = HIP-NN (readable by every metamlip), 2 = MACE,
# which a metamlip from before the backbone interface cannot build: it then says the format is
# newer instead of failing on unknown weights.
BACKBONE_FORMAT_VERSION: dict[str, int] = {"hipnn": 1, "mace": 2}
UNITS = {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom"}


def atomic_torch_save(payload: dict, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, then rename over it."""
    write_atomically(path, lambda stream: torch.save(payload, stream))


def save_checkpoint(path: str | Path, model: Potential, training_state: dict | None = None, extra: dict | None = None) -> None:
    """Write `model` (and optional resumable training state and metadata) to `path` atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": BACKBONE_FORMAT_VERSION[model.describe()["backbone_name"]],
        "metamlip_version": __version__,
        "units": dict(UNITS),
        "model": model.describe(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
        "training_state": training_state,
        "extra": extra or {},
    }
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dictionary; InputError naming the file if it is not a metamlip checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: " + ("a folder, not a checkpoint file" if path.is_dir() else "no such checkpoint file"))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        raise InputError(f"{path}: not a readable checkpoint ({type(error).__name__}: {first_line})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a metamlip checkpoint")
    problem = _payload_problem(payload)
    if problem:
        raise InputError(f"{path}: damaged checkpoint: {problem}")
    if payload["format_version"] > CHECKPOINT_FORMAT_VERSION:
        raise InputError(
            f"{path}: checkpoint format {payload['format_version']} is newer than this metamlip "
            f"(reads up to {CHECKPOINT_FORMAT_VERSION}, metamlip {__version__}); upgrade metamlip"
        )
    return payload


PAYLOAD_TYPES: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "model": dict,
    "dtype": str,
    "state_dict": dict,
    "training_state": (dict, type(None)),
    "extra": dict,
}


def _payload_problem(payload: dict) -> str:
    """What is wrong with the fields of a checkpoint dictionary (empty string: nothing)."""
    for key, kind in PAYLOAD_TYPES.items():
        if not isinstance(payload.get(key), kind):
            return f"{key!r} is missing or has the wrong type"
    if payload["dtype"] not in ("float32", "float64"):
        return f"'dtype' is {payload['dtype']!r}, not float32 or float64"
    if not all(isinstance(tensor, torch.Tensor) for tensor in payload["state_dict"].values()):
        return "'state_dict' holds something other than tensors"
    return ""


def model_from_checkpoint(payload: dict, path: str | Path = "checkpoint") -> Potential:
    """Rebuild the potential stored in a checkpoint dictionary (read from `path`, named in errors)."""
    try:
        model = Potential.from_description(payload["model"]).to(getattr(torch, payload["dtype"]))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:160]
        raise InputError(f"{path}: damaged checkpoint: model and weights do not fit ({type(error).__name__}: {first_line})") from None
    return model


def load_potential(path: str | Path) -> Potential:
    """The potential stored at `path`, in evaluation mode."""
    return model_from_checkpoint(read_checkpoint(path), path).eval()

"""Pre-trained models shipped inside the package: NAME.pt (a metamlip checkpoint, written by
`metamlip.training.checkpoint.save_checkpoint`) and NAME.json (its model card) in this folder,
found through importlib.resources.

`load(NAME)` gives the model (for `metamlip.finetune.finetune`, with the strategy its card names,
or for the calculator); `metamlip finetune` takes a NAME as its `checkpoint:` as well as a file.
Every function takes another `folder` of NAME.pt + NAME.json pairs instead of the shipped one.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import torch

from metamlip.calculator import torch_dtype
from metamlip.errors import InputError
from metamlip.model.potential import Potential
from metamlip.training.checkpoint import load_potential

SHIPPED_FOLDER = Path(str(importlib.resources.files(__name__)))  # metamlip installs unzipped: a real folder
CARD_KEYS = (
    "description",  # what the model is, in a sentence or two
    "strategy",  # the pre-training strategy (`metamlip.strategies`), also the fine-tuning one
    "levels",  # its levels of theory (normalised names)
    "elements",  # element symbols it knows
    "training_data",  # datasets, sizes and licences
    "budget",  # gradient steps, wall time, hardware
    "validation_errors",  # per level: energy and force errors on held-out structures
    "intended_use",
    "limits",
)


def list_pretrained(folder: Path | None = None) -> list[str]:
    """Names of the shipped models (of `folder`), sorted."""
    return sorted(path.stem for path in (folder or SHIPPED_FOLDER).glob("*.pt"))


def checkpoint_path(name: str, folder: Path | None = None) -> Path:
    """The checkpoint file of shipped model `name`; InputError listing the names for an unknown one."""
    names = list_pretrained(folder)
    if name not in names:
        raise InputError(f"no pre-trained model {name!r}; {available(names)}")
    return (folder or SHIPPED_FOLDER) / f"{name}.pt"


def model_card(name: str, folder: Path | None = None) -> dict:
    """The model card of shipped model `name` (the keys of `CARD_KEYS`, and any others) as data."""
    path = checkpoint_path(name, folder).with_suffix(".json")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"pre-trained model {name!r}: its model card {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"pre-trained model {name!r}: {path} is not a JSON model card ({error})") from None
    missing = [key for key in CARD_KEYS if not isinstance(card, dict) or key not in card]
    if missing:
        raise InputError(f"pre-trained model {name!r}: its model card {path} lacks {missing}")
    return card


def load(name: str, dtype: str | torch.dtype | None = None, folder: Path | None = None) -> Potential:
    """Shipped model `name` in evaluation mode (loaded with weights_only=True), cast to `dtype`
    ("float32", "float64" or a torch dtype; None keeps the checkpoint's)."""
    return load_potential(checkpoint_path(name, folder)).to(dtype=torch_dtype(dtype))


def checkpoint_or_shipped(value: str, candidate: Path, key: str = "checkpoint", folder: Path | None = None) -> Path:
    """The checkpoint that config key `key` = `value` means: the file `candidate` (`value` as a path)
    when it exists, else the shipped model named `value`; InputError naming both when neither."""
    if candidate.exists():
        return candidate
    names = list_pretrained(folder)
    if value in names:
        return checkpoint_path(value, folder)
    raise InputError(f"config key {key!r}: {value!r} is neither a checkpoint file ({candidate}: no such file) nor a shipped pre-trained model ({available(names)})")


def available(names: list[str]) -> str:
    """'shipped: a, b', or that none is."""
    return f"shipped: {', '.join(names)}" if names else "this metamlip ships none"

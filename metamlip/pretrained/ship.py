"""Make a shipped model from a pre-trained checkpoint: NAME.pt (the checkpoint, unchanged) and
NAME.json, a model card whose strategy, levels, elements, budget and per-level validation errors
are read from the checkpoint itself (the pre-training summary that `metamlip experiment` and
`metamlip pretrain` store in it), so that only the prose is written by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ase.data import chemical_symbols

from metamlip.atomic_files import write_json_atomically
from metamlip.errors import InputError
from metamlip.pretrained import CARD_KEYS, SHIPPED_FOLDER
from metamlip.training.checkpoint import atomic_torch_save, model_from_checkpoint, read_checkpoint

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
BUDGET_KEYS = ("gradient_steps", "epochs", "best_epoch", "wall_seconds", "stop_reason")


def card_from_checkpoint(payload: dict, source: Path, **prose) -> dict:
    """The model card of checkpoint `payload` (read from `source`): `prose` gives the hand-written
    keys (description, training_data, intended_use, limits, and optionally budget entries such as
    hardware under ``budget_notes``); the rest comes from the checkpoint. Errors in meV and
    meV/Angstrom."""
    extra = payload["extra"]
    if "strategy" not in extra or "pretraining" not in extra:
        raise InputError(f"{source}: no pre-training summary in this checkpoint (write it with `metamlip experiment` or `metamlip pretrain`)")
    summary = json.loads(extra["pretraining"])
    model = model_from_checkpoint(payload, source)
    budget = {key: summary[key] for key in BUDGET_KEYS if key in summary} | prose.pop("budget_notes", {})
    errors = {
        level: {
            "energy_mae_mev": round(1000 * metrics["energy_mae_ev"], 2),
            "force_mae_mev_per_angstrom": None if metrics["force_mae_ev_per_angstrom"] is None else round(1000 * metrics["force_mae_ev_per_angstrom"], 2),
        }
        for level, metrics in summary["validation"].items()
    }
    card = {
        "strategy": extra["strategy"],
        "levels": list(model.levels),
        "elements": [chemical_symbols[z] for z in model.species],
        "architecture": {"backbone": payload["model"]["backbone_name"], **payload["model"]["backbone"], "dtype": payload["dtype"]},
        "budget": budget,
        "validation_errors": errors,
        "source_checkpoint": source.name,
    } | prose
    missing = [key for key in CARD_KEYS if key not in card]
    if missing:
        raise InputError(f"model card of {source}: give {missing}")
    return card


def ship(checkpoint: str | Path, name: str, folder: str | Path = SHIPPED_FOLDER, **prose) -> dict:
    """Write `folder`/NAME.pt (a copy of `checkpoint`) and NAME.json (`card_from_checkpoint`), each
    atomically; returns the card. `load(name, folder=folder)` then finds it."""
    if not NAME_PATTERN.fullmatch(name):
        raise InputError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (it names the files)")
    checkpoint, folder = Path(checkpoint), Path(folder)
    payload = read_checkpoint(checkpoint)
    card = {"name": name} | card_from_checkpoint(payload, checkpoint, **prose)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(payload | {"training_state": None}, folder / f"{name}.pt")
    write_json_atomically(folder / f"{name}.json", card)
    for path in (folder / f"{name}.pt", folder / f"{name}.json"):
        path.chmod(0o644)  # package data: readable by every user of an installation
    return card

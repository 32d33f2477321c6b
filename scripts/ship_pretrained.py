"""Ship a pre-trained model of the organic study: NAME.pt + NAME.json in metamlip/pretrained/.

    python scripts/ship_pretrained.py runs/organic_paracetamol_study/pretrained/STRATEGY-KEY.pt \
        --name NAME --config metamlip/configs/organic_paracetamol_study.yaml --description "..."

(`qm7x-pbe0mbd-hcno-v1` was shipped from ``single_pbe0+mbd-c4750c1fc587.pt``, the description in its card.)

`metamlip.pretrained.ship` copies the checkpoint and writes the model card: strategy, levels,
elements, architecture, budget and per-level validation errors from the checkpoint's own
pre-training summary; the training data from the bundled manifests of the config's files; the
intended use and limits below. Nothing measured is typed by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metamlip.config import load_config
from metamlip.experiment.config import ExperimentConfig
from metamlip.levels import normalise_level
from metamlip.model.backbone_choice import backbone_name
from metamlip.pretrained.ship import ship
from metamlip.training.checkpoint import load_potential

INTENDED_USE = (
    "A starting point for fine-tuning (`metamlip finetune` with `checkpoint: NAME`, or "
    "`metamlip.pretrained.load(NAME)`) to a new level of theory with few structures: neutral, "
    "closed-shell organic molecules of H, C, N and O in the gas phase, up to a few tens of atoms."
)
LIMITS = [
    "Elements H, C, N, O only: another element is an error at fine-tuning that names it, unless "
    "`finetune.new_elements: add` gives it fresh, untrained weights.",
    "No charge or spin input: neutral closed-shell molecules only. No periodic systems and no "
    "condensed phase in the training data.",
    "Not a ready-made potential: predictions at a pre-training level are only as good as the "
    "validation errors in this card; refit to your level before use.",
]
BACKBONE_NAMES = {"hipnn": "HIP-NN", "mace": "MACE"}
SIZE_LIMIT = "A small {backbone} model ({parameters} parameters) pre-trained on {structures} structures on one CPU core: not a foundation model."


def training_data(config: ExperimentConfig, model_levels: list[str]) -> list[dict]:
    """Per level of the model (a single-level transfer model has one): structures, forces, origin
    and dataset, from the bundled manifests of the config's files."""
    described = []
    for source in config.datasets:
        path = Path(source.path)
        manifest = json.loads((path.parent / "manifest.json").read_text(encoding="utf-8"))
        for level, entry in manifest["levels"].items():
            if entry["file"] == path.name and normalise_level(level) in model_levels:
                described.append({"level": level, "structures": entry["n_structures"], "forces": entry["forces"],
                                  "origin": entry["origin"], "dataset": manifest["name"]})
    return described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a cached pre-trained model of `metamlip experiment`")
    parser.add_argument("--name", required=True, help="shipped name, e.g. organic-hcno-v1")
    parser.add_argument("--config", type=Path, required=True, help="the experiment config that pre-trained it")
    parser.add_argument("--description", required=True, help="one or two sentences placed first in the card")
    args = parser.parse_args()
    config = load_config(args.config, ExperimentConfig)
    model = load_potential(args.checkpoint)
    data = training_data(config, model.levels)
    size = SIZE_LIMIT.format(
        backbone=BACKBONE_NAMES[backbone_name(model.config)],
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        structures=sum(entry["structures"] for entry in data),
    )
    card = ship(
        args.checkpoint, args.name,
        description=args.description,
        training_data=data,
        intended_use=INTENDED_USE,
        limits=[*LIMITS, size],
        budget_notes={"hardware": "one core of a shared 2-core CPU machine, one PyTorch thread", "config": args.config.as_posix()},
    )
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()

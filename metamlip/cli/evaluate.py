"""`metamlip evaluate CHECKPOINT DATA`: error metrics and a parity plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from metamlip.cli.flags import options_as_flags
from metamlip.config import DataSource
from metamlip.data.lazy_batching import make_batcher
from metamlip.data.sources import read_source
from metamlip.evaluation.metrics import error_metrics, predict
from metamlip.evaluation.parity import plot_parity
from metamlip.evaluation.table import format_metrics_table
from metamlip.training.checkpoint import load_potential


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="errors of a trained potential on labelled structures")
    parser.add_argument("checkpoint", help="model file written by train/finetune (model.pt)")
    parser.add_argument("data", help="labelled structures (any format metamlip reads, or a packed level folder)")
    parser.add_argument("--format", help="file format (default: detected; 'packed' for a `metamlip pack` folder)")
    parser.add_argument("--data-level", help="level of theory of DATA when the file does not say")
    parser.add_argument("--energy-unit", help="energy unit of DATA when the file does not say")
    parser.add_argument("--length-unit", help="length unit of DATA when the file does not say")
    parser.add_argument("--energy-key", help="name of DATA's energy entry (e.g. an extended XYZ info key)")
    parser.add_argument("--forces-key", help="name of DATA's forces entry")
    parser.add_argument("--model-level", help="which of the model's levels to predict (default: DATA's level)")
    parser.add_argument("--kcal", action="store_true", help="report kcal/mol and kcal/mol/Angstrom")
    parser.add_argument("--out", help="folder for metrics.json and parity PNGs")
    parser.add_argument("--native", action="store_true", help="run a HIP-NN model's kernels as compiled C++ (built once, ~30 s)")
    parser.set_defaults(run=run)


FLAGS = {  # reader option: flag
    "energy_unit": "--energy-unit", "length_unit": "--length-unit", "level": "--data-level",
    "energy_key": "--energy-key", "forces_key": "--forces-key",
}


def run(args: argparse.Namespace) -> int:
    model = load_potential(args.checkpoint)
    if args.native:
        model.use_native()
    source = DataSource(
        args.data, args.format, args.data_level, energy_unit=args.energy_unit, length_unit=args.length_unit,
        energy_key=args.energy_key, forces_key=args.forces_key,
    )
    with options_as_flags(FLAGS):
        datasets = read_source(source)
    metrics = {}
    for dataset in datasets:
        model_level = model.resolve_level(args.model_level or (dataset.level if dataset.level in model.levels else None))
        batcher = make_batcher(dataset, model.species, model.config.cutoff_angstrom, next(model.parameters()).dtype)
        predictions = predict(model, batcher, level=model_level)
        metrics[dataset.level] = error_metrics(predictions)
        if args.out:
            plot_parity(predictions, Path(args.out) / f"parity_{len(metrics)}.png", title=f"{dataset.level} ({dataset.source})")
    print(format_metrics_table(metrics, kcal_per_mol=args.kcal))
    if args.out:
        (Path(args.out) / "metrics.json").write_text(
            json.dumps({level: m.to_dict() for level, m in metrics.items()}, indent=2), encoding="utf-8"
        )
    return 0

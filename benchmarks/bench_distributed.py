"""Distributed pre-training benchmark: one process against `torchrun --nproc_per_node P`, on CPU.

Pre-trains on the bundled ethanol-multilevel levels (7 levels, 270 training structures each,
forces) with the same config, once in a single process and once under torchrun with P gloo
processes, every process on one thread. `joint` is data parallel (each process takes 1/P of every
batch of `--batch-size`), `reptile` task parallel (m = P tasks per meta-step, one per process, k
inner steps each); for comparison, also one process of P threads. Reports training steps per
second from each run's `log.jsonl` (training time only: no start-up, no reading) and speed-ups; the two runs give the same weights (see
tests/test_distributed.py), so the ratio is pure speed.

    python benchmarks/bench_distributed.py --steps 600 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import metamlip

LEVELS = ["gfn2-xtb", "gfn1-xtb", "hf/sto-3g", "hf/3-21g", "hf/6-31g(d)", "b3lyp/6-31g(d)", "pbe+vdw-ts"]


def write_config(folder: Path, strategy: str, steps: int, batch_size: int, processes: int) -> Path:
    data = Path(metamlip.__file__).parent / "bundled" / "ethanol_multilevel"
    config = {
        "datasets": [{"path": str(path)} for path in sorted(data.glob("*.xyz"))],
        "levels": LEVELS,
        "strategy": strategy,
        "model": {"n_features": 64, "n_sensitivities": 16, "n_interaction_layers": 2, "n_atom_layers": 3, "cutoff_angstrom": 5.5},
        "pretrain": {
            "gradient_steps": steps,
            "steps_per_epoch": steps // 4,
            "validation_fraction": 0.1,
            "reptile": {"inner_steps": 5, "tasks_per_meta_step": processes},
            "training": {"batch_size": batch_size, "threads": 1, "progress": False, "checkpoint_interval_seconds": 1.0e9},
        },
        "output_dir": str(folder / strategy),
    }
    path = folder / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def training_seconds(run_dir: Path) -> float:
    """Wall time of training (all epochs, validation included) from the run's log."""
    return json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])["wall_seconds"]


def run(config: Path, run_dir: Path, processes: int, threads: int = 1) -> float:
    """Training seconds of `metamlip pretrain` on `processes` processes of `threads` threads each."""
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    overrides = ["--set", f"output_dir={run_dir}", "--set", f"pretrain.training.threads={threads}"]
    command = [sys.executable, *launcher, "-m", "metamlip", "pretrain", str(config), *overrides]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return training_seconds(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="gradient steps of each run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--strategies", default="joint,reptile")
    args = parser.parse_args()
    print(f"{args.steps} gradient steps, batch {args.batch_size}, 1 thread per process, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        for strategy in args.strategies.split(","):
            config = write_config(folder, strategy, args.steps, args.batch_size, args.processes)
            serial = run(config, folder / f"{strategy}-1", 1)
            parallel = run(config, folder / f"{strategy}-{args.processes}", args.processes)
            threaded = run(config, folder / f"{strategy}-threads", 1, args.processes)
            print(
                f"{strategy:8s} 1 process: {args.steps / serial:6.1f} steps/s   {args.processes} processes: "
                f"{args.steps / parallel:6.1f} steps/s (speed-up {serial / parallel:.2f}x)   1 process of "
                f"{args.processes} threads: {args.steps / threaded:6.1f} steps/s ({serial / threaded:.2f}x)"
            )


if __name__ == "__main__":
    main()

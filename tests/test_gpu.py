"""Training on a CUDA GPU gives the CPU's weights; runs only where PyTorch sees a GPU.

Nothing here runs on a CPU-only machine (the tests skip). On one GPU, the 2-process check puts
both processes on that GPU with gloo (NCCL needs one GPU per process); with two or more GPUs it
uses the default backends (NCCL for CUDA tensors, gloo for CPU ones), each process on its own GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_distributed as runs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def serial_weights(tmp_path: Path, name: str, device: str) -> dict[str, torch.Tensor]:
    runs.train_named(name, tmp_path / device.replace(":", "") / name, device)
    return runs.weights(tmp_path / device.replace(":", "") / name)


def assert_same(first: dict, second: dict, name: str) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key].cpu(), second[key].cpu(), rtol=1e-7, atol=1e-9, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", ["joint", "multihead", "reptile", "finetune-frozen-backbone"])
def test_training_on_the_gpu_matches_the_cpu(tmp_path, name):
    assert_same(serial_weights(tmp_path, name, "cuda"), serial_weights(tmp_path, name, "cpu"), name)


def test_two_processes_on_gpus_match_one_process_on_the_cpu(tmp_path):
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    device = "cuda"
    if torch.cuda.device_count() < 2:
        environment["METAMLIP_DIST_BACKEND"] = "gloo"
        device = "cuda:0"
    out = tmp_path / "distributed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", runs.__file__, str(out), device]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in [*runs.RUNS, *runs.FINETUNES]:
        assert_same(runs.weights(out / name), serial_weights(tmp_path, name, "cpu"), name)

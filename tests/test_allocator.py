"""Freed memory kept in the process (`metamlip.allocator`): the page faults it exists to stop."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from metamlip.allocator import keep_freed_memory
from metamlip.cli import main as cli_main

# Ten touched 4 MiB tensors freed one after another, again and again, in a fresh process: "handback"
# pins glibc's mmap threshold at its initial 128 KiB (its default adapts to the sizes seen, so the
# faults it leaves depend on what ran before: 200 to 2,200 a time here), so every block is mapped
# afresh and faulted in page by page; "keep" runs `keep_freed_memory` first.
CHURN = """
import ctypes, resource, sys, torch
from metamlip.allocator import M_MMAP_THRESHOLD, keep_freed_memory
if sys.argv[1] == "keep":
    applied = keep_freed_memory()
else:
    applied = ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1

def churn():
    blocks = [torch.ones(1 << 20) for _ in range(10)]
    while blocks:
        blocks.pop()

faults = []
for _ in range(11):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(applied, sorted(faults)[5])
"""


def faults_per_churn(mode: str) -> tuple[str, float]:
    """(whether the allocator setting applied, median minor page faults of 11 churns) in a fresh
    process (the median: the heap's one-off growths fall outside it)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    output = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env=env).stdout.split()
    return output[0], float(output[1])


def test_keeping_freed_memory_stops_the_page_faults_of_repeated_batches():
    applied, kept = faults_per_churn("keep")
    if applied != "True":
        pytest.skip("no glibc mallopt on this platform: keep_freed_memory does nothing here")
    _, handed_back = faults_per_churn("handback")
    assert handed_back > 5000  # 40 MiB mapped and touched afresh every time
    assert kept < handed_back / 20


def test_keep_freed_memory_leaves_the_users_own_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert keep_freed_memory() is False


def test_the_command_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: calls.append(True) or True)
    with pytest.raises(SystemExit):
        cli_main.main(["--version"])
    assert calls == [True]

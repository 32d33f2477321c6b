"""Shared fixtures: paths of the real data files bundled in tests/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Tests run on shared 2-core machines: one thread keeps them predictable."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR

"""Shared fixtures: tiny real data from ../shared/data (skipped when absent) and the simulator."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fluxvelo as fv

DATA_DIR = Path(os.environ.get("FLUXVELO_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

fv.settings.progress_bar = False
fv.settings.verbosity = "warning"


def shared_file(name: str) -> Path:
    """Path of a file in the shared data folder, or skip the test with the reason."""
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"{name} not found in {DATA_DIR} (set FLUXVELO_DATA_DIR to the folder that holds it)")
    return path


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; no GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

"""Shared fixtures: offline data root, a temp cache, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _offline_environment(tmp_path_factory: pytest.TempPathFactory):
    """Point the library at ../shared/data and a temp cache; never touch the network."""
    cache = tmp_path_factory.mktemp("prunelab-cache")
    old = {k: os.environ.get(k) for k in ("PRUNELAB_DATA", "PRUNELAB_CACHE", "PRUNELAB_OFFLINE")}
    os.environ["PRUNELAB_DATA"] = str(SHARED_DATA)
    os.environ["PRUNELAB_CACHE"] = str(cache)
    os.environ["PRUNELAB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    yield
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline datasets not found at {SHARED_DATA}")
    return SHARED_DATA

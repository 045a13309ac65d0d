"""Shared fixtures: offline data root, a temp cache, deterministic torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import prunelab

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


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    """A channel-pruned ResNet-20 with non-trivial BatchNorm statistics (for deployment tests:
    folding must get them right)."""
    torch.manual_seed(0)
    model = prunelab.models.create("resnet20")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return prunelab.prune(model, "l2-channel", speedup=1.5)

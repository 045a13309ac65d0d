"""Small torch helpers shared across the package: devices, batches, eval mode."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prunelab.errors import InvalidValueError


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def iter_batches(
    data: Iterable, model: nn.Module, limit: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(inputs, labels or None)`` on the model's device from tensors or (x, y) batches."""
    device = model_device(model)
    count = 0
    for batch in data:
        if limit is not None and count >= limit:
            break
        if isinstance(batch, torch.Tensor):
            x, y = batch, None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            x = batch[0]
            y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        else:
            raise InvalidValueError(
                "data must be an iterable of tensors or (inputs, labels) batches, "
                f"got a batch of type {type(batch).__name__}"
            )
        count += 1
        yield x.to(device), (y.to(device) if y is not None else None)
    if count == 0:
        raise InvalidValueError("data is empty: pass at least one batch")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run in eval mode (no BN statistic updates, no dropout), restoring the mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so the same seed gives the same numbers."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def uses_convolutions(model: nn.Module) -> bool:
    """True when the model has 2-D convolutions (where channels_last pays off on CPU)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def progress_enabled(quiet: bool = False) -> bool:
    """Progress bars only on an interactive terminal and when not asked to be quiet."""
    import os
    import sys

    return not quiet and sys.stderr.isatty() and os.environ.get("CI", "").lower() != "true"

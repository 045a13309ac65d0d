"""Saving and loading a supernet: a prunelab checkpoint plus the options it was converted with.

The file holds the supernet's weights (every width's BatchNorm included) and the zoo name of its
base model; loading rebuilds the base model, converts it the same way and loads the weights, so
nothing is unpickled. A US-Net's BatchNorm calibrations are not saved: calibrate after loading.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from prunelab.checkpoint import load_state_dict, read_checkpoint, save_checkpoint
from prunelab.errors import CheckpointError
from prunelab.slim.supernet import convert, spec_of
from prunelab.structured.graph import replay_structure


def save_supernet(path: str | os.PathLike, net: nn.Module, *, model_name: str,
                  model_kwargs: Mapping[str, Any] | None = None,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Write a supernet built from zoo model ``model_name`` (with ``model_kwargs``)."""
    options = spec_of(net).options
    return save_checkpoint(path, net, model_name=model_name, model_kwargs=model_kwargs,
                           extra={**(extra or {}), "slim": options})


def load_supernet(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The supernet saved in ``path`` and the checkpoint's contents."""
    from prunelab import models

    payload = read_checkpoint(path)
    options = payload["extra"].get("slim")
    name = payload["model"].get("name")
    if not isinstance(options, dict) or not name:
        raise CheckpointError(
            f"{str(path)!r} is not a slimmable supernet (save one with `prunelab slim train` "
            "or prunelab.slim.save_supernet)")
    model = models.create(name, **payload["model"].get("kwargs", {}))
    replay_structure(model, payload.get("structure") or [])  # a widened base model
    net = convert(model, **options)
    load_state_dict(net, payload["state_dict"])
    return net, payload

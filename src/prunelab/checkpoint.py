"""Saving and loading models with their masks.

A checkpoint is a dict saved with ``torch.save`` and always read back with
``torch.load(weights_only=True)``, so loading a file never runs code from it. It records the model's
zoo name and arguments (when known), so ``load_checkpoint(path)`` can rebuild the model by itself.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import CheckpointError
from prunelab.sparsity import prepare_for_state_dict

FORMAT = "prunelab-checkpoint"
VERSION = 1


def load_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> nn.Module:
    """Load a state dict that may contain masks into ``model`` (masks are installed first)."""
    prepare_for_state_dict(model, state_dict)
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(
            f"the weights do not fit this {type(model).__name__}: {detail[:400]} "
            "(was the checkpoint saved from another model or with other arguments?)"
        ) from None
    return model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (weights and masks) to ``path`` atomically: no partial file on a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from prunelab.structured.graph import structure_of

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": model_name, "kwargs": dict(model_kwargs or {})},
        "structure": structure_of(model),
        "state_dict": model.state_dict(),
        "extra": dict(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint file; a bare state dict is accepted too."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for unreadable files
        text = str(exc).strip()
        reason = type(exc).__name__ + (f": {text.splitlines()[0][:200]}" if text else "")
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint ({reason}); it may be corrupt, truncated, "
            "or not saved by torch.save"
        ) from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        if payload.get("version", 0) > VERSION:
            raise CheckpointError(f"{str(path)!r} was written by a newer prunelab; upgrade it")
        return payload
    if isinstance(payload, dict) and payload and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()
    ):
        return {"format": FORMAT, "version": VERSION, "model": {}, "state_dict": payload,
                "extra": {}}
    raise CheckpointError(
        f"{str(path)!r} is neither a prunelab checkpoint nor a state dict "
        f"(found a {type(payload).__name__})"
    )


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint into ``model`` or, when None, into a model rebuilt from the zoo.

    A model whose channels were removed (structured pruning) is rebuilt with the same smaller
    architecture: the recorded removals are replayed on the unpruned model first, so ``model``
    is the original architecture. Returns ``(model, checkpoint)``; ``checkpoint["extra"]``
    holds what was saved alongside.
    """
    from prunelab.structured.graph import replay_structure, structure_of

    payload = read_checkpoint(path)
    if model is None:
        from prunelab import models

        name = payload["model"].get("name")
        if not name:
            raise CheckpointError(
                f"{str(path)!r} does not record its model; pass the model to load it into"
            )
        model = models.create(name, **payload["model"].get("kwargs", {}))
    structure = payload.get("structure") or []
    if structure and not structure_of(model):
        replay_structure(model, structure)
    load_state_dict(model, payload["state_dict"])
    return model, payload


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor) -> Path:
    """Export ``model`` to ONNX (masks baked in first) with a dynamic batch dimension.

    The input is named ``input`` and the output ``output``; check the result with onnxruntime.
    """
    import copy
    import warnings

    from prunelab.sparsity import make_permanent, masked_modules

    if masked_modules(model):
        model = make_permanent(copy.deepcopy(model))
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example_input,), str(path), dynamo=False, input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    finally:
        model.train(was_training)
    return path

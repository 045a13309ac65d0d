"""Saving and loading models with their masks.

A checkpoint is a dict saved with ``torch.save`` and always read back with
``torch.load(weights_only=True)``, so loading a file never runs code from it. It records the model's
zoo name and arguments (when known), so ``load_checkpoint(path)`` can rebuild the model by itself,
and a SHA-256 of its contents, checked on load: a file whose bytes changed on disk (a bad copy, a
failing disk) is refused rather than loaded with wrong weights. Files from before the checksum
load without the check.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import CheckpointError
from prunelab.sparsity import prepare_for_state_dict
from prunelab.utils import write_atomically

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
    payload["sha256"] = payload_digest(payload)
    write_atomically(path, lambda handle: torch.save(payload, handle))
    return path


def payload_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents (tensors by dtype, shape and bytes), itself excluded."""
    digest = hashlib.sha256()
    _hash_into(digest, {k: v for k, v in payload.items() if k != "sha256"})
    return digest.hexdigest()


def _hash_into(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _hash_into(digest, key)
            _hash_into(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _hash_into(digest, item)
    else:
        digest.update(f"V{type(value).__name__}:{value!r};".encode())


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
        if not isinstance(payload.get("version", 0), int) or payload.get("version", 0) > VERSION:
            raise CheckpointError(f"{str(path)!r} was written by a newer prunelab; upgrade it")
        _check_contents(path, payload)
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


def _check_contents(path: Path, payload: dict[str, Any]) -> None:
    """A prunelab checkpoint must hold its parts, with the right types and an intact checksum."""
    where = repr(str(path))
    kinds = {"model": dict, "state_dict": dict, "extra": dict}
    missing = [key for key in kinds if key not in payload]
    if missing:
        raise CheckpointError(f"{where} is an incomplete prunelab checkpoint: it has no "
                              f"{', '.join(missing)}; it was not written by save_checkpoint")
    wrong = [key for key, kind in kinds.items() if not isinstance(payload[key], kind)]
    state = payload["state_dict"]
    if not wrong and not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                             for k, v in state.items()):
        wrong = ["state_dict"]
    if wrong:
        raise CheckpointError(f"{where} is a damaged prunelab checkpoint: {', '.join(wrong)} "
                              "has the wrong type")
    expected = payload.get("sha256")
    if expected is not None and expected != payload_digest(payload):
        raise CheckpointError(
            f"{where} is corrupt: its contents do not match the SHA-256 saved with them (the "
            "file changed after it was written: a bad copy or a failing disk?); use another copy")


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
    if isinstance(payload["extra"].get("slim"), dict):
        raise CheckpointError(
            f"{str(path)!r} is a slimmable supernet, not a plain model: its weights serve many "
            "widths and (US-Net) its BatchNorm statistics are mixed across them. Export one "
            "width with `prunelab slim export` (prunelab.slim.export), or load it with "
            "prunelab.slim.load_supernet")
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
    Needs the ``onnx`` package (``pip install 'prunelab[onnx]'``).
    """
    import copy
    import warnings

    from prunelab.sparsity import make_permanent, masked_modules
    from prunelab.utils import require

    require("exporting to ONNX", ("onnx",), "onnx")

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

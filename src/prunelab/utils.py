"""Small helpers shared across the package: devices, batches, eval mode, atomic file writes."""

from __future__ import annotations

import importlib.util
import io
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import torch
from torch import nn

from prunelab.errors import DiskFullError, InvalidValueError, PrunelabError, is_disk_full


def missing_packages(*packages: str) -> list[str]:
    """Those of ``packages`` that are not installed (checked without importing them: importing
    transformers or mlflow takes seconds)."""
    return [name for name in packages if importlib.util.find_spec(name) is None]


def require(what: str, packages: tuple[str, ...], extra: str) -> None:
    """One clear error naming the pip extra to install when ``what`` needs an optional package
    that is missing."""
    missing = missing_packages(*packages)
    if missing:
        raise PrunelabError(f"{what} needs {' and '.join(missing)}, which is not installed: "
                            f"pip install 'prunelab[{extra}]'")


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


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Run with BatchNorm normalising by each batch's own statistics (as in training) and
    everything else in eval mode (no dropout); the running statistics are restored after, so
    the model leaves exactly as it came."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    with eval_mode(model):
        for m in norms:
            m.train()
        try:
            yield model
        finally:
            with torch.no_grad():
                for m, buffers in zip(norms, saved, strict=True):
                    for k, v in buffers.items():
                        getattr(m, k).copy_(v)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads, restoring the process's setting after."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as oneDNN sees it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_if_emulated_bf16(device: torch.device | str, what: str) -> None:
    """Warn that ``what`` in bf16 will be slow: on a CPU without bf16 instructions it is emulated
    (measured here: ResNet-20 training 12x slower than fp32 on an AVX2 CPU)."""
    import warnings

    if torch.device(device).type == "cpu" and not cpu_has_bf16():
        warnings.warn(f"{what} in bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX): "
                      "torch emulates it, about 10x slower than fp32; use precision='fp32' on "
                      "this machine", stacklevel=3)


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


# Fragments of torch's messages for an input a layer cannot take (wrong rank, channels, size).
_SHAPE_ERRORS = ("shapes cannot be multiplied", "size mismatch", "must match the size",
                 "channels", "expected input", "Expected", "input size", "Kernel size",
                 "kernel size", "output size is too small", "invalid for input of size",
                 "Given groups", "dimension", "same device")


def expected_input(model: nn.Module) -> str:
    """What ``model`` takes, in words: a zoo model's ``input_shape``, else its first layer's
    input channels or features (empty when unknown)."""
    shape = getattr(model, "input_shape", None)
    if shape:
        return f"(batch, {', '.join(str(d) for d in shape)})"
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return f"{module.in_channels} channels (its first layer {name!r} is a convolution)"
        if isinstance(module, nn.Linear):
            return f"{module.in_features} features (its first layer {name!r} is a Linear)"
    return ""


def check_input(model: nn.Module, x: object) -> None:
    """Refuse an input a zoo model cannot take (not a tensor, wrong rank or channels), naming
    the shape it expects. Other sizes may be fine (global pooling) and are left to the forward."""
    if not isinstance(x, torch.Tensor):
        raise InvalidValueError(f"inputs must be tensors, got {type(x).__name__}")
    shape = tuple(getattr(model, "input_shape", None) or ())
    if not shape:
        return
    name = type(model).__name__
    wants_tokens = not getattr(model, "input_dtype", torch.float32).is_floating_point
    tokens = not x.dtype.is_floating_point and x.dtype != torch.uint8
    if wants_tokens and not tokens:
        raise InvalidValueError(
            f"{name} is a language model: it takes token ids of shape (batch, {shape[0]}), got "
            f"{x.dtype} data of shape {tuple(x.shape)} (images? use a text dataset such as "
            "tinyshakespeare)")
    if tokens and not wants_tokens:
        raise InvalidValueError(
            f"{name} takes {x.dtype} token ids of shape {tuple(x.shape)} as if they were "
            f"features; it is not a language model (for text use one, such as gpt-char)")
    if x.dim() != len(shape) + 1 or (len(shape) == 3 and x.shape[1] != shape[0]):
        hint = (": add the batch dimension (x.unsqueeze(0))" if tuple(x.shape) == shape else "")
        raise InvalidValueError(f"{name} takes inputs of shape {expected_input(model)}, got "
                                f"{tuple(x.shape)}{hint}")


@contextmanager
def input_errors(model: nn.Module, x: torch.Tensor | None) -> Iterator[None]:
    """Turn torch's error for an input the model cannot take into one :class:`InvalidValueError`
    naming the input's shape and what the model expects (torch's first line kept)."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc).strip()
        if not any(fragment in text for fragment in _SHAPE_ERRORS):
            raise
        expected = expected_input(model)
        wants = f"; it takes {expected}" if expected else ""
        given = (f"inputs of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
                 else "the inputs it was given" if x is None else type(x).__name__)
        raise InvalidValueError(f"{type(model).__name__} cannot run on {given}"
                                f"{wants} ({text.splitlines()[0][:300]})") from exc


def write_atomically(path: str | os.PathLike,
                     content: bytes | str | Callable[[IO[bytes]], None]) -> None:
    """Write ``content`` (bytes, text as UTF-8, or a function that writes into a handle) to a
    temporary name, then rename it into place: a reader or a killed run never sees half a file.

    The file gets the usual permissions (0666 less the umask), and a full disk raises
    :class:`DiskFullError` naming the file, instead of the error of whatever library was writing.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        if callable(content):
            buffer = io.BytesIO()  # serialise first: a failing write is then a plain OSError
            content(buffer)
            data: bytes | memoryview = buffer.getbuffer()
        else:
            data = content.encode() if isinstance(content, str) else content
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if is_disk_full(exc):
            raise DiskFullError(
                f"no space left on device while writing {str(path)!r}: free some space (or "
                "choose another folder) and run again") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

"""Datasets by name, loaded into memory with deterministic train/validation/test splits.

>>> bundle = load("digits")                           # embedded, no download
>>> bundle = load("cifar10", root="~/data")           # or $PRUNELAB_DATA; downloads when online
>>> bundle = load("imagefolder:~/my-images")          # your own ImageFolder-layout data
>>> for x, y in bundle.loader("train", 128, shuffle=True, seed=0): ...
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from prunelab.data.bundle import DataBundle, Split, TensorBatches, crop_and_flip
from prunelab.data.sources import DATASETS, RawDataset, cache_dir
from prunelab.errors import InvalidValueError

TEST_FRACTION = 0.2  # for datasets without an official test split
TEST_SPLIT_SEED = 0  # fixed, so the test set never moves


def default_root() -> Path:
    """``$PRUNELAB_DATA`` or ``~/.cache/prunelab/data``."""
    return Path(os.environ.get("PRUNELAB_DATA") or Path.home() / ".cache" / "prunelab" / "data")


def names() -> list[str]:
    return DATASETS.names()


def describe(name: str) -> str:
    return (inspect.getdoc(DATASETS.get(name)) or "").splitlines()[0]


def check_name(name: str) -> None:
    """Raise UnknownNameError unless ``name`` (or ``imagefolder:PATH``) is a known dataset."""
    DATASETS.get(name.partition(":")[0])


def _permute(split: Split, seed: int) -> Split:
    order = torch.randperm(len(split[1]), generator=torch.Generator().manual_seed(seed))
    return split[0][order], split[1][order]


def _take(split: Split, start: int, stop: int | None) -> Split:
    return split[0][start:stop], split[1][start:stop]


def load(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    limit: int | None = None,
    **options: Any,
) -> DataBundle:
    """Load dataset ``name`` into memory and split it.

    Args:
        root: dataset folder (default ``$PRUNELAB_DATA``, else ``~/.cache/prunelab/data``).
        download: fetch missing torchvision datasets (default: yes unless ``PRUNELAB_OFFLINE=1``).
        val_fraction: share of the training split held out for validation (model selection).
        split_seed: seed of the train/validation split (the test split never depends on it).
        limit: keep at most this many samples per split (a fixed random subset), for quick runs.
        **options: loader options, e.g. ``image_size`` for ``imagefolder:PATH``.
    """
    key, _, argument = name.partition(":")
    loader = DATASETS.get(key)
    if key == "imagefolder":
        options["path"] = argument
    accepted = set(inspect.signature(loader).parameters) - {"root", "download"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise InvalidValueError(
            f"dataset {key!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(sorted(accepted - {'path'})) or 'none'}"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and limit < 1:
        raise InvalidValueError(f"limit must be a positive number of samples, got {limit}")
    if download is None:
        download = os.environ.get("PRUNELAB_OFFLINE", "") not in {"1", "true", "yes"}
    root = Path(root).expanduser() if root is not None else default_root()
    raw: RawDataset = loader(root, download, **options)

    train = raw.train
    if raw.test is None:
        shuffled = _permute(train, TEST_SPLIT_SEED)
        cut = round(TEST_FRACTION * len(shuffled[1]))
        test, train = _take(shuffled, 0, cut), _take(shuffled, cut, None)
    else:
        test = raw.test
    train = _permute(train, split_seed)
    cut = round(val_fraction * len(train[1]))
    val, train = _take(train, 0, cut), _take(train, cut, None)
    if limit is not None:
        train, val, test = (_take(_permute(s, split_seed), 0, limit) for s in (train, val, test))

    mean, std = raw.mean, raw.std
    if mean is None or std is None:
        pixels = train[0].float() / (255.0 if train[0].dtype == torch.uint8 else 1.0)
        per_channel = pixels.transpose(0, 1).reshape(pixels.shape[1], -1)
        mean = tuple(per_channel.mean(1).tolist())
        std = tuple(per_channel.std(1).clamp_min(1e-6).tolist())
    return DataBundle(
        name=name, train=train, val=val, test=test, num_classes=len(raw.class_names),
        input_shape=tuple(train[0].shape[1:]), class_names=raw.class_names, mean=mean, std=std,
        augment=raw.augment, source=raw.source,
    )


__all__ = [
    "DATASETS",
    "DataBundle",
    "TensorBatches",
    "cache_dir",
    "check_name",
    "crop_and_flip",
    "default_root",
    "describe",
    "load",
    "names",
]

"""Datasets by name, loaded into memory with deterministic train/validation/test splits.

>>> bundle = load("digits")                           # embedded, no download
>>> bundle = load("cifar10", root="~/data")           # or $PRUNELAB_DATA; downloads when online
>>> bundle = load("imagefolder:~/my-images")          # your own ImageFolder-layout data
>>> bundle = load("tinyshakespeare", block_size=64)   # (ids, next-char targets) windows
>>> for x, y in bundle.loader("train", 128, shuffle=True, seed=0): ...
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from prunelab.data import text as _text  # noqa: F401  (registers the text datasets)
from prunelab.data.bundle import DataBundle, Split, TensorBatches, crop_and_flip
from prunelab.data.images import ImageFiles, cache_dir
from prunelab.data.sources import DATASETS, Images
from prunelab.errors import InvalidValueError

TEST_FRACTION = 0.2  # for datasets without an official test split
TEST_SPLIT_SEED = 0  # fixed, so the test set never depends on split_seed


def default_root() -> Path:
    """``$PRUNELAB_DATA`` or ``~/.cache/prunelab/data``."""
    return Path(os.environ.get("PRUNELAB_DATA") or Path.home() / ".cache" / "prunelab" / "data")


def names() -> list[str]:
    """Registered dataset names (``imagefolder`` is used as ``imagefolder:PATH``)."""
    return DATASETS.names()


def describe(name: str) -> str:
    """The first line of a dataset's docstring."""
    return (inspect.getdoc(DATASETS.get(name)) or "").splitlines()[0]


def check_name(name: str) -> None:
    """Raise UnknownNameError unless ``name`` (or ``imagefolder:PATH``) is a known dataset."""
    DATASETS.get(name.partition(":")[0])


def _shuffled(index: torch.Tensor, seed: int) -> torch.Tensor:
    return index[torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))]


def _plan(n_train: int, n_test: int | None, val_fraction: float, split_seed: int,
          limit: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Indices of each split into the raw train split, and the kept indices of the raw test split.

    Splits work on indices so that images are only gathered (or decoded) once, for what is kept.
    """
    pool, parts = torch.arange(n_train), {}
    if n_test is None:  # no official test split: a fixed share, independent of split_seed
        pool = _shuffled(pool, TEST_SPLIT_SEED)
        cut = round(TEST_FRACTION * n_train)
        parts["test"], pool = pool[:cut], pool[cut:]
    pool = _shuffled(pool, split_seed)
    cut = round(val_fraction * len(pool))
    parts["val"], parts["train"] = pool[:cut], pool[cut:]
    test = torch.arange(n_test or 0)
    if limit is not None:  # the pools are already random orders: their heads are random subsets
        parts = {key: index[:limit] for key, index in parts.items()}
        test = _shuffled(test, TEST_SPLIT_SEED)[:limit]
    return parts, test


def _gather(images: Images, index: torch.Tensor) -> torch.Tensor:
    return images[index] if isinstance(images, torch.Tensor) else images.take(index)


def _statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of images in [0, 1] (uint8 scaled by 1/255)."""
    pixels = images.float() / (255.0 if images.dtype == torch.uint8 else 1.0)
    per_channel = pixels.transpose(0, 1).reshape(pixels.shape[1], -1)
    return tuple(per_channel.mean(1).tolist()), tuple(per_channel.std(1).clamp_min(1e-6).tolist())


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
    """Load dataset ``name`` into memory and split it into train, validation and test.

    Args:
        name: a registered name (see :func:`names`), or ``imagefolder:PATH``.
        root: dataset folder (default ``$PRUNELAB_DATA``, else ``~/.cache/prunelab/data``).
        download: fetch missing torchvision datasets (default: yes unless ``PRUNELAB_OFFLINE=1``).
        val_fraction: share of the training data held out for validation (model selection).
        split_seed: seed of the train/validation split (the test split never depends on it).
        limit: keep at most this many samples per split (a fixed random subset), for quick runs;
            image-file datasets then decode only those files.
        **options: loader options, e.g. ``image_size`` for ``imagefolder:PATH``.
    """
    key, colon, argument = name.partition(":")
    loader = DATASETS.get(key)
    accepted = set(inspect.signature(loader).parameters) - {"root", "download"}
    if colon:
        if "path" not in accepted:
            raise InvalidValueError(f"dataset {key!r} takes no ':' argument, got {name!r}")
        options["path"] = argument
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
        download = os.environ.get("PRUNELAB_OFFLINE", "").lower() not in {"1", "true", "yes"}
    root = Path(root).expanduser() if root is not None else default_root()
    raw = loader(root, download, **options)

    (train_images, train_labels), n_test = raw.train, None if raw.test is None else len(raw.test[1])
    parts, test_index = _plan(len(train_labels), n_test, val_fraction, split_seed, limit)
    everything = torch.cat(list(parts.values()))
    pieces = _gather(train_images, everything).split([len(i) for i in parts.values()])
    splits: dict[str, Split] = {
        key: (images, train_labels[index])
        for (key, index), images in zip(parts.items(), pieces, strict=True)
    }
    if raw.test is not None:
        splits["test"] = (_gather(raw.test[0], test_index), raw.test[1][test_index])
    shapes = {tuple(images.shape[1:]) for images, _ in splits.values()}
    if len(shapes) > 1:
        raise InvalidValueError(
            f"the splits of {name!r} have images of different sizes {sorted(shapes)}; "
            "pass image_size to resize them all"
        )
    mean, std = (raw.mean, raw.std) if raw.mean and raw.std else _statistics(splits["train"][0])
    return DataBundle(
        name=name, train=splits["train"], val=splits["val"], test=splits["test"],
        num_classes=len(raw.class_names), input_shape=shapes.pop(),
        class_names=raw.class_names, mean=mean, std=std, augment=raw.augment, source=raw.source,
    )


__all__ = [
    "DATASETS",
    "DataBundle",
    "ImageFiles",
    "TensorBatches",
    "cache_dir",
    "check_name",
    "crop_and_flip",
    "default_root",
    "describe",
    "load",
    "names",
]

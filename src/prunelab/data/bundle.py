"""In-memory datasets and fast batch iteration.

Small and medium datasets (digits, MNIST, CIFAR) fit in memory as uint8 tensors (CIFAR-10 is
~150 MB), so batches are slices of one tensor: no per-sample Python, no decoding per epoch.
Augmentation works on whole batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from prunelab.errors import InvalidValueError

# (images N x C x H x W, int64 labels N), or (token ids N x T, next-token targets N x T)
Split = tuple[torch.Tensor, torch.Tensor]
AUGMENTATIONS = ("cifar",)


@dataclass
class DataBundle:
    """A dataset's train/validation/test splits with what a model needs to know about them.

    ``source`` says which copy was read (e.g. "CIFAR-10 (JPEG q75 copy)"), for results tables.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str | None = None
    source: str = ""
    sizes: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = {s: len(getattr(self, s)[1]) for s in ("train", "val", "test")}

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: bool | None = None,
        drop_last: bool = False,
        channels_last: bool = False,
    ) -> TensorBatches:
        """Batches of ``split`` ("train", "val" or "test"), normalised, optionally augmented.

        ``augment=None`` augments the train split only (with the dataset's augmentation).
        """
        if split not in ("train", "val", "test"):
            raise InvalidValueError(f"split must be train, val or test, got {split!r}")
        images, labels = getattr(self, split)
        if augment is None:
            augment = split == "train"
        return TensorBatches(
            images, labels, batch_size, shuffle=shuffle, seed=seed,
            augment=self.augment if augment else None, mean=self.mean, std=self.std,
            drop_last=drop_last, channels_last=channels_last,
        )


class TensorBatches:
    """Re-iterable ``(x, y)`` batches over in-memory tensors.

    Shuffling and augmentation draw from a generator seeded by ``(seed, epoch)``: the same seed
    gives the same batches in every run, and each epoch (each new iteration, or
    :meth:`set_epoch`) a new order. Every sample appears once per epoch; the last partial batch
    is kept unless ``drop_last``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        augment: str | None = None,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        drop_last: bool = False,
        channels_last: bool = False,
    ):
        if batch_size < 1:
            raise InvalidValueError(f"batch_size must be at least 1, got {batch_size}")
        if augment is not None and augment not in AUGMENTATIONS:
            raise InvalidValueError(f"unknown augmentation {augment!r}; known: {AUGMENTATIONS}")
        if len(images) != len(labels):
            raise InvalidValueError("images and labels have different lengths")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.drop_last, self.channels_last = augment, drop_last, channels_last
        self.epoch = 0
        #: Integer inputs other than uint8 pixels are token ids: neither normalised nor augmented.
        self.tokens = not images.dtype.is_floating_point and images.dtype != torch.uint8
        # x_normalised = raw * scale + shift, with raw in [0, 255] (uint8) or [0, 1] (float)
        extent = 255.0 if images.dtype == torch.uint8 else 1.0
        shape = (1, -1) + (1,) * (images.dim() - 2) if images.dim() > 2 else (1, -1)
        std_t = torch.tensor(std, dtype=torch.float32)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        self._scale = (1.0 / (extent * std_t)).view(shape)
        self._shift = (-mean_t / std_t).view(shape)

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration uses."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        self.epoch += 1
        n = self.num_samples
        order = torch.randperm(n, generator=generator) if self.shuffle else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = slice(start, min(start + self.batch_size, n))
            if order is not None:
                x, y = self.images[order[index]], self.labels[order[index]]
            else:
                x, y = self.images[index], self.labels[index]
            if self.tokens:  # token ids go to the model as they are
                yield x, y
                continue
            if self.augment == "cifar":
                x = crop_and_flip(x, generator)
            x = x.float() * self._scale + self._shift
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


def crop_and_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad`` zero pixels of padding + random horizontal flip, per batch.

    The standard CIFAR augmentation as one gather over the whole batch: each image's crop offset
    and flip become source indices into its padded copy.
    """
    n, channels, height, width = images.shape
    padded_width = width + 2 * pad
    padded = F.pad(images, (pad, pad, pad, pad)).view(n, channels, -1)
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
    flip = torch.rand(n, 1, 1, generator=generator) < 0.5
    cols = torch.arange(width).view(1, 1, width)
    cols = torch.where(flip, width - 1 - cols, cols) + dx  # flipping reverses the column order
    rows = torch.arange(height).view(1, height, 1) + dy
    index = (rows * padded_width + cols).view(n, 1, -1).expand(n, channels, height * width)
    return padded.gather(2, index).view(n, channels, height, width)

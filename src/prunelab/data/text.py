"""Character-level text datasets for language models (Tiny Shakespeare).

A text becomes token ids (one per character, the vocabulary being the sorted characters of the
whole text) cut into non-overlapping windows of ``block_size``: a sample is a window ``x`` and its
*next-character* targets ``y`` (``x`` shifted by one), so a language model's per-position loss
is the usual nats per character. The usual protocol (nanoGPT's ``shakespeare_char``) trains on
the first 90% of the characters and reports the loss on the last 10%: that last 10% is the
*test* split here, and the validation split (model selection) is carved from the training
windows like every other dataset's.
"""

from __future__ import annotations

import hashlib
import urllib.request
from pathlib import Path

import torch

from prunelab.data.sources import DATASETS, OFFLINE_HINT, RawDataset, not_found, try_download
from prunelab.errors import InvalidValueError
from prunelab.utils import write_atomically

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_SHARE = 0.9  # nanoGPT's split: first 90% of the characters train, last 10% evaluate


def windows(ids: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``(inputs, next-token targets)`` windows of ``block_size`` over ``ids``;
    the tail too short for a window (with its one-character target) is dropped."""
    count = (len(ids) - 1) // block_size
    if count < 1:
        raise InvalidValueError(
            f"a text of {len(ids)} tokens has no window of block_size {block_size}")
    used = count * block_size
    return ids[:used].view(count, block_size), ids[1 : used + 1].view(count, block_size)


def char_dataset(text: str, block_size: int, source: str) -> RawDataset:
    """A character-level dataset from ``text``: vocabulary, 90/10 split, windows."""
    vocabulary = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocabulary)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    cut = int(TRAIN_SHARE * len(ids))
    return RawDataset(
        train=windows(ids[:cut], block_size), test=windows(ids[cut:], block_size),
        class_names=vocabulary, mean=(0.0,), std=(1.0,), source=source,
    )


def _check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InvalidValueError(f"block_size must be a positive integer, got {block_size!r}")
    return block_size


def _fetch(url: str, path: Path, sha256: str) -> None:
    """Download ``url`` to ``path``, refusing content whose SHA-256 differs."""
    with urllib.request.urlopen(url, timeout=60) as response:
        content = response.read()
    if hashlib.sha256(content).hexdigest() != sha256:
        raise ValueError(f"{url} has unexpected contents (SHA-256 mismatch)")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, content)


@DATASETS.register("tinyshakespeare")
def tiny_shakespeare(root: Path, download: bool, block_size: int = 64) -> RawDataset:
    """Tiny Shakespeare, character level (65 characters): windows of block_size, 90/10 split.

    Read from ``root/tinyshakespeare/input.txt``. Targets are the next characters; losses are
    in nats per character. The test split is the last 10% of the text (nanoGPT's "val").
    """
    block_size = _check_block_size(block_size)
    path = root / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        if not download:
            raise not_found("tinyshakespeare", root, [path], OFFLINE_HINT)
        failure = try_download(lambda: _fetch(TINY_SHAKESPEARE_URL, path, TINY_SHAKESPEARE_SHA256))
        if failure is not None:
            raise not_found("tinyshakespeare", root, [path], failure)
    return char_dataset(path.read_text(encoding="utf-8"), block_size,
                        "Tiny Shakespeare (character level, 90/10 split)")

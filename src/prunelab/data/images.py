"""Image folders decoded into memory once, with a decoded-tensor cache.

Decoding tens of thousands of small JPEG/PNG files costs seconds, so a folder is decoded once into
one uint8 tensor and cached (``$PRUNELAB_CACHE``, keyed by the folder's path, file count and
target size); later loads read the cache. A load that keeps only a few samples (``limit``)
decodes just those files and leaves the cache alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from prunelab.errors import DatasetNotFoundError, InvalidValueError
from prunelab.utils import write_atomically

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
FALLBACK_SIZE = 32  # images of mixed sizes are resized to this when no size is given
CACHE_FORMAT = 1  # bump when the cached tensor layout changes


def cache_dir() -> Path:
    """Where decoded datasets are cached: ``$PRUNELAB_CACHE`` or ``~/.cache/prunelab/cache``."""
    return Path(os.environ.get("PRUNELAB_CACHE") or Path.home() / ".cache" / "prunelab" / "cache")


def scan_folder(folder: Path) -> tuple[list[str], torch.Tensor, list[str]]:
    """Files, int64 labels and class names of an ImageFolder-layout ``folder/<class>/<image>``.

    Classes and files are sorted by name, as torchvision's ImageFolder does.
    """
    try:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    except OSError as exc:
        raise DatasetNotFoundError(f"cannot read image folder {str(folder)!r}: {exc}") from None
    files: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(f for f in os.listdir(folder / name) if f.lower().endswith(IMAGE_SUFFIXES))
        prefix = os.path.join(folder, name, "")
        files += [prefix + f for f in found]
        labels += [index] * len(found)
    if not files:
        raise DatasetNotFoundError(
            f"no images found in {str(folder)!r}: expected <class>/<image> sub-folders "
            f"(torchvision ImageFolder layout) with files ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    return files, torch.tensor(labels, dtype=torch.int64), classes


def decode_images(files: list[str], size: int | None) -> torch.Tensor:
    """Decode image files into one uint8 RGB tensor N x 3 x H x W.

    ``size`` resizes every image to ``size`` x ``size``; ``None`` keeps the common size when all
    images share one and resizes to 32 x 32 otherwise. JPEGs are decoded in one batched call.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.transforms.v2.functional import resize

    raw = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f in files]
    jpeg = [i for i, f in enumerate(files) if f.lower().endswith((".jpg", ".jpeg"))]
    images: list[torch.Tensor | None] = [None] * len(files)
    if jpeg:
        try:
            decoded = decode_jpeg([raw[i] for i in jpeg], mode=ImageReadMode.RGB)
        except RuntimeError:  # decoded one by one below, to name the broken file
            decoded = [None] * len(jpeg)
        for i, image in zip(jpeg, decoded, strict=True):
            images[i] = image
    for i, image in enumerate(images):
        if image is None:
            try:
                images[i] = decode_image(raw[i], mode=ImageReadMode.RGB)
            except RuntimeError as exc:
                raise InvalidValueError(f"cannot decode image {files[i]!r}: {exc}") from None
    if size is None and len({tuple(image.shape) for image in images}) > 1:
        size = FALLBACK_SIZE
    if size is not None:
        images = [
            image if tuple(image.shape[1:]) == (size, size)
            else resize(image, [size, size], antialias=True)
            for image in images
        ]
    return torch.stack(images)


class ImageFiles:
    """The images of one folder, decoded when a split asks for them.

    :meth:`take` with every index decodes the whole folder once and caches the tensor; with a
    subset (a ``limit``) it reads the cache when there is one, else decodes only that subset.
    """

    def __init__(self, folder: Path, files: list[str], size: int | None):
        self.files, self.size = files, size
        folder = Path(folder)
        key = f"{CACHE_FORMAT}|{folder.resolve()}|{len(files)}|{size}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.cache = cache_dir() / f"{folder.parent.name}-{folder.name}-{digest}.pt"

    def __len__(self) -> int:
        return len(self.files)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The images at ``index`` (unique indices), as a uint8 tensor."""
        cached = self._read_cache()
        if cached is not None:
            return cached[index]
        if len(index) < len(self.files):
            return decode_images([self.files[i] for i in index.tolist()], self.size)
        images = decode_images(self.files, self.size)
        self._write_cache(images)
        return images[index]

    def _read_cache(self) -> torch.Tensor | None:
        if not self.cache.is_file():
            return None
        try:
            images = torch.load(self.cache, mmap=True, weights_only=True)
        except Exception:  # a damaged cache is rebuilt, never trusted
            return None
        return images if len(images) == len(self.files) else None

    def _write_cache(self, images: torch.Tensor) -> None:
        """Write atomically (temp file + rename), so readers never see half a file."""
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.cache, lambda handle: torch.save(images, handle))


# The JPEG standard's (Annex K) luminance quantisation table, row by row.
_LUMINANCE = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip


def _zigzag_key(k: int) -> tuple[int, int]:
    """Position of entry ``k`` (row-major 8x8) in JPEG's zigzag scan: by anti-diagonal, then
    by row on odd diagonals (scanned downwards) and by column on even ones (scanned upwards)."""
    row, col = divmod(k, 8)
    return row + col, row if (row + col) % 2 else col


_LUMINANCE_ZIGZAG = [_LUMINANCE[k] for k in sorted(range(64), key=_zigzag_key)]  # file order


def jpeg_quality(path: str) -> int | None:
    """The IJG quality (1-100) a JPEG was saved with, read from its luminance table, if standard.

    Lets a results table say "JPEG q75 copy" from the files themselves.
    """
    data = Path(path).read_bytes()
    start = data.find(b"\xff\xdb")  # the first DQT segment
    if start < 0 or len(data) < start + 69 or data[start + 4] != 0:  # 8-bit table 0 (luminance)
        return None
    table = list(data[start + 5 : start + 69])
    for quality in range(1, 101):
        scale = 5000 // quality if quality < 50 else 200 - 2 * quality
        if table == [min(max((q * scale + 50) // 100, 1), 255) for q in _LUMINANCE_ZIGZAG]:
            return quality
    return None

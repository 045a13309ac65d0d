"""Where datasets come from: the embedded digits, IDX files, torchvision, image folders.

Each loader is registered by name and returns the raw official splits (images may still be on
disk, see :class:`ImageFiles`); :func:`prunelab.data.load` carves the validation split, applies
``limit`` and builds the :class:`DataBundle`.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunelab.data.images import ImageFiles, jpeg_quality, scan_folder
from prunelab.errors import DatasetNotFoundError, InvalidValueError
from prunelab.registry import Registry

Images = torch.Tensor | ImageFiles


@dataclass
class RawDataset:
    """Images and labels of the official train and test splits, plus metadata."""

    train: tuple[Images, torch.Tensor]
    test: tuple[Images, torch.Tensor] | None  # None: carve a test split from train
    class_names: list[str]
    mean: tuple[float, ...] | None = None  # None: computed from the training split
    std: tuple[float, ...] | None = None
    augment: str | None = None
    source: str = ""


Loader = Callable[..., RawDataset]
DATASETS: Registry[Loader] = Registry("dataset")
OFFLINE_HINT = "Downloading is off (download=False or PRUNELAB_OFFLINE=1)."


def not_found(name: str, root: Path, looked: list[Path], why: str) -> DatasetNotFoundError:
    """The error for a missing dataset: every place looked, the root, and how to fix it."""
    places = "\n  ".join(str(p) for p in looked)
    return DatasetNotFoundError(
        f"dataset {name!r} not found under root {str(root)!r}; looked in:\n  {places}\n"
        f"{why} Fix: pass --data-dir (or set PRUNELAB_DATA) to a folder that has it, or run once "
        "with downloading allowed (PRUNELAB_OFFLINE unset) on a machine with network access."
    )


def try_download(fetch: Callable[[], object]) -> str | None:
    """Run a torchvision download; None when it worked, else one line saying why it failed."""
    try:
        fetch()
    except Exception as exc:  # urllib, ssl, http, checksum and disk errors all end here
        text = str(exc).strip()
        return f"Downloading it failed ({text.splitlines()[0][:200] if text else repr(exc)})."
    return None


def _torchvision_datasets():
    """``torchvision.datasets``, imported only to download or read official files (~1 s)."""
    import torchvision.datasets

    return torchvision.datasets


# --------------------------------------------------------------------------- digits (embedded)
@DATASETS.register("digits")
def digits(root: Path, download: bool) -> RawDataset:
    """scikit-learn's bundled 8x8 digits (1797 images): the embedded default, never downloaded.

    Reads the CSV that ``sklearn.datasets.load_digits`` reads, directly: importing
    ``sklearn.datasets`` costs about a second, the file a few milliseconds.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)
        pixels, target = table[:, :-1], table[:, -1].astype(np.int64)
    else:  # a future scikit-learn may move the file
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, target = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    images = torch.from_numpy(pixels).view(-1, 1, 8, 8) / 16.0  # 17 grey levels -> [0, 1]
    return RawDataset((images, torch.from_numpy(target)), None, [str(n) for n in range(10)],
                      source="scikit-learn digits (8x8)")


# --------------------------------------------------------------------------- MNIST family (IDX)
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped or not) into a numpy array."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
        data = bytearray(handle.read())  # writable, so torch can share it without a copy
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4]) if len(data) >= 4 else (1, 0, 0)
    if zero != 0 or dtype_code != 0x08:
        raise InvalidValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim]) if len(data) >= 4 + 4 * ndim else ()
    if not shape or len(data) != 4 + 4 * ndim + int(np.prod(shape)):
        raise InvalidValueError(f"{path} is truncated or damaged: its size does not match {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (each gzipped or not), or None unless all are there."""
    found = {}
    for split, stems in IDX_STEMS.items():
        for kind, stem in zip(("images", "labels"), stems, strict=True):
            path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
            if path is None:
                return None
            found[f"{split}-{kind}"] = path
    return found


def _mnist_like(name: str, folders: list[Path], torchvision_class: str, root: Path,
                download: bool) -> dict[str, Path]:
    """Find the IDX files in ``folders``, downloading them with torchvision when allowed."""
    for folder in folders:
        if files := _find_idx(folder):
            return files
    if not download:
        raise not_found(name, root, folders, OFFLINE_HINT)
    failure = try_download(
        lambda: getattr(_torchvision_datasets(), torchvision_class)(root, download=True)
    )
    files = _find_idx(folders[0])
    if files is None:
        raise not_found(name, root, folders,
                        failure or "The download finished without the IDX files.")
    return files


def _idx_dataset(files: dict[str, Path], classes: list[str], mean: float, std: float,
                 source: str) -> RawDataset:
    def split(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(read_idx(files[f"{key}-images"])).unsqueeze(1)
        return images, torch.from_numpy(read_idx(files[f"{key}-labels"]).astype(np.int64))

    return RawDataset(split("train"), split("test"), classes, (mean,), (std,), source=source)


@DATASETS.register("mnist")
def mnist(root: Path, download: bool) -> RawDataset:
    """MNIST handwritten digits, 28x28 grey, from the official IDX files."""
    folders = [root / "MNIST" / "raw", root / "mnist", root]
    files = _mnist_like("mnist", folders, "MNIST", root, download)
    return _idx_dataset(files, [str(n) for n in range(10)], 0.1307, 0.3081,
                        "MNIST (official IDX files)")


@DATASETS.register("fashion-mnist")
def fashion_mnist(root: Path, download: bool) -> RawDataset:
    """Fashion-MNIST, 28x28 grey clothing images, from the official IDX files."""
    # not ``root`` itself: MNIST's files have the same names
    folders = [root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    files = _mnist_like("fashion-mnist", folders, "FashionMNIST", root, download)
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
    return _idx_dataset(files, classes, 0.2860, 0.3530, "Fashion-MNIST (official IDX files)")


# --------------------------------------------------------------------------- CIFAR
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}  # torchvision's


def _cifar_class(name: str) -> type:
    datasets = _torchvision_datasets()
    return datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100


def _cifar(name: str, root: Path, download: bool) -> RawDataset:
    """Official files (present or downloaded) first, else an image-folder JPEG copy."""
    official, jpeg = root / CIFAR_FOLDERS[name], root / f"{name}-jpeg"
    has_copy = (jpeg / "train").is_dir() and (jpeg / "test").is_dir()
    failure = OFFLINE_HINT
    if not official.is_dir() and download:
        failure = try_download(lambda: _cifar_class(name)(str(root), train=True, download=True))
        if failure and has_copy:
            warnings.warn(f"{failure} Using the JPEG copy at {jpeg} instead.", stacklevel=4)
    if official.is_dir():
        cls = _cifar_class(name)
        try:
            train, test = cls(str(root), train=True), cls(str(root), train=False)
        except RuntimeError as exc:  # torchvision's "not found or corrupted"
            raise not_found(name, root, [official], f"Reading it failed ({exc}).") from None
        return RawDataset(
            *[(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),
               torch.tensor(d.targets, dtype=torch.int64)) for d in (train, test)],
            list(train.classes), *CIFAR_STATS[name], "cifar", f"{CIFAR_LABELS[name]} (official)",
        )
    if not has_copy:
        raise not_found(name, root, [official, jpeg / "train", jpeg / "test"], failure)
    return _cifar_jpeg(name, jpeg)


def _cifar_jpeg(name: str, jpeg: Path) -> RawDataset:
    """CIFAR from an ImageFolder-layout JPEG copy (``jpeg/{train,test}/<class>/*.jpg``)."""
    train_files, train_labels, classes = scan_folder(jpeg / "train")
    test_files, test_labels, _ = scan_folder(jpeg / "test")
    quality = jpeg_quality(train_files[0])
    copy = f"JPEG q{quality} copy" if quality else "JPEG copy"
    return RawDataset(
        (ImageFiles(jpeg / "train", train_files, None), train_labels),
        (ImageFiles(jpeg / "test", test_files, None), test_labels),
        classes, *CIFAR_STATS[name], "cifar", f"{CIFAR_LABELS[name]} ({copy})",
    )


@DATASETS.register("cifar10")
def cifar10(root: Path, download: bool) -> RawDataset:
    """CIFAR-10, 32x32 colour, 10 classes (official files, or an image-folder JPEG copy)."""
    return _cifar("cifar10", root, download)


@DATASETS.register("cifar100")
def cifar100(root: Path, download: bool) -> RawDataset:
    """CIFAR-100, 32x32 colour, 100 classes (official files, or an image-folder JPEG copy)."""
    return _cifar("cifar100", root, download)


# --------------------------------------------------------------------------- image folders
@DATASETS.register("imagefolder")
def image_folder(root: Path, download: bool, path: str = "",
                 image_size: int | None = None) -> RawDataset:
    """Your own images in ImageFolder layout: ``imagefolder:PATH``, decoded into memory.

    With ``PATH/train`` and ``PATH/test`` (or ``PATH/val``) those are the splits; otherwise test
    and validation are carved from ``PATH``. Images become RGB, resized to ``image_size`` squared
    (default: kept when all share one size, else 32). Everything is held in memory (and cached
    decoded), which suits small and medium datasets, not ImageNet-sized ones.
    """
    folder = Path(path).expanduser()
    if not path or not folder.is_dir():
        raise DatasetNotFoundError(
            f"image folder {path!r} does not exist; use imagefolder:PATH with PATH holding "
            "<class>/<image> sub-folders (optionally under train/ and test/)"
        )
    if image_size is not None and image_size < 1:
        raise InvalidValueError(f"image_size must be a positive number of pixels, got {image_size}")
    test_dir = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
    if (folder / "train").is_dir() and test_dir is not None:
        train_files, train_labels, classes = scan_folder(folder / "train")
        test_files, test_labels, test_classes = scan_folder(test_dir)
        if test_classes != classes:
            raise InvalidValueError(
                f"{test_dir} has classes {test_classes}, but {folder / 'train'} has {classes}"
            )
        test = (ImageFiles(test_dir, test_files, image_size), test_labels)
        train = (ImageFiles(folder / "train", train_files, image_size), train_labels)
    else:
        files, labels, classes = scan_folder(folder)
        train, test = (ImageFiles(folder, files, image_size), labels), None
    return RawDataset(train, test, classes, source=f"image folder {folder}")

"""Where datasets come from: the embedded digits, IDX files, torchvision, image folders.

Each loader is registered by name and returns the raw pieces; :func:`prunelab.data.load` turns
them into a :class:`DataBundle` with a deterministic validation split.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prunelab.errors import DatasetNotFoundError, InvalidValueError
from prunelab.registry import Registry


@dataclass
class RawDataset:
    """Images and labels of the official train and test splits, plus metadata."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor] | None  # None: carve a test split too
    class_names: list[str]
    mean: tuple[float, ...] | None  # None: computed from the training split
    std: tuple[float, ...] | None
    augment: str | None
    source: str


Loader = Callable[..., RawDataset]
DATASETS: Registry[Loader] = Registry("dataset")


def cache_dir() -> Path:
    """Where decoded datasets are cached: ``$PRUNELAB_CACHE`` or ``~/.cache/prunelab/cache``."""
    return Path(os.environ.get("PRUNELAB_CACHE") or Path.home() / ".cache" / "prunelab" / "cache")


def _not_found(name: str, root: Path, looked: list[Path], why: str) -> DatasetNotFoundError:
    places = "\n  ".join(str(p) for p in looked)
    return DatasetNotFoundError(
        f"dataset {name!r} not found under root {str(root)!r}; looked in:\n  {places}\n"
        f"{why} Fix: pass --data-dir (or set PRUNELAB_DATA) to a folder that has it, or run once "
        "on a machine with network access to download it there."
    )


def _download(name: str, root: Path, looked: list[Path], fetch: Callable[[], object]) -> None:
    try:
        fetch()
    except Exception as exc:  # urllib, ssl, http and checksum errors all end here
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
        raise _not_found(name, root, looked, f"Downloading it failed ({reason}).") from None


# --------------------------------------------------------------------------- digits (embedded)
@DATASETS.register("digits")
def digits(root: Path, download: bool) -> RawDataset:
    """scikit-learn's bundled 8x8 digits (1797 images): the embedded default, never downloaded.

    The CSV that ships inside scikit-learn is read directly: importing ``sklearn.datasets`` costs
    more than a second, the file itself a few milliseconds.
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
    images = torch.from_numpy(pixels).view(-1, 1, 8, 8) / 16.0
    names = [str(n) for n in range(10)]
    return RawDataset((images, torch.from_numpy(target)), None, names, None, None, None,
                      "scikit-learn digits (8x8, embedded)")


# --------------------------------------------------------------------------- MNIST family (IDX)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise InvalidValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folders: list[Path]) -> dict[str, Path] | None:
    for folder in folders:
        found = {}
        for split, stems in IDX_FILES.items():
            for i, stem in enumerate(stems):
                for candidate in (folder / stem, folder / f"{stem}.gz"):
                    if candidate.is_file():
                        found[f"{split}{i}"] = candidate
                        break
        if len(found) == 4:
            return found
    return None


def _mnist_like(name: str, folder: str, tv_class: str, classes: list[str], stats, root: Path,
                download: bool) -> RawDataset:
    folders = list(dict.fromkeys(
        [root / folder / "raw", root / name, root / name.replace("-", "_"), root]
    ))
    files = _find_idx(folders)
    if files is None and download:
        import torchvision

        cls = getattr(torchvision.datasets, tv_class)
        _download(name, root, folders, lambda: cls(str(root), download=True))
        files = _find_idx(folders)
    if files is None:
        why = "Downloading is off (PRUNELAB_OFFLINE=1 or download=False)." if not download else ""
        raise _not_found(name, root, folders, why)

    def split(key: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(read_idx(files[f"{key}0"]).copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(files[f"{key}1"]).astype(np.int64))
        return images, labels

    return RawDataset(split("train"), split("test"), classes, *stats, None, f"{name} (IDX files)")


@DATASETS.register("mnist")
def mnist(root: Path, download: bool) -> RawDataset:
    """MNIST handwritten digits, 28x28 grey, from the official IDX files."""
    return _mnist_like("mnist", "MNIST", "MNIST", [str(i) for i in range(10)],
                       ((0.1307,), (0.3081,)), root, download)


@DATASETS.register("fashion-mnist")
def fashion_mnist(root: Path, download: bool) -> RawDataset:
    """Fashion-MNIST, 28x28 grey clothing images, from the official IDX files."""
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
    return _mnist_like("fashion-mnist", "FashionMNIST", "FashionMNIST", classes,
                       ((0.2860,), (0.3530,)), root, download)


# --------------------------------------------------------------------------- CIFAR
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar(name: str, root: Path, download: bool) -> RawDataset:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    official = root / cls.base_folder
    jpeg = root / f"{name}-jpeg"
    looked = [official, jpeg]
    mean, std = CIFAR_STATS[name]
    if not official.is_dir() and (jpeg / "train").is_dir() and (jpeg / "test").is_dir():
        train, test, classes = decode_image_folder_cached(jpeg)
        label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
        return RawDataset(train, test, classes, mean, std, "cifar",
                          f"{label} (JPEG image-folder copy at {jpeg})")
    if not official.is_dir() and not download:
        raise _not_found(name, root, looked, "Downloading is off (PRUNELAB_OFFLINE=1).")
    if not official.is_dir():
        _download(name, root, looked, lambda: cls(str(root), train=True, download=True))

    def split(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        data = cls(str(root), train=train, download=False)
        images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(data.targets, dtype=torch.int64)

    train_split = split(True)
    classes = list(cls(str(root), train=False, download=False).classes)
    return RawDataset(train_split, split(False), classes, mean, std, "cifar",
                      f"{name} (official torchvision files)")


@DATASETS.register("cifar10")
def cifar10(root: Path, download: bool) -> RawDataset:
    """CIFAR-10, 32x32 colour, 10 classes (official files, or an image-folder JPEG copy)."""
    return _cifar("cifar10", root, download)


@DATASETS.register("cifar100")
def cifar100(root: Path, download: bool) -> RawDataset:
    """CIFAR-100, 32x32 colour, 100 classes."""
    return _cifar("cifar100", root, download)


# --------------------------------------------------------------------------- image folders
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def _scan(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files, labels = [], []
    for index, cls in enumerate(classes):
        for path in sorted((folder / cls).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(index)
    if not files:
        raise DatasetNotFoundError(
            f"no images found in {str(folder)!r}: expected <class>/<image> sub-folders "
            f"(torchvision ImageFolder layout) with files ending in {sorted(IMAGE_SUFFIXES)}"
        )
    return files, labels, classes


def decode_images(files: list[Path], size: int | None) -> torch.Tensor:
    """Decode image files to one uint8 RGB tensor N x 3 x H x W, resized to ``size`` if given."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import resize

    images = []
    for path in files:
        try:
            image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except RuntimeError as exc:
            raise InvalidValueError(f"cannot decode image {str(path)!r}: {exc}") from None
        if size is not None and tuple(image.shape[1:]) != (size, size):
            image = resize(image, [size, size], antialias=True)
        images.append(image)
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise InvalidValueError(
            f"images have different sizes {sorted(shapes)[:3]}; pass image_size to resize them"
        )
    return torch.stack(images)


def decode_image_folder_cached(
    folder: Path, size: int | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], list[str]]:
    """Decode ``folder/train`` and ``folder/test`` once; later calls read a tensor cache."""
    train_files, train_labels, classes = _scan(folder / "train")
    test_files, test_labels, _ = _scan(folder / "test")
    key = f"{folder.resolve()}|{len(train_files)}|{len(test_files)}|{size}"
    path = cache_dir() / f"{folder.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            return tuple(cached["train"]), tuple(cached["test"]), list(cached["classes"])
        except Exception:  # a damaged cache is rebuilt, never trusted
            path.unlink(missing_ok=True)
    train = (decode_images(train_files, size), torch.tensor(train_labels))
    test = (decode_images(test_files, size), torch.tensor(test_labels))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"train": list(train), "test": list(test), "classes": classes}, tmp)
    os.replace(tmp, path)
    return train, test, classes


@DATASETS.register("imagefolder")
def image_folder(root: Path, download: bool, path: str = "", image_size: int = 32) -> RawDataset:
    """Your own images in ImageFolder layout: ``imagefolder:PATH`` (decoded into memory).

    With ``PATH/train`` and ``PATH/test`` (or ``PATH/val``) sub-folders those are the splits;
    otherwise test and validation are carved from ``PATH``. Images are resized to
    ``image_size`` squared. Suited to datasets that fit in memory.
    """
    folder = Path(path).expanduser()
    if not path or not folder.is_dir():
        raise DatasetNotFoundError(
            f"image folder {path!r} does not exist; use imagefolder:PATH with PATH holding "
            "<class>/<image> sub-folders (optionally under train/ and test/)"
        )
    test_dir = next((folder / d for d in ("test", "val") if (folder / d).is_dir()), None)
    if (folder / "train").is_dir() and test_dir is not None:
        train_files, train_labels, classes = _scan(folder / "train")
        test_files, test_labels, _ = _scan(test_dir)
        train = (decode_images(train_files, image_size), torch.tensor(train_labels))
        test = (decode_images(test_files, image_size), torch.tensor(test_labels))
    else:
        files, labels, classes = _scan(folder)
        train, test = (decode_images(files, image_size), torch.tensor(labels)), None
    return RawDataset(train, test, classes, None, None, None, f"image folder {folder}")

"""Datasets: splits, offline files, caching, batch iteration, augmentation, errors."""

from __future__ import annotations

import gzip
import urllib.error
from collections import Counter
from pathlib import Path

import pytest
import torch

import prunelab
from prunelab.data import DataBundle, TensorBatches, cache_dir, crop_and_flip
from prunelab.errors import DatasetNotFoundError, InvalidValueError, UnknownNameError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def rows(bundle: DataBundle, splits=("train", "val", "test")) -> Counter:
    """Each sample (image bytes + label) of the given splits, with its multiplicity."""
    return Counter(
        (x.numpy().tobytes(), int(y))
        for split in splits for x, y in zip(*getattr(bundle, split), strict=True)
    )


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A cache directory of this test's own, so cache assertions see only its files."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("PRUNELAB_CACHE", str(folder))
    return folder


def write_images(folder: Path, classes: dict[str, int], count: int, size=(32, 32),
                 suffix: str = ".jpg") -> None:
    """``count`` images per class, each a flat colour (the class's value) plus a little noise."""
    from torchvision.io import encode_jpeg, write_png

    generator = torch.Generator().manual_seed(len(classes) * count)
    for name, value in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(count):
            noise = torch.randint(0, 8, (3, *size), generator=generator)
            image = (noise + value).clamp(0, 255).to(torch.uint8)
            if suffix == ".png":
                write_png(image, str(folder / name / f"{i:04d}.png"))
            else:
                data = encode_jpeg(image, quality=75)
                (folder / name / f"{i:04d}.jpg").write_bytes(bytes(data.numpy()))


# --------------------------------------------------------------------------- digits
def test_digits_splits_partition_the_dataset_and_are_deterministic() -> None:
    from sklearn.datasets import load_digits

    a = prunelab.data.load("digits")
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10 and a.class_names[3] == "3"
    assert a.sizes == {"train": 1294, "val": 144, "test": 359}
    reference = load_digits()
    images = torch.from_numpy(reference.images).float().view(-1, 1, 8, 8) / 16
    labels = torch.from_numpy(reference.target)
    full = Counter((x.numpy().tobytes(), int(y)) for x, y in zip(images, labels, strict=True))
    assert rows(a) == full  # every sample in exactly one split

    again, other = prunelab.data.load("digits"), prunelab.data.load("digits", split_seed=1)
    assert torch.equal(a.train[0], again.train[0]) and torch.equal(a.val[1], again.val[1])
    assert rows(a, ["train"]) != rows(other, ["train"])
    assert rows(a, ["test"]) == rows(other, ["test"])  # the test split never moves
    assert rows(a, ["train", "val"]) == rows(other, ["train", "val"])


def test_limit_caps_every_split_deterministically() -> None:
    a = prunelab.data.load("digits", limit=50)
    assert a.sizes == {"train": 50, "val": 50, "test": 50}
    assert torch.equal(a.train[0], prunelab.data.load("digits", limit=50).train[0])
    assert sum(rows(a).values()) == 150 and len(rows(a)) >= 148  # distinct samples (few dupes)
    assert rows(a, ["test"]) == rows(prunelab.data.load("digits", limit=50, split_seed=7), ["test"])


# --------------------------------------------------------------------------- MNIST
def test_mnist_from_the_shared_idx_files(shared_data) -> None:
    bundle = prunelab.data.load("mnist", val_fraction=0.1)
    assert bundle.sizes == {"train": 54_000, "val": 6_000, "test": 10_000}
    assert bundle.input_shape == (1, 28, 28) and bundle.train[0].dtype == torch.uint8
    assert torch.bincount(bundle.test[1]).tolist() == MNIST_TEST_COUNTS
    assert (bundle.train[0].float().mean() / 255).item() == pytest.approx(0.1307, abs=1e-3)
    full_train = torch.cat([bundle.train[0], bundle.val[0]]).float().mean() / 255
    assert full_train.item() == pytest.approx(0.1307, abs=1e-4)
    assert bundle.mean == (0.1307,) and bundle.source == "MNIST (official IDX files)"


def test_mnist_torchvision_layout_and_uncompressed_files(shared_data, tmp_path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (shared_data / "mnist").glob("train-*.gz"):
        (raw / path.name).symlink_to(path)
    for path in (shared_data / "mnist").glob("t10k-*.gz"):  # the test files, uncompressed
        (raw / path.name.removesuffix(".gz")).write_bytes(gzip.decompress(path.read_bytes()))
    bundle = prunelab.data.load("mnist", root=tmp_path, limit=100)
    assert bundle.sizes == {"train": 100, "val": 100, "test": 100}
    reference = prunelab.data.load("mnist", limit=100)
    assert torch.equal(bundle.test[0], reference.test[0])
    assert torch.equal(bundle.train[1], reference.train[1])


# --------------------------------------------------------------------------- CIFAR-10
def test_cifar10_jpeg_copy_with_limit_decodes_only_the_kept_samples(shared_data, own_cache):
    bundle = prunelab.data.load("cifar10", limit=200)
    assert bundle.class_names == CIFAR10_CLASSES and bundle.num_classes == 10
    assert bundle.input_shape == (3, 32, 32) and bundle.train[0].dtype == torch.uint8
    assert bundle.sizes == {"train": 200, "val": 200, "test": 200}
    assert bundle.source == "CIFAR-10 (JPEG q75 copy)" and bundle.augment == "cifar"
    assert bundle.mean == pytest.approx((0.4914, 0.4822, 0.4465))
    assert len(torch.unique(bundle.test[1])) == 10
    assert not own_cache.exists()  # a partial decode is not cached
    again = prunelab.data.load("cifar10", limit=200)
    assert torch.equal(again.train[0], bundle.train[0]) and torch.equal(again.val[1], bundle.val[1])


def test_jpeg_copy_is_decoded_once_then_read_from_the_cache(tmp_path, own_cache, monkeypatch):
    for split, count in (("train", 4), ("test", 2)):
        write_images(tmp_path / "cifar10-jpeg" / split, dict(zip(CIFAR10_CLASSES,
                     range(0, 250, 25), strict=True)), count)
    first = prunelab.data.load("cifar10", root=tmp_path, val_fraction=0.25)
    assert first.sizes == {"train": 30, "val": 10, "test": 20}
    assert first.source == "CIFAR-10 (JPEG q75 copy)"
    cached = sorted(p.name for p in own_cache.iterdir())
    assert len(cached) == 2 and cached[0].startswith("cifar10-jpeg-test-")  # no temp files left
    assert all(p.stat().st_size > 3 * 32 * 32 * 20 for p in own_cache.iterdir())

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr("prunelab.data.images.decode_images", no_decoding)
    second = prunelab.data.load("cifar10", root=tmp_path, val_fraction=0.25)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(first, split)[0], getattr(second, split)[0])
    assert torch.equal(prunelab.data.load("cifar10", root=tmp_path, limit=3).test[0],
                       first.test[0][torch.randperm(20, generator=torch.Generator()
                                                    .manual_seed(0))[:3]])
    # a class with one more file is a different folder: decoded (and cached) anew
    monkeypatch.undo()
    monkeypatch.setenv("PRUNELAB_CACHE", str(own_cache))
    write_images(tmp_path / "extra", {"x": 9}, 1)
    (tmp_path / "extra" / "x" / "0000.jpg").rename(tmp_path / "cifar10-jpeg/test/cat/9999.jpg")
    assert prunelab.data.load("cifar10", root=tmp_path).sizes["test"] == 21
    assert len(list(own_cache.iterdir())) == 3


def test_cifar_labels_follow_the_class_folders(tmp_path, own_cache) -> None:
    for split in ("train", "test"):
        write_images(tmp_path / "cifar10-jpeg" / split, dict(zip(CIFAR10_CLASSES,
                     range(0, 250, 25), strict=True)), 3)
    bundle = prunelab.data.load("cifar10", root=tmp_path, limit=30)
    brightness = bundle.test[0].float().mean(dim=(1, 2, 3))
    assert torch.equal((brightness / 25).floor().long(), bundle.test[1])  # class k: 25 k + noise


def test_official_cifar_files_are_read_through_torchvision(tmp_path, monkeypatch) -> None:
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)

    class FakeTorchvision:  # stands in for torchvision.datasets on the official files
        class CIFAR10:
            classes = CIFAR10_CLASSES

            def __init__(self, root, train=True, download=False):
                self.data = pixels[:6] if train else pixels[6:]
                self.targets = [3, 1, 4, 1, 5, 9] if train else [2, 6, 5, 3]

    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setattr("prunelab.data.sources._torchvision_datasets", FakeTorchvision)
    bundle = prunelab.data.load("cifar10", root=tmp_path, val_fraction=0.5)
    assert bundle.source == "CIFAR-10 (official)" and bundle.class_names == CIFAR10_CLASSES
    assert bundle.sizes == {"train": 3, "val": 3, "test": 4}
    assert torch.equal(bundle.test[0], torch.from_numpy(pixels[6:]).permute(0, 3, 1, 2))
    assert bundle.test[1].tolist() == [2, 6, 5, 3] and bundle.test[1].dtype == torch.int64


# --------------------------------------------------------------------------- TensorBatches
def batches(n: int = 10, batch_size: int = 4, **kwargs) -> TensorBatches:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return TensorBatches(images, torch.arange(n), batch_size, **kwargs)


def test_every_sample_once_per_epoch_including_the_partial_batch() -> None:
    loader = batches(shuffle=True, seed=3)
    assert len(loader) == 3 and loader.num_samples == 10
    first = [(x, y) for x, y in loader]
    assert [len(y) for _, y in first] == [4, 4, 2]
    assert sorted(torch.cat([y for _, y in first]).tolist()) == list(range(10))
    for x, y in first:  # images travel with their labels
        assert torch.equal((x[:, 0, 0, 0] * 255).round(), y.float())
    second = torch.cat([y for _, y in loader])
    assert sorted(second.tolist()) == list(range(10))
    assert not torch.equal(torch.cat([y for _, y in first]), second)  # reshuffled
    dropped = batches(shuffle=True, drop_last=True)
    assert len(dropped) == 2 and sum(len(y) for _, y in dropped) == 8
    assert torch.equal(torch.cat([y for _, y in batches()]), torch.arange(10))  # in order


def test_same_seed_gives_the_same_batches_in_every_epoch() -> None:
    a = batches(50, 8, shuffle=True, seed=1, augment="cifar")
    b = batches(50, 8, shuffle=True, seed=1, augment="cifar")
    for _ in range(2):
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = batches(50, 8, shuffle=True, seed=2)
    assert not torch.equal(next(iter(c))[1], next(iter(batches(50, 8, shuffle=True, seed=1)))[1])
    a.set_epoch(0)
    assert torch.equal(next(iter(a))[0], next(iter(batches(50, 8, shuffle=True, seed=1,
                                                           augment="cifar")))[0])


def test_augmentation_changes_images_but_not_shapes_or_labels(shared_data) -> None:
    bundle = prunelab.data.load("cifar10", limit=256)
    plain = bundle.loader("train", 64, augment=False)
    augmented = bundle.loader("train", 64, seed=5)  # train split: augmented by default
    assert bundle.loader("test", 64).augment is None
    changed, first_epoch = 0, []
    for (x, y), (xa, ya) in zip(plain, augmented, strict=True):
        assert xa.shape == x.shape and xa.dtype == torch.float32 and xa.is_contiguous()
        assert torch.equal(y, ya)
        changed += int((x != xa).flatten(1).any(1).sum())
        first_epoch.append(xa)
    assert changed > 200  # 8/9 crops move, half the images flip
    again = [x for x, _ in bundle.loader("train", 64, seed=5)]
    assert all(torch.equal(a, b) for a, b in zip(again, first_epoch, strict=True))
    assert not torch.equal(next(iter(augmented))[0], first_epoch[0])  # new epoch, new crops
    other = next(iter(bundle.loader("train", 64, seed=6)))[0]
    assert not torch.equal(other, first_epoch[0])
    x = next(iter(bundle.loader("train", 64, channels_last=True)))[0]
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_crop_and_flip_match_a_per_image_reference() -> None:
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    out = crop_and_flip(images, torch.Generator().manual_seed(5), pad=2)
    generator = torch.Generator().manual_seed(5)  # replay the draws
    dy = torch.randint(0, 5, (6, 1, 1), generator=generator).flatten()
    dx = torch.randint(0, 5, (6, 1, 1), generator=generator).flatten()
    flip = (torch.rand(6, 1, 1, generator=generator) < 0.5).flatten()
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        expected = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        assert torch.equal(out[i], expected.flip(-1) if flip[i] else expected)
    assert flip.any() and not flip.all()


def test_normalisation_gives_zero_mean_unit_std() -> None:
    bundle = prunelab.data.load("digits")
    x = torch.cat([x for x, _ in bundle.loader("train", 256)])
    assert x.dtype == torch.float32 and x.shape == (1294, 1, 8, 8)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std().item() == pytest.approx(1.0, abs=1e-2)


# --------------------------------------------------------------------------- errors
def test_missing_dataset_offline_says_where_it_looked(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        prunelab.data.load("mnist", root=tmp_path, download=False)
    message = str(info.value)
    for place in (tmp_path / "MNIST" / "raw", tmp_path / "mnist", tmp_path):
        assert f"\n  {place}\n" in message or message.count(str(place)) >= 2
    assert "PRUNELAB_DATA" in message and "--data-dir" in message and "off" in message
    with pytest.raises(DatasetNotFoundError, match="cifar10-jpeg"):
        prunelab.data.load("cifar10", root=tmp_path)  # PRUNELAB_OFFLINE=1 in the tests
    with pytest.raises(DatasetNotFoundError, match="FashionMNIST"):
        prunelab.data.load("fashion-mnist")  # the shared root has MNIST only


def test_failed_download_is_reported(tmp_path, monkeypatch) -> None:
    class Offline:
        def __getattr__(self, name):
            def fetch(*args, **kwargs):
                raise urllib.error.URLError("Name or service not known")
            return fetch

    monkeypatch.setattr("prunelab.data.sources._torchvision_datasets", Offline)
    with pytest.raises(DatasetNotFoundError, match=r"Downloading it failed .*Name or service"):
        prunelab.data.load("mnist", root=tmp_path, download=True)
    with pytest.raises(DatasetNotFoundError, match="Downloading it failed"):
        prunelab.data.load("cifar100", root=tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_failed_cifar_download_falls_back_to_a_jpeg_copy(tmp_path, own_cache, monkeypatch):
    for split in ("train", "test"):
        write_images(tmp_path / "cifar10-jpeg" / split, dict.fromkeys(CIFAR10_CLASSES, 9), 1)

    class Offline:
        def CIFAR10(self, *args, **kwargs):
            raise OSError("Network is unreachable")

    monkeypatch.setattr("prunelab.data.sources._torchvision_datasets", Offline)
    with pytest.warns(UserWarning, match=r"Network is unreachable\)\. Using the JPEG copy"):
        bundle = prunelab.data.load("cifar10", root=tmp_path, download=True)
    assert "JPEG" in bundle.source and bundle.sizes["test"] == 10


def test_bad_names_and_values() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'mnist'"):
        prunelab.data.load("mnits")
    with pytest.raises(UnknownNameError):
        prunelab.data.check_name("nope:thing")
    prunelab.data.check_name("imagefolder:/anywhere")
    assert {"digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder"} <= set(
        prunelab.data.names()
    )
    for fraction in (1.0, -0.1, 1.5):
        with pytest.raises(InvalidValueError, match="val_fraction"):
            prunelab.data.load("digits", val_fraction=fraction)
    with pytest.raises(InvalidValueError, match="limit"):
        prunelab.data.load("digits", limit=0)
    with pytest.raises(InvalidValueError, match="no option 'size'"):
        prunelab.data.load("digits", size=3)
    with pytest.raises(InvalidValueError, match="takes no ':' argument"):
        prunelab.data.load("mnist:somewhere")
    with pytest.raises(InvalidValueError, match="split must be"):
        prunelab.data.load("digits").loader("validation", 8)
    with pytest.raises(InvalidValueError, match="batch_size"):
        prunelab.data.load("digits").loader("train", 0)


# --------------------------------------------------------------------------- image folders
def test_image_folder_with_train_and_test(tmp_path, own_cache) -> None:
    write_images(tmp_path / "train", {"cat": 30, "dog": 200}, 6, size=(12, 10), suffix=".png")
    write_images(tmp_path / "test", {"cat": 30, "dog": 200}, 2, size=(20, 20), suffix=".png")
    bundle = prunelab.data.load(f"imagefolder:{tmp_path}", val_fraction=0.25, image_size=16)
    assert bundle.class_names == ["cat", "dog"] and bundle.input_shape == (3, 16, 16)
    assert bundle.sizes == {"train": 9, "val": 3, "test": 4}
    assert bundle.source == f"image folder {tmp_path}"
    x, y = next(iter(bundle.loader("test", 4)))
    assert set(y.tolist()) == {0, 1}
    assert (x[y == 0].mean() < x[y == 1].mean()).item()
    assert x.mean().abs().item() < 1.5  # normalised with the training split's statistics


def test_image_folder_sizes_and_carved_splits(tmp_path, own_cache) -> None:
    write_images(tmp_path / "same" / "a", {"x": 10, "y": 90}, 5, size=(20, 24))
    kept = prunelab.data.load(f"imagefolder:{tmp_path / 'same' / 'a'}")
    assert kept.input_shape == (3, 20, 24)  # all equal: native size kept
    assert kept.sizes == {"train": 7, "val": 1, "test": 2}  # test carved, then val
    write_images(tmp_path / "mixed", {"x": 10}, 2, size=(20, 24))
    write_images(tmp_path / "mixed2", {"y": 50}, 2, size=(40, 40))
    (tmp_path / "mixed2" / "y").rename(tmp_path / "mixed" / "y")
    assert prunelab.data.load(f"imagefolder:{tmp_path / 'mixed'}").input_shape == (3, 32, 32)


def test_image_folder_errors(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        prunelab.data.load(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        prunelab.data.load("imagefolder")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no images found"):
        prunelab.data.load(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "broken" / "cls").mkdir(parents=True)
    (tmp_path / "broken" / "cls" / "a.png").write_bytes(b"not an image")
    with pytest.raises(InvalidValueError, match=r"cannot decode image .*a\.png"):
        prunelab.data.load(f"imagefolder:{tmp_path / 'broken'}")
    with pytest.raises(InvalidValueError, match="image_size"):
        prunelab.data.load(f"imagefolder:{tmp_path / 'broken'}", image_size=0)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("PRUNELAB_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "prunelab" / "cache"


# --------------------------------------------------------------------------- slow: full decode
@pytest.mark.slow
def test_full_cifar10_jpeg_copy_then_cached(shared_data, own_cache, monkeypatch) -> None:
    bundle = prunelab.data.load("cifar10")
    assert bundle.sizes == {"train": 45_000, "val": 5_000, "test": 10_000}
    assert torch.bincount(bundle.test[1]).tolist() == [1000] * 10
    train_labels = torch.cat([bundle.train[1], bundle.val[1]])
    assert torch.bincount(train_labels).tolist() == [5000] * 10
    pixels = torch.cat([bundle.train[0], bundle.val[0]]).float().mean(dim=(0, 2, 3)) / 255
    assert pixels.tolist() == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-3)  # official
    assert len(list(own_cache.glob("cifar10-jpeg-*.pt"))) == 2

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr("prunelab.data.images.decode_images", no_decoding)
    again = prunelab.data.load("cifar10")
    assert torch.equal(again.train[0], bundle.train[0]) and torch.equal(again.test[1],
                                                                        bundle.test[1])
    limited = prunelab.data.load("cifar10", limit=100)  # a limit reads the cache too
    assert limited.sizes["train"] == 100
    epoch = sum(len(y) for _, y in bundle.loader("train", 128, shuffle=True))
    assert epoch == 45_000

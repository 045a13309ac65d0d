"""Datasets: splits, offline files, caching, batch iteration, augmentation, errors."""

from __future__ import annotations

import pytest
import torch

import prunelab
from prunelab.data import TensorBatches, cache_dir, crop_and_flip
from prunelab.errors import DatasetNotFoundError, InvalidValueError, UnknownNameError


def as_set(split) -> set[bytes]:
    return {bytes(x.numpy().tobytes()) for x in split[0]}


def test_digits_splits_are_complete_disjoint_and_deterministic() -> None:
    a = prunelab.data.load("digits")
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert sum(a.sizes.values()) == 1797 and a.sizes["test"] == round(0.2 * 1797)
    assert torch.equal(a.train[0], prunelab.data.load("digits").train[0])
    other = prunelab.data.load("digits", split_seed=1)
    assert not torch.equal(a.train[0], other.train[0])
    assert torch.equal(a.test[0], other.test[0])  # the test split never moves
    labels = torch.cat([a.train[1], a.val[1], a.test[1]])
    assert torch.bincount(labels).min() > 150  # all classes present


def test_mnist_from_the_official_files(shared_data) -> None:
    bundle = prunelab.data.load("mnist", val_fraction=0.1)
    assert bundle.sizes == {"train": 54_000, "val": 6_000, "test": 10_000}
    assert torch.bincount(bundle.test[1]).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009
    ]
    everything = torch.cat([bundle.train[0], bundle.val[0]]).float() / 255
    assert everything.mean().item() == pytest.approx(0.1307, abs=1e-4)


def test_cifar10_jpeg_copy_with_limit_and_cache(shared_data) -> None:
    bundle = prunelab.data.load("cifar10", limit=200)
    assert bundle.class_names[0] == "airplane" and bundle.class_names[-1] == "truck"
    assert bundle.input_shape == (3, 32, 32) and bundle.train[0].dtype == torch.uint8
    assert bundle.sizes == {"train": 200, "val": 200, "test": 200}
    assert "JPEG" in bundle.source and bundle.augment == "cifar"
    cached = list(cache_dir().glob("cifar10-jpeg-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = prunelab.data.load("cifar10", limit=200)
    assert cached[0].stat().st_mtime_ns == stamp  # read, not rewritten
    assert torch.equal(again.test[0], bundle.test[0])


def batches(n: int = 10, **kwargs) -> TensorBatches:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return TensorBatches(images, torch.arange(n), 4, **kwargs)


def test_every_sample_once_per_epoch_including_the_partial_batch() -> None:
    loader = batches(shuffle=True, seed=3)
    assert len(loader) == 3
    first = [y for _, y in loader]
    assert [len(y) for y in first] == [4, 4, 2]
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    second = torch.cat([y for _, y in loader])
    assert not torch.equal(torch.cat(first), second)  # reshuffled
    assert len(batches(drop_last=True)) == 2


def test_same_seed_same_batches_and_set_epoch_replays() -> None:
    a, b = batches(shuffle=True, seed=1, augment="cifar"), batches(shuffle=True, seed=1,
                                                                    augment="cifar")
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(0)
    b.set_epoch(0)
    assert torch.equal(next(iter(a))[0], next(iter(b))[0])


def test_crop_and_flip_match_a_per_image_reference() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    out = crop_and_flip(images, torch.Generator().manual_seed(5), pad=2)
    generator = torch.Generator().manual_seed(5)  # replay the draws
    dy = torch.randint(0, 5, (6, 1, 1), generator=generator).flatten()
    dx = torch.randint(0, 5, (6, 1, 1), generator=generator).flatten()
    flip = (torch.rand(6, 1, 1, generator=generator) < 0.5).flatten()
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        expected = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        if flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)
    assert flip.any() and not flip.all()


def test_normalisation_uses_the_dataset_statistics() -> None:
    bundle = prunelab.data.load("digits")
    x = torch.cat([x for x, _ in bundle.loader("train", 256)])
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std().item() == pytest.approx(1.0, abs=1e-2)


def test_missing_dataset_offline_says_where_it_looked(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        prunelab.data.load("mnist", root=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "PRUNELAB_DATA" in message
    with pytest.raises(DatasetNotFoundError, match="cifar10-jpeg"):
        prunelab.data.load("cifar10", root=tmp_path, download=False)


def test_bad_names_and_values() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'mnist'"):
        prunelab.data.load("mnits")
    with pytest.raises(InvalidValueError, match="val_fraction"):
        prunelab.data.load("digits", val_fraction=1.0)
    with pytest.raises(InvalidValueError, match="no option 'size'"):
        prunelab.data.load("digits", size=3)


def test_image_folder(tmp_path) -> None:
    from torchvision.io import write_png

    for split, count in (("train", 6), ("test", 2)):
        for cls, value in (("cat", 30), ("dog", 200)):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                image = torch.full((3, 12, 10), value, dtype=torch.uint8)
                write_png(image, str(folder / f"{i}.png"))
    bundle = prunelab.data.load(f"imagefolder:{tmp_path}", val_fraction=0.25, image_size=16)
    assert bundle.class_names == ["cat", "dog"] and bundle.input_shape == (3, 16, 16)
    assert bundle.sizes == {"train": 9, "val": 3, "test": 4}
    x, y = next(iter(bundle.loader("test", 4)))
    assert set(y.tolist()) == {0, 1}
    assert (x[y == 0].mean() < x[y == 1].mean()).item()
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        prunelab.data.load(f"imagefolder:{tmp_path / 'nope'}")

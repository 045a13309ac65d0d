"""Shipped reference weights: checked on load, accurate as recorded, usable as a sweep's dense."""

from __future__ import annotations

import pytest
import torch

import prunelab
from prunelab.errors import ConfigError, InvalidValueError, PrunelabError
from prunelab.models import pretrained


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    """A private weights folder, so tests never touch the shipped files."""
    monkeypatch.setattr(pretrained, "WEIGHTS", tmp_path)
    monkeypatch.setattr(pretrained, "MANIFEST", tmp_path / "manifest.json")
    return tmp_path


def test_round_trip_and_a_corrupted_file_is_refused(weights_dir) -> None:
    model = prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28))
    info = {"num_classes": 10, "input_shape": [1, 28, 28], "model_kwargs": {}}
    path = pretrained.add_weights(model, "lenet-300-100", "toy", info)
    again = prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28), pretrained="toy")
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PrunelabError, match="corrupted"):
        prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28), pretrained="toy")


def test_unknown_or_mismatched_weights_say_what_is_shipped(weights_dir) -> None:
    model = prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28))
    pretrained.add_weights(model, "lenet-300-100", "toy",
                           {"num_classes": 10, "input_shape": [1, 28, 28], "model_kwargs": {}})
    with pytest.raises(InvalidValueError, match=r"no pretrained weights.*lenet-300-100 "
                                                r"\(pretrained='toy'\)"):
        prunelab.models.create("lenet-5", pretrained="toy")
    with pytest.raises(InvalidValueError, match="built with num_classes=10, not 7"):
        prunelab.models.create("lenet-300-100", num_classes=7, input_shape=(1, 28, 28),
                               pretrained="toy")
    with pytest.raises(InvalidValueError, match="ships no weights for torchvision"):
        prunelab.models.create("resnet18", pretrained="imagenet")


SHIPPED = sorted(pretrained.available().items())


@pytest.mark.parametrize(("key", "info"), [pytest.param(k, v, marks=pytest.mark.slow)
                                           if "cifar" in k else (k, v) for k, v in SHIPPED])
def test_shipped_weights_reach_their_recorded_test_accuracy(key, info, shared_data) -> None:
    name, dataset = key.split("/")
    bundle = prunelab.data.load(dataset, val_fraction=0.1, split_seed=0)
    model = prunelab.models.create(name, num_classes=bundle.num_classes,
                                   input_shape=bundle.input_shape, pretrained=dataset)
    top1 = prunelab.evaluate(model, bundle.loader("test", 1000))["top1"]
    assert top1 == pytest.approx(info["test_top1"], abs=0.01)


def test_a_sweep_prunes_the_shipped_model(tmp_path, shared_data) -> None:
    if "lenet-300-100/mnist" not in pretrained.available():
        pytest.fail("the reference LeNet-300-100 (MNIST) is not shipped")
    from prunelab.bench import ResultStore, SweepSpec, run_sweep
    from prunelab.config import validate

    spec = {"model": "lenet-300-100", "dataset": "mnist", "dense": "pretrained",
            "finetune": {"epochs": 1, "batch_size": 128, "lr": 0.01},
            "latency": {"enabled": False},
            "grid": {"methods": ["magnitude"], "targets": {"sparsity": [0.9]}, "seeds": [0],
                     "controls": False, "recoveries": ["none"]}}
    recipe = pretrained.available()["lenet-300-100/mnist"]["recipe"]
    assert validate(SweepSpec, spec).train.epochs == recipe["epochs"]  # Scratch-E/B match it
    summary = run_sweep(validate(SweepSpec, spec), tmp_path, quiet=True)
    assert (summary.ok, summary.failed) == (1, 0)
    with ResultStore(tmp_path / "results.sqlite") as store:
        rows = {r["method"]: r for r in store.rows()}
    recorded = pretrained.available()["lenet-300-100/mnist"]["test_top1"]
    assert rows["dense"]["test_top1"] == pytest.approx(recorded, abs=0.01)
    # One-shot 90% magnitude pruning of a converged LeNet-300-100 costs little without recovery.
    assert rows["magnitude"]["test_top1"] > recorded - 5
    with pytest.raises(ConfigError, match="pretrained weights do not have"):
        validate(SweepSpec, spec | {"grid": spec["grid"] | {"recoveries": ["rewind"]}}
                 ).check_plan()

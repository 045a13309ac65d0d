"""Trainer, recipes, schedules and recovery on small synthetic problems."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunelab
from prunelab.errors import CheckpointError, InvalidValueError
from prunelab.recoveries import Snapshot, rewind_weights
from prunelab.schedules import (
    GradualPruning,
    Pruner,
    agp_sparsity,
    iterative,
    iterative_sparsities,
)
from prunelab.sparsity import mask_sparsity
from prunelab.training import TrainRecipe, train


def blobs(seed: int = 0, n: int = 96) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 10, generator=generator) * 3
    y = torch.randint(0, 3, (n,), generator=generator)
    x = centers[y] + torch.randn(n, 10, generator=generator)
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


RECIPE = TrainRecipe(epochs=6, lr=0.05, schedule="cosine")


def test_training_learns_and_is_deterministic() -> None:
    a, b = mlp(), mlp()
    ra = train(a, blobs(), RECIPE, quiet=True)
    train(b, blobs(), RECIPE, quiet=True)
    assert ra.history[-1]["train_loss"] < ra.history[0]["train_loss"] / 2
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    assert prunelab.evaluate(a, blobs(seed=0))["top1"] > 90


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_a_model_on_a_gpu_learns_there() -> None:
    model = mlp().cuda()
    result = train(model, blobs(), RECIPE, val_data=blobs(seed=0), quiet=True)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] / 2
    assert next(model.parameters()).is_cuda


def test_bf16_training_runs_the_forward_in_bfloat16_and_keeps_float32_weights() -> None:
    model, seen = mlp(), []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    bf16 = TrainRecipe(epochs=6, lr=0.05, schedule="cosine", precision="bf16")
    result = train(model, blobs(), bf16, quiet=True)
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] / 2
    assert prunelab.evaluate(model, blobs(seed=0))["top1"] > 90
    # The default leaves the config (and so the keys of stored results) as before the option.
    assert "precision" not in RECIPE.model_dump() and bf16.model_dump()["precision"] == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, native) -> None:
    """Emulated bf16 is ~12x slower than fp32 (ResNet-20 on an AVX2 CPU): say so, once."""
    import warnings

    monkeypatch.setattr("prunelab.utils.cpu_has_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(mlp(), blobs(), TrainRecipe(epochs=1, precision="bf16"), quiet=True)
        train(mlp(), blobs(), TrainRecipe(epochs=1), quiet=True)
    said = [str(w.message) for w in caught if "bf16 instructions" in str(w.message)]
    assert len(said) == (0 if native else 1)
    assert native or "use precision='fp32'" in said[0]


def test_lr_schedules() -> None:
    step = TrainRecipe(lr=1.0, schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert [step.lr_factor(s, 100) for s in (0, 49, 50, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.01, 0.01]
    )
    cosine = TrainRecipe(schedule="cosine")
    assert cosine.lr_factor(0, 10) == 1 and cosine.lr_factor(5, 10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="milestones"):
        TrainRecipe(milestones=[0.8, 0.2])


def test_keep_best_restores_the_best_validation_epoch() -> None:
    model = mlp()
    result = train(model, blobs(), RECIPE, val_data=blobs(seed=1), keep_best=True, quiet=True)
    best = max(result.history, key=lambda h: h["val_top1"])
    assert result.best_epoch == best["epoch"]
    assert prunelab.evaluate(model, blobs(seed=1))["top1"] == pytest.approx(best["val_top1"])
    with pytest.raises(InvalidValueError, match="val_data"):
        train(mlp(), blobs(), RECIPE, keep_best=True, quiet=True)


class Interrupt(prunelab.training.Callback):
    """Simulates a crash after ``epoch`` epochs."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, state, metrics) -> None:
        if state.epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("keep_best", [False, True])
def test_checkpoint_resume_gives_the_same_weights(tmp_path, keep_best) -> None:
    # With keep_best, the best epoch may be one before the crash: the file must remember it.
    recipe = RECIPE.model_copy(update={"lr": 1.0}) if keep_best else RECIPE  # best: epoch 1
    options = {"val_data": blobs(seed=1), "keep_best": True} if keep_best else {}
    full = mlp()
    expected = train(full, blobs(), recipe, quiet=True, **options)
    path = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train(mlp(), blobs(), recipe, checkpoint=path, callbacks=[Interrupt(3)], quiet=True,
              **options)
    resumed = mlp(seed=5)  # other initial weights: everything must come from the file
    result = train(resumed, blobs(), recipe, checkpoint=path, quiet=True, **options)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.best_epoch == expected.best_epoch
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_masked_training_keeps_sparsity() -> None:
    model = mlp()
    prunelab.prune(model, "magnitude", 0.75)
    train(model, blobs(), RECIPE, quiet=True)
    assert sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear)) >= round(
        0.75 * (320 + 96)
    )


def test_iterative_sparsities_are_geometric() -> None:
    steps = iterative_sparsities(0.875, 3)
    assert steps == pytest.approx([0.5, 0.75, 0.875])
    assert iterative_sparsities(0.875, 2, start=0.5) == pytest.approx([0.75, 0.875])
    with pytest.raises(InvalidValueError, match="already"):
        iterative_sparsities(0.5, 2, start=0.75)
    with pytest.raises(InvalidValueError):
        iterative_sparsities(0.9, 0)


def test_agp_follows_the_cubic_ramp() -> None:
    assert agp_sparsity(0, final=0.9, initial=0.0, start=0, steps=100) == 0.0
    assert agp_sparsity(50, final=0.9, initial=0.0, start=0, steps=100) == pytest.approx(
        0.9 * (1 - 0.5**3)
    )
    assert agp_sparsity(100, final=0.9, initial=0.0, start=0, steps=100) == pytest.approx(0.9)
    assert agp_sparsity(500, final=0.9, initial=0.0, start=0, steps=100) == pytest.approx(0.9)


def test_gradual_pruning_reaches_the_target_with_rising_masks() -> None:
    model = mlp()
    agp = GradualPruning(Pruner("magnitude"), 0.8, end=0.5, frequency=2)
    train(model, blobs(), RECIPE, callbacks=[agp], quiet=True)
    targets = [t for _, t in agp.applied]
    assert targets == sorted(targets) and len(targets) >= 3
    assert mask_sparsity(model) == pytest.approx(0.8, abs=1e-2)


def test_gradual_pruning_reaches_the_target_at_the_ramp_end_not_after_training() -> None:
    model = mlp()
    agp = GradualPruning(Pruner("magnitude"), 0.8, end=0.5, frequency=7)  # 7 does not divide
    train(model, blobs(), RECIPE, callbacks=[agp], quiet=True)
    total = RECIPE.epochs * len(blobs())
    assert agp.applied[-1] == (int(0.5 * total), 0.8)  # the rest of training recovers


def test_iterative_with_recovery_calls_recover_each_round() -> None:
    model = mlp()
    seen: list[float] = []
    iterative(model, Pruner("magnitude"), 0.9, 3, recover=lambda m: seen.append(mask_sparsity(m)))
    assert seen == pytest.approx(iterative_sparsities(0.9, 3), abs=1e-2)
    iterative(model, Pruner("magnitude"), 0.99, 2, recover=lambda m: seen.append(mask_sparsity(m)))
    assert seen[3:] == pytest.approx(iterative_sparsities(0.99, 2, start=0.9), abs=1e-2)


def test_rewinding_restores_early_weights_under_the_mask() -> None:
    model = mlp()
    snapshot = Snapshot(epoch=0)
    train(model, blobs(), RECIPE, callbacks=[snapshot], quiet=True)
    prunelab.prune(model, "magnitude", 0.5)
    rewind_weights(model, snapshot.state)
    first = model[0].weight
    initial = snapshot.state["0.weight"]
    kept = first != 0
    assert torch.equal(first[kept], initial[kept]) and mask_sparsity(model) == pytest.approx(0.5,
                                                                                          abs=1e-2)


def test_checkpoints_reject_bad_files(tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        prunelab.load_checkpoint(bad, mlp())
    other = tmp_path / "other.pt"
    prunelab.save_checkpoint(other, nn.Linear(3, 3))
    with pytest.raises(CheckpointError, match="do not fit"):
        prunelab.load_checkpoint(other, mlp())
    with pytest.raises(CheckpointError, match="does not exist"):
        prunelab.load_checkpoint(tmp_path / "missing.pt", mlp())


def test_checkpoint_round_trip_with_masks(tmp_path) -> None:
    model = mlp()
    prunelab.prune(model, "magnitude", 0.6)
    path = prunelab.save_checkpoint(tmp_path / "m.pt", model, extra={"note": "hi"})
    loaded, payload = prunelab.load_checkpoint(path, mlp(seed=3))
    assert payload["extra"]["note"] == "hi"
    x = torch.randn(5, 10)
    assert torch.equal(model(x), loaded(x))


def test_strided_pointwise_convolutions_on_few_channels_train_in_channels_last() -> None:
    """oneDNN (torch 2.14, AVX2 CPU) kills the process computing gradients of a 1x1 stride-2
    convolution over < 8 input channels in channels_last; training runs it in NCHW instead.
    On an affected CPU this test crashes without the work-around."""
    from prunelab.training.workarounds import strided_pointwise_in_nchw

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 8, 1, stride=2), nn.Flatten(), nn.Linear(8 * 16 * 16, 2))
    data = [(torch.randn(64, 3, 32, 32), torch.randint(0, 2, (64,))) for _ in range(2)]
    prunelab.prune(model, "magnitude", 0.5)  # the weight under a mask's parametrization
    result = train(model, data, TrainRecipe(epochs=2, lr=0.01), quiet=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(result.history) == 2
    assert mask_sparsity(model) == pytest.approx(0.5, abs=0.01)
    assert not model[2]._forward_pre_hooks  # removed after training

    seen = []
    model[2].register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    with strided_pointwise_in_nchw(model):
        model(x)
    model(x)
    assert seen == [True, False]  # NCHW inside (4 channels arrive), channels_last outside
    wide = nn.Conv2d(8, 8, 1, stride=2).to(memory_format=torch.channels_last)
    wide.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    with strided_pointwise_in_nchw(wide):
        wide(torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last))
    assert seen[-1] is False  # 8 channels: left in channels_last

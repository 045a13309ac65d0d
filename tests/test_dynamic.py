"""Dynamic sparse training (SET, RigL) and the at-init schedule with the sparse-train recovery."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import nn

import prunelab
from prunelab.cli import main
from prunelab.errors import ConfigError, PrunelabError
from prunelab.experiment import Experiment
from prunelab.experiment_config import ExperimentConfig, MethodChoice
from prunelab.sparsity import prunable_weights
from prunelab.training import Callback, TrainRecipe, TrainState, train
from prunelab.training.dynamic import DynamicSparsity


def blobs(n: int = 192) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=generator) * 3
    y = torch.randint(0, 3, (n,), generator=generator)
    x = centers[y] + torch.randn(n, 10, generator=generator)
    return [(x[i: i + 16], y[i: i + 16]) for i in range(0, n, 16)]


def sparse_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    return prunelab.prune(model, "random", 0.8, scope="erk")


RECIPE = TrainRecipe(epochs=3, lr=0.05, momentum=0.9, schedule="cosine")


class Probe(Callback):
    """Runs after the dynamic-sparsity callback and checks every step."""

    def __init__(self, dst: DynamicSparsity):
        self.dst, self.changed, self.hooked = dst, [], []

    def on_step_begin(self, state: TrainState) -> None:
        self.before = [w.mask.bool().clone() for w in prunable_weights(state.model)]

    def on_after_backward(self, state: TrainState) -> None:
        self.hooked.append(bool(self.dst.hooks))
        if self.dst.hooks:  # the captured dense gradient is ∂L/∂(w ⊙ m)
            for w, g in zip(self.dst.weights, self.dst.grads, strict=True):
                torch.testing.assert_close(g * w.mask, w.original.grad)
                assert (g[w.mask == 0] != 0).any()  # dense: pruned positions have gradients

    def on_step_end(self, state: TrainState) -> None:
        weights = prunable_weights(state.model)
        changed = False
        for w, old in zip(weights, self.before, strict=True):
            new = w.mask.bool()
            assert int(new.sum()) == int(old.sum())  # per-layer sparsity constant
            grown = new & ~old
            changed |= bool(grown.any())
            assert (w.original[grown] == 0).all()  # regrown weights start at 0
            momentum = state.optimizer.state[w.original]["momentum_buffer"]
            assert (momentum[grown] == 0).all()  # and their momentum is reset
        self.changed.append((state.step, changed))


@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_updates_move_connections_keep_counts_and_reset_new_weights(growth: str) -> None:
    model = sparse_mlp()
    counts = [int(w.mask.sum()) for w in prunable_weights(model)]
    dst = DynamicSparsity(growth, interval=5, drop_fraction=0.3, decay=growth == "gradient")
    probe = Probe(dst)
    train(model, blobs(), RECIPE, callbacks=[dst, probe], quiet=True)
    total = RECIPE.epochs * len(blobs())
    assert [int(w.mask.sum()) for w in prunable_weights(model)] == counts
    due = [s for s in range(1, total + 1) if s % 5 == 0 and s <= int(0.75 * total)]
    assert [s for s, _ in dst.updates] == due
    changed = [step for step, changed in probe.changed if changed]
    assert changed == [s for s, moved in dst.updates if moved]  # masks move at updates only
    # SET moves ζ of each layer every time; RigL's cosine reaches 0 by the end (k rounds down).
    assert changed == due if growth == "random" else changed == due[:-1]
    # The dense gradient is captured only for update steps.
    assert [i + 1 for i, h in enumerate(probe.hooked) if h] == (
        [s for s, _ in dst.updates] if growth == "gradient" else [])


def test_rigl_drops_smallest_magnitudes_and_grows_largest_gradients() -> None:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.1, 0.0, 0.9], [0.0, 0.3, -0.2, 0.0]]))
    prunelab.prune(layer, "magnitude", 0.375)  # three zeros pruned, five active
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    original = layer.parametrizations.weight.original
    optimizer.state[original]["momentum_buffer"] = torch.ones_like(original)
    dst = DynamicSparsity("gradient", drop_fraction=0.5, interval=1, end=1.0, decay=False)
    state = TrainState(layer, optimizer, RECIPE, 10, 10, step=1)
    dst.on_train_begin(state)
    dst.grads = [torch.tensor([[0.0, 0.0, 5.0, 0.0], [9.0, 0.0, 0.0, 1.0]])]
    dst.update(state)
    # 2 of 5 dropped: |-0.1| and |-0.2|; grown: the largest |g| off the kept set, (1,0), (0,2).
    expected = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(layer.parametrizations.weight[0].mask, expected)
    assert original[0, 2] == 0 and original[1, 0] == 0
    assert optimizer.state[original]["momentum_buffer"][0, 2] == 0
    assert optimizer.state[original]["momentum_buffer"][0, 0] == 1  # kept: state untouched


def test_rigl_drop_fraction_follows_a_cosine() -> None:
    dst = DynamicSparsity("gradient", drop_fraction=0.3, interval=10, end=0.75)
    dst.last = 750
    assert dst.fraction(0) == pytest.approx(0.3)
    assert dst.fraction(375) == pytest.approx(0.15)
    assert dst.fraction(750) == pytest.approx(0.0, abs=1e-12)
    assert dst.fraction(100) == pytest.approx(0.15 * (1 + math.cos(math.pi * 100 / 750)))


def test_interval_longer_than_the_run_is_refused() -> None:
    dst = DynamicSparsity("gradient", interval=1000)
    with pytest.raises(PrunelabError,
                       match=r"interval \(delta_t\) 1000 steps is longer than the 27 steps"):
        train(sparse_mlp(), blobs(), RECIPE, callbacks=[dst], quiet=True)
    with pytest.raises(PrunelabError, match="has none"):
        train(nn.Linear(10, 3), blobs(), RECIPE, callbacks=[DynamicSparsity()], quiet=True)


def config(**overrides) -> ExperimentConfig:
    base = {"model": "lenet-300-100", "dataset": "digits", "schedule": "at-init",
            "recovery": "sparse-train", "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
            "latency": {"enabled": False}}
    return ExperimentConfig(**(base | overrides))


def test_at_init_prunes_the_run_seeds_initialisation() -> None:
    experiment = Experiment(config(recovery="none"))
    choice = MethodChoice(method="snip")
    model, _ = experiment.prune_and_recover(None, choice, "sparsity", 0.9, 0)
    reference = prunelab.prune(experiment.new_model(0), "snip", 0.9,
                               data=experiment.pruner(choice, 0).data)
    for got, expected in zip(model.state_dict().values(), reference.state_dict().values(),
                             strict=True):
        assert torch.equal(got, expected)  # the same weights and the same mask: untrained
    total = sum(w.numel() for w in prunable_weights(model))
    assert sum(int(w.mask.sum()) for w in prunable_weights(model)) == round(0.1 * total)


@pytest.mark.parametrize("update", ["static", "set", "rigl"])
def test_sparse_train_trains_the_sparse_net(update: str) -> None:
    experiment = Experiment(config(recovery={"kind": "sparse-train", "update": update,
                                             "delta_t": 5}, train={"epochs": 4, "lr": 0.05,
                                                                   "batch_size": 64}))
    choice = MethodChoice(method="random", scope="erk")
    model, _ = experiment.prune_and_recover(None, choice, "sparsity", 0.8, 0)
    initial = prunelab.prune(experiment.new_model(0), "random", 0.8, scope="erk", seed=0)
    masks = [w.mask for w in prunable_weights(model)]
    start = [w.mask for w in prunable_weights(initial)]
    assert [int(m.sum()) for m in masks] == [int(m.sum()) for m in start]
    assert all(torch.equal(a, b) for a, b in zip(masks, start, strict=True)) == (
        update == "static")
    assert experiment.row(model, 0, 0.0)["test_top1"] > 50  # it trained (chance is 10%)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"recovery": "finetune"}, "recovery 'finetune' makes no sense"),
     ({"recovery": "rewind"}, "recovery 'rewind' makes no sense"),
     ({"schedule": "one-shot"}, "set schedule to at-init")],
)
def test_nonsensical_combinations_are_refused(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**overrides).check_plan([MethodChoice(method="snip")])


def test_structured_methods_cannot_prune_at_init() -> None:
    with pytest.raises(ConfigError, match="prunes one-shot"):
        config().check_plan([MethodChoice(method="l1-filter")])


def test_a_collapsed_layer_is_named() -> None:
    experiment = Experiment(config(recovery="none"))
    with pytest.raises(PrunelabError, match="prunes every weight of layer '5'"):
        experiment.prune_and_recover(None, MethodChoice(method="magnitude", scope="layer"),
                                     "sparsity", 0.9996, 0)


def test_a_collapsed_shortcut_does_not_cut_a_resnet() -> None:
    """SynFlow can empty a residual block's 1x1 shortcut (ResNet-20 at 98%, one seed of three):
    the block's other branch still carries the signal, so that is a warning, not a cut."""
    from prunelab.sparsity import check_not_cut, set_mask, signal_passes

    model = prunelab.models.create("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)

    def empty(*names: str) -> None:
        for name in names:
            layer = model.get_submodule(name)
            set_mask(layer, torch.zeros_like(layer.weight))

    empty("layer3.0.shortcut.0")
    assert signal_passes(model, x)
    with pytest.warns(UserWarning, match="layer3.0.shortcut.0'; the signal still passes"):
        check_not_cut(model, x, "synflow at sparsity 0.98")
    empty("layer3.0.conv1")  # both branches of the block: nothing gets through
    assert not signal_passes(model, x)
    with pytest.raises(PrunelabError, match=r"'layer3.0.conv1' \(and 1 more\), which cuts"):
        check_not_cut(model, x, "synflow at sparsity 0.98")


def test_cli_sweep_with_a_bad_update_is_one_line(tmp_path, capsys) -> None:
    spec = {"name": "dst", "schedule": "at-init", "model": "lenet-300-100",
            "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}, "latency": {"enabled": False},
            "grid": {"methods": [{"method": "random", "scope": "erk"}],
                     "targets": {"sparsity": [0.9]}, "seeds": [0],
                     "recoveries": ["sparse-train",
                                    {"kind": "sparse-train", "update": "finetune"}]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(path), "-q", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "update" in err


def test_results_tell_sparse_train_updates_apart() -> None:
    from prunelab.recoveries import RECOVERIES

    sparse = RECOVERIES.get("sparse-train")
    assert sparse().label() == "sparse-train"
    assert sparse(update="rigl", delta_t=50).label() == "sparse-train(update=rigl, delta_t=50)"

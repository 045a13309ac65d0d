"""Latency-aware channel targets: the table, its cache, and where the greedy plan cuts.

Most tests replace the timing of a layer by a known cost (its multiply-adds, possibly weighted
by where it sits), so the plan can be checked exactly; one test times real layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import prunelab
from prunelab.errors import InvalidValueError
from prunelab.structured.graph import structure_of
from prunelab.structured.latency import _PROBE, OVERHEAD, LatencyTable, LayerShape, layer_shapes

X = torch.randn(4, 3, 32, 32)


def macs(shape: LayerShape, cin: int, cout: int) -> float:
    """Multiply-adds of a layer: a cost that is exactly bilinear in (cin, cout)."""
    if shape.kind == "linear":
        return float(cin * cout)
    out = 1
    for size, k, s, p, d in zip(shape.input_size, shape.kernel, shape.stride, shape.padding,
                                shape.dilation, strict=True):
        out *= (size + 2 * p - d * (k - 1) - 1) // s + 1
    per_output = 1 if shape.kind == "depthwise" else cin
    for k in shape.kernel:
        per_output *= k
    return float(cout * out * per_output)


def conv_linear_macs(model: nn.Module, example: torch.Tensor) -> float:
    shapes = layer_shapes(model, example)
    return sum(macs(s, s.in_channels, s.out_channels) for s in shapes.values())


@pytest.fixture
def timed_as(monkeypatch, tmp_path):
    """Replace layer timing by ``cost(shape, cin, cout)`` (with a cache of its own); returns
    the list of timed calls."""
    calls = []
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path))

    def use(cost):
        def fake(self, shape, cin, cout):
            calls.append((shape.key, cin, cout))
            return cost(shape, cin, cout)
        monkeypatch.setattr(LatencyTable, "_time", fake)
        return calls
    return use


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_macs_table_predicts_the_macs_speedup_exactly(timed_as, scope) -> None:
    timed_as(macs)
    model = prunelab.models.create("resnet20")
    before = conv_linear_macs(model, X)
    prunelab.prune(model, "l2-channel", latency_speedup=2.0, example_input=X, scope=scope)
    record = structure_of(model)[-1]["latency"]
    achieved = before / conv_linear_macs(model, X)
    # Piecewise-linear interpolation of a bilinear cost is exact: prediction = truth.
    assert record["predicted_speedup"] == pytest.approx(achieved, rel=1e-3)
    assert record["predicted_speedup"] >= 2.0
    assert record["backend"] == "torch" and record["batch_size"] == 4
    assert achieved < 2.3  # not far past the target


def stage_fractions(model: nn.Module) -> dict[str, float]:
    """Fraction of output channels removed from the convolutions of each ResNet-20 stage."""
    full = {"layer1": 16, "layer2": 32, "layer3": 64}
    kept = {stage: [] for stage in full}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name.split(".")[0] in full:
            kept[name.split(".")[0]].append(module.out_channels)
    return {s: 1 - sum(k) / (full[s] * len(k)) for s, k in kept.items()}


def test_cuts_go_where_the_time_is(timed_as) -> None:
    """With the 8x8 stage ten times slower per multiply-add than its FLOPs say, the latency
    plan takes more of its channels than a FLOPs plan does, and fewer elsewhere."""
    timed_as(lambda s, cin, cout: macs(s, cin, cout) * (10 if s.input_size == (8, 8) else 1))
    by_flops = prunelab.prune(prunelab.models.create("resnet20"), "l2-channel", speedup=1.5,
                              example_input=X)
    by_latency = prunelab.prune(prunelab.models.create("resnet20"), "l2-channel",
                                latency_speedup=1.5, example_input=X)
    flops, latency = stage_fractions(by_flops), stage_fractions(by_latency)
    assert latency["layer3"] > flops["layer3"] + 0.05
    assert latency["layer1"] < flops["layer1"]


def test_the_table_is_measured_once_and_cached(timed_as) -> None:
    calls = timed_as(macs)
    model = prunelab.models.create("resnet20")
    prunelab.prune(model, "l2-channel", latency_speedup=1.5, example_input=X)
    first = len(calls)
    assert first > 0
    table = structure_of(model)[-1]["latency"]["table"]
    grids = json.loads(Path(table).read_text())
    assert all(len(g["ms"]) == len(g["cin"]) for k, g in grids.items() if k != OVERHEAD)
    prunelab.prune(prunelab.models.create("resnet20"), "l2-channel", latency_speedup=1.5,
                   example_input=X)
    assert len(calls) == first  # the second model found every shape in the cache
    # Another batch size is another table.
    prunelab.prune(prunelab.models.create("resnet20"), "l2-channel", latency_speedup=1.5,
                   example_input=X[:2])
    assert len(calls) > first


def test_a_repeated_call_prunes_on_to_the_original_target(timed_as) -> None:
    timed_as(macs)
    model = prunelab.models.create("resnet20")
    before = conv_linear_macs(model, X)
    prunelab.prune(model, "l2-channel", latency_speedup=1.5, example_input=X)
    prunelab.prune(model, "l2-channel", latency_speedup=2.5, example_input=X)
    assert before / conv_linear_macs(model, X) == pytest.approx(
        structure_of(model)[-1]["latency"]["predicted_speedup"], rel=1e-3)
    assert structure_of(model)[-1]["latency"]["predicted_speedup"] >= 2.5


def test_real_layer_timings_are_positive_and_grow_with_width(tmp_path) -> None:
    shape = LayerShape("conv", 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), (16, 16))
    table = LatencyTable({"conv": shape}, {"conv": (32, 32)}, batch_size=8,
                         cache_dir=tmp_path, repeats=5)
    grid = next(iter(table.grids.values()))
    assert grid["cin"] == [32, 64] and grid["cout"] == [32, 64]
    assert all(ms > 0 for row in grid["ms"] for ms in row)
    # 4x the multiply-adds takes longer (by a wide margin even on a loaded machine).
    assert grid["ms"][1][1] > grid["ms"][0][0]
    assert table.path.parent == tmp_path and table.path.exists()
    # A call's own cost (a 1x1 Linear) is measured once and taken off every layer's time.
    assert 0 < table.overhead_ms < grid["ms"][1][1]
    assert table.layer_ms("conv", 64, 64) == pytest.approx(grid["ms"][1][1] - table.overhead_ms)


def test_bad_latency_targets_are_refused(timed_as) -> None:
    timed_as(macs)
    with pytest.raises(InvalidValueError, match="needs a channel method"):
        prunelab.prune(prunelab.models.create("resnet20"), "magnitude", latency_speedup=2.0)
    with pytest.raises(InvalidValueError, match="measured on a backend"):
        prunelab.prune(prunelab.models.create("resnet20"), "l2-channel", latency_speedup=2.0,
                       backend="tensorrt", example_input=X)
    with pytest.raises(InvalidValueError, match="ratio >= 1"):
        prunelab.prune(prunelab.models.create("resnet20"), "l2-channel", latency_speedup=0.5,
                       example_input=X)
    with pytest.raises(InvalidValueError, match="give one or the other"):
        prunelab.prune(prunelab.models.create("resnet20"), "l2-channel", latency_speedup=1.5,
                       example_input=X, layer_sparsity={"layer1.*": 0.5})
    with pytest.raises(InvalidValueError, match="out of reach"):
        prunelab.prune(prunelab.models.create("resnet20"), "l2-channel", latency_speedup=50.0,
                       example_input=X)


def test_latency_targets_in_a_sweep(timed_as, tmp_path) -> None:
    from prunelab.bench import ResultStore, SweepSpec, run_sweep
    from prunelab.config import validate

    timed_as(macs)
    base = {"model": "resnet20", "dataset": "digits",
            "train": {"epochs": 1, "batch_size": 64, "lr": 0.05},
            "latency": {"enabled": False, "batch_size": 4}}
    with pytest.raises(Exception, match="magnitude removes no channels"):
        validate(SweepSpec, {**base, "grid": {"methods": ["l2-channel", "magnitude"],
                                              "targets": {"latency_speedup": [2.0]}}})
    spec = validate(SweepSpec, {**base, "grid": {
        "methods": ["l2-channel"], "targets": {"latency_speedup": [1.5]}, "seeds": [0],
        "recoveries": ["none"], "controls": False}})
    summary = run_sweep(spec, tmp_path / "sweep", quiet=True)
    assert (summary.ok, summary.failed) == (1, 0)
    with ResultStore(tmp_path / "sweep" / "results.sqlite") as store:
        row = next(r for r in store.rows() if r["method"] != "dense")
    assert row["target_kind"] == "latency_speedup" and row["target_value"] == 1.5
    assert row["theoretical_speedup"] > 1.3  # channels went (FLOPs are not the target here)


def test_autoslim_priced_by_macs_finds_what_its_macs_search_finds(timed_as) -> None:
    from prunelab import slim

    timed_as(lambda s, cin, cout: 0.0 if s.key == _PROBE.key else macs(s, cin, cout))
    net = slim.convert(prunelab.models.create("resnet20"), width_range=(0.25, 1.0))
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    by_macs = slim.autoslim(net, data, speedup=[1.5, 3.0], step=0.5)
    by_latency = slim.autoslim(net, data, latency_speedup=[1.5, 3.0], step=0.5)
    assert by_latency == by_macs


def test_autoslim_meets_a_latency_budget_as_the_exported_model_is_priced(timed_as) -> None:
    """A depthwise net whose 8x8 layers cost ten times their multiply-adds: the found widths meet
    the budget under that cost, recomputed here from the exported plain model's own layers."""
    from prunelab import slim

    def cost(s: LayerShape, cin: int, cout: int) -> float:
        return 0.0 if s.key == _PROBE.key else \
            macs(s, cin, cout) * (10 if s.input_size == (8, 8) else 1)

    timed_as(cost)
    net = slim.convert(prunelab.models.create("mobilenetv2-cifar"), width_range=(0.5, 1.0))
    data = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))]

    def priced(model: nn.Module) -> float:
        return sum(cost(s, s.in_channels, s.out_channels)
                   for s in layer_shapes(model, X).values())

    full = priced(slim.export(net.eval(), 1.0))
    found = slim.autoslim(net, data, latency_speedup=1.5, step=0.5, example_input=X)
    small = slim.export(net.eval(), found)
    assert full / priced(small) >= 1.5
    assert full / priced(small) != pytest.approx(
        slim.macs(net, 1.0) / slim.macs(net, found), rel=0.02)  # not a MACs budget
    with pytest.raises(InvalidValueError, match="one budget"):
        slim.autoslim(net, data, speedup=1.5, latency_speedup=1.5)
    with pytest.raises(InvalidValueError, match=r"latency_speedup 90 is out of reach.*predicted"):
        slim.autoslim(net, data, latency_speedup=90, example_input=X)


def test_the_autoslim_method_takes_a_latency_target(timed_as) -> None:
    calls = timed_as(lambda s, cin, cout: 0.0 if s.key == _PROBE.key else macs(s, cin, cout))
    model = prunelab.models.create("resnet20")
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(3)]
    before = conv_linear_macs(model, X)
    prunelab.prune(model, "autoslim", latency_speedup=2.0, data=data, supernet_epochs=1,
                   step=0.5, search_batches=1)
    assert before / conv_linear_macs(model, X) >= 2.0  # time is MACs here
    assert calls and {key for key, *_ in calls} - {_PROBE.key}
    [step] = structure_of(model)
    assert step["reference"]["params"] == sum(p.numel() for p in
                                              prunelab.models.create("resnet20").parameters())
    assert step["round_to"] == 1
    # the prediction recorded is the search's own: layer time is MACs here, so it is the
    # layers' MACs ratio, and it meets the budget
    predicted = step["latency"]
    assert predicted["predicted_speedup"] >= 2.0
    assert predicted["predicted_speedup"] == pytest.approx(
        before / conv_linear_macs(model, X), rel=1e-3)
    assert (predicted["backend"], predicted["batch_size"]) == ("torch", 1)  # one input of data


def test_every_channel_method_takes_a_latency_target(timed_as) -> None:
    """Each registered channel method either reaches a latency target or refuses it with a
    prunelab error (never a TypeError from a ``prune`` override missing a keyword)."""
    from prunelab.methods import METHODS
    from prunelab.structured import StructuredMethod

    timed_as(macs)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    reached = []
    for name, cls in METHODS.items():
        if not issubclass(cls, StructuredMethod):
            continue
        model = prunelab.models.create("resnet20")
        try:
            prunelab.prune(model, name, latency_speedup=1.3, example_input=X, data=data)
        except prunelab.errors.PrunelabError:
            continue
        reached.append(name)
        if name == "autoslim":  # searched on its supernet: checked in the AutoSlim tests
            continue
        assert structure_of(model)[-1]["latency"]["predicted_speedup"] >= 1.3, name
    assert {"l2-channel", "l1-filter", "taylor-channel", "autoslim"} <= set(reached)

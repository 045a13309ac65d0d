"""Latency-aware channel targets: a measured per-layer latency table and a plan that spends the
cuts where the time is (NetAdapt, Yang et al. 2018; HALP, Shen et al. 2022).

A FLOPs target removes channels wherever the scores say; the measured speed-up then falls short
(issue 14: 0.62 of the theoretical 3x on ResNet-56), because a layer's time is not proportional
to its FLOPs: small or strided layers cost more per FLOP, and times move in steps of the kernels'
vector width. Here each convolution and Linear layer of the model is timed alone on the
deployment backend, at the batch size of the example input, for a grid of input and output
channel counts (the multiples the layer may keep), less the cost of calling a deployed layer
that computes next to nothing (a call's overhead, which a layer inside a model does not pay).
The table is measured once per machine, backend, precision, batch size and thread count and
cached as JSON. The model's latency is
predicted as the sum of its layers' (the other operations scale with the channels too and are
left out), and a removal plan is built greedily, one channel multiple at a time, taking the step
that loses the least importance per millisecond saved, until the predicted latency reaches the
target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.metrics.latency import call_times
from prunelab.structured.graph import ROOT_TYPES, ChannelGroup
from prunelab.targets import solve_ratio
from prunelab.utils import progress_enabled, write_atomically

Widths = dict[str, tuple[int, int]]  # layer name -> (input channels, output channels)
Plan = dict[str, list[int]]
#: Grid points per channel axis at most (interpolated linearly in between).
MAX_POINTS = 6


@dataclass(frozen=True)
class LayerShape:
    """What a layer's time depends on besides its channel counts (which the grid varies)."""

    kind: str  # "conv", "depthwise" or "linear"
    in_channels: int  # of the original model: the largest the grid measures
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str  # or "same"/"valid"
    dilation: tuple[int, ...]
    input_size: tuple[int, ...]  # the input's dimensions other than batch and channels

    @property
    def key(self) -> str:
        return json.dumps([self.kind, self.in_channels, self.out_channels, self.kernel,
                           self.stride, self.padding, self.dilation, self.input_size])

    def module(self, cin: int, cout: int) -> nn.Module:
        """A fresh layer of this shape with ``cin`` inputs and ``cout`` outputs."""
        if self.kind == "linear":
            return nn.Linear(cin, cout)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(self.kernel)]
        return conv(cin, cout, self.kernel, self.stride, self.padding, self.dilation,
                    groups=cout if self.kind == "depthwise" else 1)

    def points(self, full: int, multiple: int) -> list[int]:
        """Channel counts to time: multiples of ``multiple`` up to ``full`` (and ``full``),
        thinned to at most :data:`MAX_POINTS`."""
        counts = sorted({*range(multiple, full, multiple), full})
        if len(counts) > MAX_POINTS:
            step = (len(counts) - 1) / (MAX_POINTS - 1)
            counts = sorted({counts[round(i * step)] for i in range(MAX_POINTS)})
        return counts


def layer_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, LayerShape]:
    """The shape of every Conv/Linear layer of ``model`` on ``example``. Grouped convolutions
    that are not depthwise are left out: they are not timed, and not in the prediction."""
    found: dict[str, LayerShape] = {}
    names = {m: n for n, m in model.named_modules()}

    def record(module: nn.Module, inputs: tuple, _output) -> None:
        name = names[module]
        cin, cout = _channels(module)
        size = tuple(inputs[0].shape[2:]) if not isinstance(module, nn.Linear) else \
            tuple(inputs[0].shape[1:-1])
        if isinstance(module, nn.Linear):
            found[name] = LayerShape("linear", cin, cout, (), (), (), (), size)
            return
        depthwise = module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            return
        found[name] = LayerShape("depthwise" if depthwise else "conv", cin, cout,
                                 tuple(module.kernel_size), tuple(module.stride),
                                 module.padding if isinstance(module.padding, str) else
                                 tuple(module.padding), tuple(module.dilation), size)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, ROOT_TYPES)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return found


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


class LatencyTable:
    """Measured per-layer latencies of one model's layer shapes on one backend.

    Args:
        shapes: from :func:`layer_shapes`.
        steps: the grid's steps in input and output channels, by layer name (the multiples the
            layer keeps; a step as large as the layer times it at full width only).
        batch_size: the batch the layers are timed at (that of the deployment).
        backend, precision: as :func:`prunelab.deploy` takes them.
        cache_dir: where measured grids are kept (default ``$PRUNELAB_CACHE/latency`` or
            ``~/.cache/prunelab/latency``); one file per machine, backend, precision, batch
            size and thread count.
        repeats: timed calls per grid point (the fastest is kept: interference only adds).
    """

    def __init__(self, shapes: dict[str, LayerShape], steps: dict[str, tuple[int, int]], *,
                 batch_size: int, backend: str = "torch", precision: str = "fp32",
                 cache_dir: str | Path | None = None, repeats: int = 10):
        self.shapes, self.batch_size = shapes, batch_size
        self.backend, self.precision, self.repeats = backend, precision, repeats
        self.path = Path(cache_dir or _default_cache()) / _cache_name(
            backend, precision, batch_size)
        self.grids: dict[str, dict] = _load(self.path)
        self._keys = {name: f"{shape.key}|{list(steps[name])}" for name, shape in shapes.items()}
        missing = {self._keys[name]: (shape, steps[name]) for name, shape in shapes.items()
                   if self._keys[name] not in self.grids}
        with _bar(f"latency table ({backend}, batch {batch_size})", len(missing)) as advance:
            for key, (shape, step) in missing.items():
                self.grids[key] = self._measure(shape, step)
                advance()
        if OVERHEAD not in self.grids:
            self.grids[OVERHEAD] = {"ms": self._time(_PROBE, 1, 1)}
            missing[OVERHEAD] = (_PROBE, (1, 1))
        self.overhead_ms = self.grids[OVERHEAD]["ms"]
        if missing:
            _save(self.path, self.grids)

    def _measure(self, shape: LayerShape, step: tuple[int, int]) -> dict:
        cins = [shape.in_channels] if shape.kind == "depthwise" else \
            shape.points(shape.in_channels, step[0])
        couts = shape.points(shape.out_channels, step[1])
        grid = [[self._time(shape, c if shape.kind == "depthwise" else cin, c) for c in couts]
                for cin in cins]
        return {"cin": cins, "cout": couts, "ms": grid}

    def _time(self, shape: LayerShape, cin: int, cout: int) -> float:
        from prunelab.deploy import deploy

        layer = shape.module(cin, cout).eval()
        x = torch.randn(self.batch_size, *shape.input_size, cin) if shape.kind == "linear" else \
            torch.randn(self.batch_size, cin, *shape.input_size)
        with tempfile.TemporaryDirectory(prefix="prunelab-latency-") as folder:
            kept = {"onnx_path": Path(folder) / "layer.onnx"} if self.backend == "onnxruntime" \
                else {}  # loaded, then removed
            served = deploy(layer, x, backend=self.backend, precision=self.precision,
                            sparse=False, repeats=3, threads=torch.get_num_threads(), **kept)
        times = call_times(lambda: served(x), warmup=3, repeats=self.repeats)
        return min(times)  # other processes only ever add time: the fastest call is the layer's

    def layer_ms(self, name: str, cin: int, cout: int) -> float:
        """The interpolated time of layer ``name`` with ``cin`` inputs and ``cout`` outputs."""
        grid = self.grids[self._keys[name]]
        if self.shapes[name].kind == "depthwise":
            ms = _interpolate(grid["cout"], grid["ms"][0], cout)
        else:
            rows = [_interpolate(grid["cout"], row, cout) for row in grid["ms"]]
            ms = _interpolate(grid["cin"], rows, cin)
        return max(ms - self.overhead_ms, 0.0)

    def predict(self, widths: Widths) -> float:
        """Predicted milliseconds of the timed layers at ``widths``."""
        return sum(self.layer_ms(name, *widths[name]) for name in self.shapes)


#: The table's entry for the time of calling a deployed layer that computes next to nothing
#: (a 1x1 Linear): the backend's per-call cost, which a layer inside a whole model does not pay,
#: taken off every layer's time.
OVERHEAD = "per-call overhead"
_PROBE = LayerShape("linear", 1, 1, (), (), (), (), ())


@contextlib.contextmanager
def _bar(description: str, total: int) -> Iterator[Callable[[], None]]:
    """A progress bar over ``total`` layer shapes on an interactive terminal (else nothing);
    yields the function that advances it."""
    if not total or not progress_enabled():
        yield lambda: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} layer shapes"), TimeElapsedColumn(),
                  transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)


def _interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear through ``(xs, ys)``; below the first point, in proportion to it."""
    if x <= xs[0]:
        return ys[0] * x / xs[0]
    if x >= xs[-1]:
        return ys[-1] * x / xs[-1]
    i = bisect_left(xs, x)
    if xs[i] == x:
        return ys[i]
    t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + t * (ys[i] - ys[i - 1])


def _default_cache() -> Path:
    root = os.environ.get("PRUNELAB_CACHE") or Path.home() / ".cache" / "prunelab"
    return Path(root) / "latency"


def _cache_name(backend: str, precision: str, batch_size: int) -> str:
    """One file per machine (CPU model, torch build), backend, precision, batch and threads."""
    machine = "|".join([platform.machine(), _cpu_model(), torch.__version__,
                        torch.backends.cpu.get_cpu_capability()])
    digest = hashlib.sha256(machine.encode()).hexdigest()[:12]
    return f"{backend}-{precision}-b{batch_size}-t{torch.get_num_threads()}-{digest}.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save(path: Path, grids: dict) -> None:
    """Write the table whole (a temporary file renamed), so a killed run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(grids))


def check_backend(backend: str, precision: str, what: str) -> None:
    """Refuse a ``what`` (a latency target or budget) on an unknown backend or precision, or on
    a backend whose package is not installed, before anything is timed."""
    from prunelab.deploy import BACKENDS, PRECISIONS, require_backend

    if backend not in BACKENDS or precision not in PRECISIONS:
        raise InvalidValueError(
            f"{what} is measured on a backend ({', '.join(BACKENDS)}) in a precision "
            f"({', '.join(PRECISIONS)}); got {backend!r}, {precision!r}")
    require_backend(backend)


class LatencyTarget:
    """A latency speed-up target of one structured ``prune`` call: the model's timed layers,
    which of them each channel group shrinks, and the table of their measured times."""

    def __init__(self, model: nn.Module, example: torch.Tensor, groups: list[ChannelGroup],
                 blocks: list[int], multiples: list[int], done: dict[str, int], backend: str,
                 precision: str, cache_dir: str | Path | None = None):
        check_backend(backend, precision, "a latency target")
        self.groups, self.blocks = groups, blocks
        self.steps = [b if b > 1 else m for b, m in zip(blocks, multiples, strict=True)]
        now = layer_shapes(model, example)
        self.layers = group_layers(groups, set(now))
        self.widths = {name: (s.in_channels, s.out_channels) for name, s in now.items()}
        self.original = widths_after(self.widths, self.layers,
                                     [-done.get(g.root, 0) for g in groups])
        shapes = {name: replace(s, in_channels=self.original[name][0],
                                out_channels=self.original[name][1]) for name, s in now.items()}
        steps = {name: (s.in_channels, s.out_channels) for name, s in shapes.items()}
        for group, step in zip(self.layers, self.steps, strict=True):
            for name in group.produces:
                steps[name] = (steps[name][0], min(steps[name][1], step))
            for name in group.reads:
                steps[name] = (min(steps[name][0], step), steps[name][1])
        self.table = LatencyTable(shapes, steps, batch_size=int(example.shape[0]),
                                  backend=backend, precision=precision, cache_dir=cache_dir)
        self.reference_ms = self.table.predict(self.original)

    def greedy(self, units: list[torch.Tensor], speedup: float) -> list[int]:
        """Channels each group loses to reach ``speedup`` (see :func:`greedy_plan`)."""
        return greedy_plan(units, self.blocks, self.steps, [g.size for g in self.groups],
                           self.layers, self.widths, self.table, self.reference_ms / speedup)

    def predicted_ms(self, plan: Plan) -> float:
        """Predicted time of the timed layers after ``plan``'s removals."""
        removed = [len(plan.get(g.root, [])) for g in self.groups]
        return self.table.predict(widths_after(self.widths, self.layers, removed))

    def solve_ratio(self, plan_for: Callable[[float], Plan], speedup: float) -> float:
        """The per-layer channel ratio whose plan reaches ``speedup`` (scope ``layer``)."""
        return solve_ratio(lambda r: self.reference_ms / self.predicted_ms(plan_for(r)),
                           speedup, "latency")

    def record(self, plan: Plan) -> dict:
        """What the structure history keeps about this target."""
        predicted = self.predicted_ms(plan)
        return {"backend": self.table.backend, "precision": self.table.precision,
                "batch_size": self.table.batch_size,
                "predicted_ms_original": round(self.reference_ms, 4),
                "predicted_ms": round(predicted, 4),
                "predicted_speedup": round(self.reference_ms / predicted, 4),
                "table": str(self.table.path)}


@dataclass
class GroupLayers:
    """The timed layers whose output (``produces``) or input (``reads``) channels a group is."""

    produces: list[str]
    reads: list[str]


def group_layers(groups: list[ChannelGroup], timed: set[str]) -> list[GroupLayers]:
    return [GroupLayers([m.name for m in g.producers if m.name in timed],
                        [m.name for m in g.readers if m.name in timed and
                         m.name not in {p.name for p in g.producers}]) for g in groups]


def widths_after(widths: Widths, layers: list[GroupLayers], removed: list[int]) -> Widths:
    """Layer widths once group ``i`` lost ``removed[i]`` more channels."""
    out = dict(widths)
    for group, count in zip(layers, removed, strict=True):
        if not count:
            continue
        for name in group.produces:
            cin, cout = out[name]
            out[name] = (cin, cout - count)
        for name in group.reads:
            cin, cout = out[name]
            out[name] = (cin - count, cout)
    return out


def greedy_plan(units: list[torch.Tensor], blocks: list[int], steps: list[int],
                sizes: list[int], layers: list[GroupLayers], widths: Widths,
                table: LatencyTable, goal_ms: float) -> list[int]:
    """How many channels each group loses: steps of one multiple (or head), the cheapest
    importance per millisecond saved first, until the predicted latency is at most ``goal_ms``.

    ``units`` are each group's scores per removable unit (a channel, or a head's mean), already
    normalised so they compare across groups; a group keeps at least one step.
    """
    removed = [0] * len(units)
    ordered = [u.sort().values.tolist() for u in units]
    now = table.predict(widths)

    def next_kept(i: int) -> int:
        kept = sizes[i] - removed[i]
        return (kept - 1) // steps[i] * steps[i]

    while now > goal_ms:
        best, best_value, best_ms = None, float("inf"), now
        for i in range(len(units)):
            kept = next_kept(i)
            if kept < max(steps[i], 1):
                continue
            trial = list(removed)
            trial[i] = sizes[i] - kept
            ms = table.predict(widths_after(widths, layers, trial))
            saved = now - ms
            if saved <= 0:
                continue
            lost = sum(ordered[i][removed[i] // blocks[i]: trial[i] // blocks[i]])
            value = max(lost, 0.0) / saved
            if value < best_value:
                best, best_value, best_ms = i, value, ms
        if best is None:
            raise InvalidValueError(
                f"the latency target is out of reach: removing every channel step this method "
                f"can take predicts {now:.3g} ms against {goal_ms:.3g} ms wanted. Ask for less, "
                "or prune more layers")
        removed[best] = sizes[best] - next_kept(best)
        now = best_ms
    return removed

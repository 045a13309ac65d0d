"""Measured vs theoretical speed-up of channel pruning on CPU (batch 1 and batch 64).

ResNet-56, VGG-16 and MobileNetV2 (CIFAR) pruned with L2-norm channels (every layer the same
share) to 1.5x, 2x and 3x fewer FLOPs, kept channels rounded to a multiple of 16 (AVX-512
convolution kernels work on blocks of 16 output channels); where 16 cannot reach the target
the next ``--round-to`` value (8) is used, and each row says which. All models run in
channels_last; latency is the median of repeated forward passes with all cores' threads, the
models called in turn so that the ratio of two models is taken within one round. A shared VM's
speed drifts by tens of percent over minutes, and not alike for every model, so every
configuration is timed in ``--passes`` passes spread over the whole run; a row gives the
median over passes and the lowest and highest pass. Each speed-up is measured twice: eager
(BatchNorm as its own op) and with BatchNorm folded into the convolution before it, as a model
is deployed (``torch.fx`` fuse, applied to dense and pruned alike). Side by side: the same
model masked (unstructured magnitude pruning) to the same number of non-zero parameters, which
keeps every dense tensor and should get ~1.0x. ``--scope global`` lets the criterion choose the
widths.
Target: measured / theoretical >= 0.8 for ResNet-56 and VGG-16 at batch 64.
"""

from __future__ import annotations

import argparse
import copy
from functools import partial

import torch
from torch.fx.experimental.optimization import fuse

import prunelab
from prunelab.errors import InvalidValueError
from prunelab.metrics import measure
from prunelab.sparsity import make_permanent, sparsity_for_compression

from common import median, report, timed


def interleaved_ms(models: list[torch.nn.Module], x: torch.Tensor, rounds: int,
                   threads: int) -> list[list[float]]:
    """Per-call forward times (ms) of each model over ``rounds`` rounds, one call of each model
    per round: machine drift (a shared VM's neighbours) hits all models alike, and the ratio
    of two models is taken within a round."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: list[list[float]] = [[] for _ in models]
    try:
        with torch.inference_mode():
            for model in models:
                for _ in range(3):
                    model(x)
            for _ in range(rounds):
                for model, out in zip(models, times, strict=True):
                    out.append(timed(partial(model, x)) * 1e3)
    finally:
        torch.set_num_threads(old)
    return times


def pruned_to(dense: torch.nn.Module, speedup: float, scope: str,
              multiples: list[int]) -> tuple[torch.nn.Module, int]:
    """``dense`` pruned to ``speedup`` with the first channel multiple that can reach it."""
    for multiple in multiples:
        try:
            return prunelab.prune(copy.deepcopy(dense), "l2-channel", speedup=speedup,
                                  scope=scope, round_to=multiple), multiple
        except InvalidValueError as exc:
            print(f"round_to={multiple}: {exc}")
    raise SystemExit(f"no --round-to value reaches {speedup}x")


def speedups(times: list[list[float]]) -> list[float]:
    """Median per-round speed-up of every model over the first one."""
    return [median([d / t for d, t in zip(times[0], own, strict=True)]) for own in times[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+",
                        default=["resnet56", "vgg16-cifar", "mobilenetv2-cifar"])
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=20, help="rounds per pass (x3 at batch 1)")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--round-to", type=int, nargs="+", default=[16, 8])
    parser.add_argument("--scope", choices=["layer", "global"], default="layer")
    args = parser.parse_args()
    cases = []
    for name in args.models:
        torch.manual_seed(0)
        dense = prunelab.models.create(name).eval()
        one = torch.zeros(1, 3, 32, 32)
        dense_size = measure(dense, one)
        for speedup in args.speedups:
            pruned, multiple = pruned_to(dense, speedup, args.scope, args.round_to)
            size = measure(pruned, one)
            masked = copy.deepcopy(dense)
            prunelab.prune(masked, "magnitude", sparsity_for_compression(
                masked, dense_size.params / size.params))
            models = [m.to(memory_format=torch.channels_last) for m in
                      (dense, pruned, make_permanent(masked), fuse(dense), fuse(pruned))]
            for batch in args.batches:
                cases.append({"model": name, "target": speedup, "round_to": multiple,
                              "batch": batch, "theoretical": dense_size.flops / size.flops,
                              "params_kept": size.params / dense_size.params,
                              "models": models, "passes": []})
    for number in range(args.passes):
        for case in cases:
            batch = case["batch"]
            x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            rounds = max(10, args.repeats * (3 if batch == 1 else 1))
            times = interleaved_ms(case["models"], x, rounds, args.threads)
            measured, masked_x = speedups(times[:3])  # eager: dense, pruned, masked
            (folded,) = speedups(times[3:])  # BatchNorm folded: dense, pruned
            case["passes"].append({"measured": measured, "folded": folded, "masked": masked_x,
                                   "dense_ms": median(times[0]), "pruned_ms": median(times[1])})
        print(f"pass {number + 1}/{args.passes} done", flush=True)
    rows = [summary(case) for case in cases]
    report("structured_speedup", "Channel pruning: measured vs theoretical speed-up (CPU)",
           rows, {"threads": args.threads, "round_to": args.round_to, "passes": args.passes,
                  "method": f"l2-channel, {args.scope} scope", "layout": "channels_last"})


def summary(case: dict) -> dict:
    """A case's row: medians over its passes, and the range of the speed-up ratios."""
    theoretical = case["theoretical"]

    def over(key: str) -> list[float]:
        return [one[key] for one in case["passes"]]

    row = {k: case[k] for k in ("model", "target", "round_to", "batch", "theoretical")}
    for key, label in (("measured", "ratio"), ("folded", "ratio_folded")):
        ratios = [v / theoretical for v in over(key)]
        row[label] = median(ratios)
        row[f"{label}_range"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
    return row | {
        "measured": median(over("measured")), "measured_folded": median(over("folded")),
        "masked_same_params": median(over("masked")),
        "dense_ms": median(over("dense_ms")), "pruned_ms": median(over("pruned_ms")),
        "params_kept": case["params_kept"],
    }


if __name__ == "__main__":
    main()

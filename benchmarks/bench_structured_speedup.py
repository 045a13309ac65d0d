"""Measured vs theoretical speed-up of channel pruning on CPU (batch 1 and batch 64).

ResNet-56, VGG-16 and MobileNetV2 (CIFAR) pruned with L2-norm channels (every layer the same
share, kept channels rounded to a multiple of 8, which CPU convolution kernels favour) to 1.5x,
2x and 3x fewer FLOPs; all models run in channels_last; latency is the median of repeated
forward passes with all cores' threads, dense, pruned and masked called in turn so that the
ratio of two models is taken within one round. Side by side: the same model masked
(unstructured magnitude pruning) to the same number of non-zero parameters, which keeps every
dense tensor and should get ~1.0x. ``--scope global`` lets the criterion choose the widths.
Target: measured / theoretical >= 0.8 for ResNet-56 and VGG-16 at batch 64.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import prunelab
from prunelab.metrics import measure
from prunelab.sparsity import make_permanent, sparsity_for_compression

from common import median, report


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
                    start = time.perf_counter()
                    model(x)
                    out.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(old)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+",
                        default=["resnet56", "vgg16-cifar", "mobilenetv2-cifar"])
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--scope", choices=["layer", "global"], default="layer")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        dense = prunelab.models.create(name).eval()
        one = torch.zeros(1, 3, 32, 32)
        dense_size = measure(dense, one)
        for speedup in args.speedups:
            pruned = prunelab.prune(copy.deepcopy(dense), "l2-channel", speedup=speedup,
                                    scope=args.scope, round_to=args.round_to)
            size = measure(pruned, one)
            masked = copy.deepcopy(dense)
            prunelab.prune(masked, "magnitude", sparsity_for_compression(
                masked, dense_size.params / size.params))
            fast = [m.to(memory_format=torch.channels_last)
                    for m in (dense, pruned, make_permanent(masked))]
            for batch in args.batches:
                x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
                rounds = max(10, args.repeats * (3 if batch == 1 else 1))
                dense_t, pruned_t, masked_t = interleaved_ms(fast, x, rounds, args.threads)
                ms = {"dense": median(dense_t), "pruned": median(pruned_t)}
                theoretical = dense_size.flops / size.flops
                measured = median([d / p for d, p in zip(dense_t, pruned_t, strict=True)])
                rows.append({
                    "model": name, "target": speedup, "batch": batch,
                    "theoretical": theoretical,
                    "measured": measured,
                    "ratio": measured / theoretical,
                    "masked_same_params": median([d / m for d, m in zip(dense_t, masked_t,
                                                                        strict=True)]),
                    "dense_ms": ms["dense"], "pruned_ms": ms["pruned"],
                    "params_kept": size.params / dense_size.params,
                })
                print(rows[-1], flush=True)
    report("structured_speedup", "Channel pruning: measured vs theoretical speed-up (CPU)",
           rows, {"threads": args.threads, "round_to": args.round_to,
                  "method": f"l2-channel, {args.scope} scope", "layout": "channels_last"})


if __name__ == "__main__":
    main()

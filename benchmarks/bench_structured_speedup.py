"""Measured vs theoretical speed-up of channel pruning on CPU (batch 1 and batch 64).

ResNet-56, VGG-16 and MobileNetV2 (CIFAR) pruned with L2-norm channels (every layer the same
share, kept channels rounded to a multiple of 8, which CPU convolution kernels favour) to 1.5x,
2x and 3x fewer FLOPs; all models run in channels_last; latency is the median of repeated
forward passes with all cores' threads, dense and pruned alternating. Side by side: the same
model masked (unstructured magnitude pruning) to the same number of non-zero parameters, which
keeps every dense tensor and should get ~1.0x. Target: measured / theoretical >= 0.8 for
ResNet-56 and VGG-16 at batch 64.
"""

from __future__ import annotations

import argparse
import copy

import torch

import prunelab
from prunelab.metrics import measure, measure_latency
from prunelab.sparsity import sparsity_for_compression

from common import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+",
                        default=["resnet56", "vgg16-cifar", "mobilenetv2-cifar"])
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--round-to", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        dense = prunelab.models.create(name).eval()
        one = torch.zeros(1, 3, 32, 32)
        dense_size = measure(dense, one)
        for speedup in args.speedups:
            pruned = prunelab.prune(copy.deepcopy(dense), "l2-channel", speedup=speedup,
                                    scope="layer", round_to=args.round_to)
            size = measure(pruned, one)
            masked = copy.deepcopy(dense)
            prunelab.prune(masked, "magnitude", sparsity_for_compression(
                masked, dense_size.params / size.params))
            fast = [m.to(memory_format=torch.channels_last) for m in (dense, pruned, masked)]
            for batch in args.batches:
                x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
                repeats = max(5, args.repeats // (4 if batch > 1 else 1))
                timings = {k: [] for k in ("dense", "pruned", "masked")}
                for _ in range(3):  # alternate, so drift hits all three alike
                    for key, model in zip(("dense", "pruned", "masked"), fast, strict=True):
                        timings[key].append(measure_latency(
                            model, x, repeats=repeats, warmup=2, threads=args.threads).median_ms)
                ms = {k: sorted(v)[1] for k, v in timings.items()}
                theoretical = dense_size.flops / size.flops
                rows.append({
                    "model": name, "target": speedup, "batch": batch,
                    "theoretical": theoretical,
                    "measured": ms["dense"] / ms["pruned"],
                    "ratio": ms["dense"] / ms["pruned"] / theoretical,
                    "masked_same_params": ms["dense"] / ms["masked"],
                    "dense_ms": ms["dense"], "pruned_ms": ms["pruned"],
                    "params_kept": size.params / dense_size.params,
                })
                print(rows[-1], flush=True)
    report("structured_speedup", "Channel pruning: measured vs theoretical speed-up (CPU)",
           rows, {"threads": args.threads, "round_to": args.round_to,
                  "method": "l2-channel, layer scope", "layout": "channels_last"})


if __name__ == "__main__":
    main()

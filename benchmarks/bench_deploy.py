"""Deployment: what `prunelab.deploy` buys, measured side by side in one process.

1. Density crossover of a CSR Linear: dense ``F.linear`` vs :class:`SparseLinear` for square
   layers at several batch sizes and densities (random masks), median of repeated calls.
2. End to end: LeNet-300-100 at 98% (global magnitude) and ResNet-56 channel-pruned to 2x FLOPs
   (l2-channel), each deployed with the torch, onnxruntime and (when installed) openvino fp32 and
   bf16 backends, against the *dense* model deployed the same way; dense and pruned are timed
   alternately, round by round. onnxruntime and OpenVINO use their own thread pools (all cores).
3. ``--mlp``: transformer MLP blocks (Linear, GELU, Linear) of GPT-2 small (768 -> 3072 -> 768)
   and GPT-2 medium (1024 -> 4096 -> 1024), each layer magnitude-pruned to 90%, at 1, 16 and 64
   tokens, deployed and timed as in 2. (JSON: ``results/deploy_mlp.json``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util

import torch
from torch import nn

import prunelab
from prunelab.deploy import SparseLinear, deploy
from prunelab.metrics import measure

from common import median, report, timed


def median_ms(fn: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        return median([timed(lambda: fn(x)) for _ in range(repeats)]) * 1e3


def crossover(sizes: list[int], batches: list[int], densities: list[float], repeats: int
              ) -> list[dict]:
    rows = []
    for size in sizes:
        for batch in batches:
            x = torch.randn(batch, size)
            for density in densities:
                layer = nn.Linear(size, size)
                with torch.no_grad():
                    layer.weight.mul_(torch.rand_like(layer.weight) < density)
                sparse = SparseLinear(layer)
                dense_ms, csr_ms = (median_ms(f, x, repeats) for f in (layer, sparse))
                rows.append({"layer": f"{size}x{size}", "batch": batch, "density": density,
                             "dense_ms": dense_ms, "csr_ms": csr_ms,
                             "csr_speedup": dense_ms / csr_ms})
    return rows


BACKENDS = [("torch", "fp32"), ("onnxruntime", "fp32")] + (
    [("openvino", "fp32"), ("openvino", "bf16")] if importlib.util.find_spec("openvino") else [])


def end_to_end(name: str, dense: nn.Module, pruned: nn.Module, x: torch.Tensor, rounds: int,
               theoretical: float) -> list[dict]:
    rows = []
    for backend, precision in BACKENDS:
        a = deploy(dense, x, backend=backend, precision=precision, sparse=False)
        b = deploy(pruned, x, backend=backend, precision=precision)
        with torch.inference_mode():
            pairs = [(timed(lambda f=a: f(x)), timed(lambda f=b: f(x))) for _ in range(rounds)]
        speedup = median([d / p for d, p in pairs])
        rows.append({"model": name, "batch": x.shape[0], "backend": f"{backend} {precision}",
                     "dense_ms": median([d for d, _ in pairs]) * 1e3,
                     "pruned_ms": median([p for _, p in pairs]) * 1e3,
                     "measured_speedup": speedup, "theoretical_speedup": theoretical,
                     "measured/theoretical": speedup / theoretical,
                     "choices": "; ".join(s for s in b.steps if "density" in s or "layout" in s)})
    return rows


def mlp_blocks(rounds: int) -> list[dict]:
    rows = []
    for name, width in [("gpt2-small mlp", 768), ("gpt2-medium mlp", 1024)]:
        dense = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                              nn.Linear(4 * width, width)).eval()
        pruned = prunelab.prune(copy.deepcopy(dense), "magnitude", sparsity=0.9, scope="layer")
        for tokens in (64, 16, 1):
            x = torch.randn(tokens, width)
            theory = measure(pruned, x).theoretical_speedup
            rows += end_to_end(f"{name} 90%", dense, pruned, x, rounds, theory)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: robust to other processes on the machine)")
    parser.add_argument("--resnet-only", action="store_true",
                        help="only the ResNet-56 end-to-end rows (no crossover, no LeNet)")
    parser.add_argument("--mlp", action="store_true",
                        help="only the transformer MLP blocks at 90%% sparsity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.mlp:
        report("deploy_mlp", "Transformer MLP blocks at 90% vs dense, deployed alike",
               mlp_blocks(args.rounds), {"threads": args.threads})
        return
    results = []
    if not args.resnet_only:
        rows = crossover([1024, 4096], [1, 16, 64], [0.01, 0.05, 0.1, 0.2, 0.3, 0.5],
                         args.repeats)
        report("deploy_crossover", "CSR vs dense Linear (ms, median)", rows,
               {"threads": args.threads})
        lenet = prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28)).eval()
        sparse_lenet = prunelab.prune(copy.deepcopy(lenet), "magnitude", sparsity=0.98)
        for batch in (64, 1):
            x = torch.randn(batch, 1, 28, 28)
            theory = measure(sparse_lenet, x).theoretical_speedup
            results += end_to_end("lenet-300-100 98%", lenet, sparse_lenet, x, args.rounds,
                                  theory)
    resnet = prunelab.models.create("resnet56").eval()
    pruned = prunelab.prune(copy.deepcopy(resnet), "l2-channel", speedup=2.0)
    for batch in (64, 1):
        x = torch.randn(batch, 3, 32, 32)
        theory = measure(resnet, x).flops / measure(pruned, x).flops
        results += end_to_end("resnet56 l2-channel 2x", resnet, pruned, x, args.rounds, theory)
    report("deploy_end_to_end_resnet" if args.resnet_only else "deploy_end_to_end",
           "Deployed pruned vs deployed dense (same backend)", results,
           {"threads": args.threads})


if __name__ == "__main__":
    main()

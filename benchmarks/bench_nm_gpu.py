"""2:4 sparsity on a GPU: what NVIDIA's sparse tensor cores give a transformer's MLP.

1. Layer level: ``F.linear`` with a dense weight against the same weight pruned to 2:4 and
   compressed by :func:`torch.sparse.to_sparse_semi_structured`, served by cuSPARSELt (torch's
   default where installed) and by CUTLASS, in bf16 and fp16, for the MLP shapes of GPT-2 small
   (768 -> 3072 -> 768) and LLaMA-7B (4096 -> 11008 -> 4096) at several token counts.
   Each is timed twice: as called from Python, and replayed from a CUDA graph (the GPU's time
   alone: cuSPARSELt sets up a matmul plan on the host at every call, which small layers feel).
2. End to end: a two-layer MLP block pruned with ``prunelab.prune(..., nm="2:4")`` and served by
   ``prunelab.deploy.deploy(..., precision="bf16")`` (which measures each layer and keeps the 2:4
   kernel only where it is faster) against the dense block deployed the same way; the two are
   timed alternately, round by round.

Each time is the median over rounds of the mean of a burst of calls, with the GPU synchronised
around each burst. Needs a CUDA GPU with sparse tensor cores (Ampere or later); on a machine
without one it says so and saves nothing.

    python benchmarks/bench_nm_gpu.py            # prints tables, saves results/nm_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

import prunelab
from prunelab.deploy import deploy
from prunelab.sparsity.nm import nm_keep_mask

from common import median, report

#: (name, hidden width, MLP width)
MLPS = [("gpt2-small", 768, 3072), ("llama-7b", 4096, 11008)]


def per_call_ms(fn: Callable[[], object], rounds: int, burst: int) -> float:
    """Median over ``rounds`` of the mean time of ``burst`` back-to-back calls, in ms."""
    with torch.inference_mode():
        for _ in range(3):
            fn()
        times = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(burst):
                fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / burst)
    return median(times) * 1e3


def graph_ms(fn: Callable[[], object], rounds: int, burst: int) -> float:
    """:func:`per_call_ms` of ``fn`` captured once in a CUDA graph and replayed: the GPU's time
    without the host's per-call work (cuSPARSELt sets up its matmul plan on every call)."""
    with torch.inference_mode():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return per_call_ms(graph.replay, rounds, burst)


def compressed(weight: torch.Tensor, cutlass: bool) -> torch.Tensor:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        return to_sparse_semi_structured(weight)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False


def layers(tokens: list[int], rounds: int, burst: int, refused: dict[str, str]) -> list[dict]:
    """Dense vs 2:4 per kernel; a kernel this GPU or torch build cannot run goes to ``refused``."""
    rows = []
    for name, width, hidden in MLPS:
        for shape in [(hidden, width), (width, hidden)]:
            for dtype in (torch.bfloat16, torch.float16):
                weight = torch.randn(shape, device="cuda", dtype=dtype)
                weight = weight * nm_keep_mask(weight.abs(), 2, 4, dim=1)  # prunelab's 2:4
                probe = torch.randn(64, shape[1], device="cuda", dtype=dtype)
                kernels = {}
                for kernel, cutlass in [("cusparselt", False), ("cutlass", True)]:
                    try:
                        kernels[kernel] = compressed(weight, cutlass)
                        F.linear(probe, kernels[kernel])
                    except (RuntimeError, ValueError) as exc:
                        kernels.pop(kernel, None)
                        refused[kernel] = str(exc).splitlines()[0]
                for count in tokens:
                    x = torch.randn(count, shape[1], device="cuda", dtype=dtype)
                    row = {"mlp": name, "weight": f"{shape[0]}x{shape[1]}",
                           "dtype": str(dtype).removeprefix("torch."), "tokens": count}
                    for timing, timer in [("", per_call_ms), ("graph_", graph_ms)]:
                        dense = timer(lambda x=x, w=weight: F.linear(x, w), rounds, burst)
                        row[f"{timing}dense_ms"] = dense
                        for kernel, sparse in kernels.items():
                            try:
                                ms = timer(lambda x=x, w=sparse: F.linear(x, w), rounds, burst)
                            except RuntimeError as exc:  # e.g. not capturable in a graph
                                refused[f"{timing}{kernel}"] = str(exc).splitlines()[0]
                                continue
                            row[f"{timing}{kernel}_ms"] = ms
                            row[f"{timing}{kernel}_speedup"] = dense / ms
                    rows.append(row)
    return rows


def blocks(tokens: list[int], rounds: int, burst: int) -> list[dict]:
    rows = []
    for name, width, hidden in MLPS:
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        pruned = prunelab.prune(copy.deepcopy(dense), "magnitude", 0.5, nm="2:4")
        dense, pruned = dense.cuda(), pruned.cuda()
        for count in tokens:
            x = torch.randn(count, width, device="cuda")
            a = deploy(dense, x, precision="bf16", sparse=False, repeats=10)
            b = deploy(pruned, x, precision="bf16", repeats=10)
            chosen = sum("2:4 (density" in s for s in b.steps)
            print(f"{name}, {count} tokens:", *(s for s in b.steps if "density" in s),
                  sep="\n  ")
            times: dict[str, list[float]] = {"dense": [], "2:4": []}
            for _ in range(rounds):  # alternate, so drifting clocks hit both alike
                times["dense"].append(per_call_ms(lambda a=a, x=x: a(x), 1, burst))
                times["2:4"].append(per_call_ms(lambda b=b, x=x: b(x), 1, burst))
            dense_ms, sparse_ms = median(times["dense"]), median(times["2:4"])
            rows.append({"mlp": name, "tokens": count, "dense_ms": dense_ms,
                         "two_four_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                         "layers_on_2:4": f"{chosen}/2", "max_abs_error": b.max_abs_error})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 2048, 8192, 32768])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--parts", nargs="+", choices=["layers", "blocks"],
                        default=["layers", "blocks"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU here (2:4 sparse kernels need NVIDIA Ampere or later); "
              "nothing saved")
        return
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, cuSPARSELt available: "
          f"{torch.backends.cusparselt.is_available()}")
    if "blocks" in args.parts:
        report("nm_gpu_blocks", f"2:4 MLP block via deploy (bf16), {device}",
               blocks(args.tokens, args.rounds, args.burst),
               {"device": device, "torch": torch.__version__})
    if "layers" in args.parts:
        refused: dict[str, str] = {}
        layer_rows = layers(args.tokens, args.rounds, args.burst, refused)
        for kernel, why in refused.items():
            print(f"{kernel} refused on this GPU: {why}")
        report("nm_gpu", f"2:4 Linear layers vs dense, {device}", layer_rows,
               {"device": device, "torch": torch.__version__, "rounds": args.rounds,
                "burst": args.burst, "refused": refused})

if __name__ == "__main__":
    main()

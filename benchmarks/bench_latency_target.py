"""Latency-aware channel targets against FLOPs targets, measured on the deployment backend.

For each model, backend and batch size: prune copies of the dense model with ``l2-channel`` (its
default rounding) to a FLOPs speed-up (``speedup=``) and to a latency speed-up
(``latency_speedup=``, predicted from a per-layer table measured on the backend at that batch
size), deploy the dense and each pruned model on the backend, and time dense and pruned
alternately, round by round. Reported: the theoretical (FLOPs) speed-up, the predicted one, the
measured one, measured/theoretical and measured/target, and the time pruning took (the latency
table's measurement included, unless it came from the cache).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import tempfile
import time

import torch

import prunelab
from prunelab.deploy import deploy
from prunelab.metrics import measure
from prunelab.structured.graph import structure_of

from common import median, report, timed


def alternate(dense, pruned, x: torch.Tensor, rounds: int) -> tuple[float, float, float]:
    """Median dense ms, pruned ms and speed-up over rounds timed alternately."""
    with torch.inference_mode():
        for _ in range(3):
            dense(x), pruned(x)
        pairs = [(timed(lambda: dense(x)), timed(lambda: pruned(x))) for _ in range(rounds)]
    return (median([d for d, _ in pairs]) * 1e3, median([p for _, p in pairs]) * 1e3,
            median([d / p for d, p in pairs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet56"])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--backends", nargs="+", default=["torch"] + (
        ["openvino"] if importlib.util.find_spec("openvino") else []))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of every backend, for the table and the timings (1: "
                             "robust to other processes on the machine)")
    parser.add_argument("--cache", default=None,
                        help="latency table cache (default: a fresh temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = args.cache or tempfile.mkdtemp(prefix="prunelab-latency-")
    os.environ["PRUNELAB_CACHE"] = cache
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        dense = prunelab.models.create(name).eval()
        for backend in args.backends:
            for batch in args.batches:
                x = torch.randn(batch, *dense.input_shape)
                served_dense = deploy(dense, x, backend=backend, sparse=False,
                                      threads=args.threads)
                for target in args.targets:
                    for kind in ("speedup", "latency_speedup"):
                        options = {"backend": backend} if kind == "latency_speedup" else {}
                        start = time.perf_counter()
                        try:
                            pruned = prunelab.prune(copy.deepcopy(dense), "l2-channel",
                                                    example_input=x, **{kind: target},
                                                    **options)
                        except prunelab.errors.InvalidValueError as exc:
                            rows.append({"model": name, "backend": backend, "batch": batch,
                                         "target": f"{kind} {target:g}", "error": str(exc)})
                            print(rows[-1], flush=True)
                            continue
                        prune_s = time.perf_counter() - start
                        theory = measure(dense, x[:1]).flops / measure(pruned, x[:1]).flops
                        predicted = structure_of(pruned)[-1].get("latency", {}).get(
                            "predicted_speedup")
                        served = deploy(pruned, x, backend=backend, threads=args.threads)
                        dense_ms, pruned_ms, speedup = alternate(served_dense, served, x,
                                                                 args.rounds)
                        rows.append({"model": name, "backend": backend, "batch": batch,
                                     "target": f"{kind} {target:g}",
                                     "theoretical_speedup": theory,
                                     "predicted_speedup": predicted,
                                     "dense_ms": dense_ms, "pruned_ms": pruned_ms,
                                     "measured_speedup": speedup,
                                     "measured/theoretical": speedup / theory,
                                     "measured/target": speedup / target,
                                     "prune_s": prune_s})
                        print(rows[-1], flush=True)
    report("latency_target", "FLOPs vs latency-aware targets (l2-channel), deployed, "
           "dense and pruned timed alternately", rows,
           {"threads": args.threads, "rounds": args.rounds})


if __name__ == "__main__":
    main()

"""Scratch-E with and without the official code's re-initialisation of surviving weights.

Liu et al.'s code draws a masked layer's fresh weights with the std of its *surviving* fan
(``n = mask.sum() / in_channels``); prunelab's ``rescale_init`` does the same by scaling the
model's own initialisation by 1/sqrt(density). This runs LeNet-300-100 on the embedded digits
data, magnitude pruning at 90% and 98%, Scratch-E with ``rescale_init`` on and off, 3 seeds, and
prints the test top-1 (mean ± std).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from prunelab.bench import SweepSpec, run_sweep
from prunelab.bench.store import ResultStore
from prunelab.config import validate

from common import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    spec = validate(SweepSpec, {
        "name": "scratch-init", "model": "lenet-300-100", "dataset": "digits",
        "train": {"epochs": args.epochs, "batch_size": 32, "lr": 0.05, "schedule": "cosine"},
        "latency": {"enabled": False},
        "grid": {"methods": ["magnitude"], "targets": {"sparsity": [0.9, 0.98]},
                 "seeds": list(range(args.seeds)),
                 "recoveries": [{"kind": "scratch-e", "rescale_init": True},
                                {"kind": "scratch-e", "rescale_init": False}]},
    })
    with tempfile.TemporaryDirectory() as out:
        run_sweep(spec, out, quiet=True)
        with ResultStore(f"{out}/results.sqlite") as store:
            runs = store.rows()
    groups: dict[tuple, list[float]] = {}
    for row in runs:
        if row["method"] == "dense":
            groups.setdefault(("dense", 0.0), []).append(row["test_top1"])  # per seed
            continue
        key = (row["recovery"], row["target_value"])
        groups.setdefault(key, []).append(row["test_top1"])
    rows = [{"recovery": k[0], "sparsity": k[1], "seeds": len(v),
             "test_top1_mean": statistics.mean(v),
             "test_top1_std": statistics.stdev(v) if len(v) > 1 else 0.0}
            for k, v in sorted(groups.items())]
    report("scratch_init", "Scratch-E on LeNet-300-100 (digits): surviving-fan init vs dense init",
           rows, {"epochs": args.epochs})


if __name__ == "__main__":
    main()

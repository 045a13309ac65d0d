"""Harness overhead: a sweep of small runs vs the same runs called directly through the Python API.

Both do the same work in this process with the same thread count (the sweep with ``--jobs 1``
runs inline): train the dense model, then per run prune, fine-tune, evaluate and measure. The
sweep adds spec validation, dense-model caching to disk, the SQLite store and provenance.
Alternating order, several repeats, medians. Target: <= 5% extra wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from prunelab.bench import run_sweep
from prunelab.experiment import Experiment

from common import median, report
from sweep_common import small_sweep


def direct(spec) -> None:
    experiment = Experiment(spec)
    dense = {seed: experiment.train_dense(seed) for seed in spec.grid.seeds}
    for run in spec.runs():
        started = time.perf_counter()
        model, _ = experiment.prune_and_recover(dense[run.seed], run.choice, run.target_kind,
                                                run.target_value, run.seed, run.recovery)
        experiment.row(model, run.seed, time.perf_counter() - started, dense[run.seed])


def through_sweep(spec) -> None:
    with tempfile.TemporaryDirectory() as out:
        run_sweep(spec, out, jobs=1, quiet=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    spec = small_sweep(threads=threads)
    times: dict[str, list[float]] = {"direct": [], "sweep": []}
    for i in range(args.repeats):
        order = [("direct", direct), ("sweep", through_sweep)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            fn(spec)
            times[name].append(time.perf_counter() - started)
    overhead = median(times["sweep"]) / median(times["direct"]) - 1
    rows = [{"how": name, "median_s": median(t), "all_s": [round(x, 2) for x in t]}
            for name, t in times.items()]
    print(f"harness overhead {100 * overhead:+.1f}% (target <= 5%), {len(spec.runs())} runs")
    report("harness_overhead", "Sweep harness vs direct API calls (same runs, same process)",
           rows, {"overhead": overhead, "runs": len(spec.runs()), "threads": threads})


if __name__ == "__main__":
    main()

"""Parallel scaling: the same sweep with --jobs 2 vs --jobs 1 on this machine.

``--jobs 1`` runs inline with all cores' threads; ``--jobs 2`` runs two worker processes with
cores/2 threads each. Each configuration starts from an empty results folder (dense model
included), alternating order over repeats. Target on 2 cores: >= 1.7x.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from prunelab.bench import run_sweep

from common import median, report
from sweep_common import small_sweep


def timed_sweep(spec, jobs: int, executor: str = "local") -> float:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = run_sweep(spec, out, jobs=jobs, executor=executor, quiet=True)
        assert summary.failed == 0, "a run failed"
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=60,
                        help="work per run: enough that process start-up does not dominate")
    args = parser.parse_args()
    spec = small_sweep(seeds=(0, 1), finetune_epochs=args.finetune_epochs)
    times: dict[int, list[float]] = {1: [], 2: []}
    for i in range(args.repeats):
        for jobs in ((1, 2) if i % 2 == 0 else (2, 1)):
            times[jobs].append(timed_sweep(spec, jobs))
    speedup = median(times[1]) / median(times[2])
    rows = [{"jobs": j, "median_s": median(t), "all_s": [round(x, 2) for x in t]}
            for j, t in times.items()]
    print(f"--jobs 2 is {speedup:.2f}x faster than --jobs 1 (target >= 1.7x), "
          f"{len(spec.runs())} runs")
    report("parallel_scaling", "Sweep wall time, --jobs 1 vs --jobs 2", rows,
           {"speedup": speedup, "runs": len(spec.runs())})


if __name__ == "__main__":
    main()

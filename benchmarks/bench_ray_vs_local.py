"""Ray executor vs local executor on the same sweep on this machine (2 jobs each).

Ray is started on this machine by the benchmark (``ray.init``), as a one-node cluster; its
start-up is included, as a user would pay it. Target: within 15% of the local executor.
"""

from __future__ import annotations

import argparse

from bench_parallel_scaling import timed_sweep
from common import median, report
from sweep_common import small_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=60,
                        help="work per run: enough that Ray's start-up does not dominate")
    args = parser.parse_args()
    spec = small_sweep(seeds=(0, 1), threads=1, finetune_epochs=args.finetune_epochs)
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for i in range(args.repeats):
        for executor in (("local", "ray") if i % 2 == 0 else ("ray", "local")):
            times[executor].append(timed_sweep(spec, 2, executor))
    ratio = median(times["ray"]) / median(times["local"])
    rows = [{"executor": e, "median_s": median(t), "all_s": [round(x, 2) for x in t]}
            for e, t in times.items()]
    print(f"ray / local = {ratio:.2f} (target within 15%: 0.85 .. 1.15)")
    report("ray_vs_local", "Sweep wall time, Ray vs local executor (2 jobs)", rows,
           {"ratio": ratio, "runs": len(spec.runs())})


if __name__ == "__main__":
    main()

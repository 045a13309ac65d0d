"""Cost of RigL's mask updates: the same sparse training with and without them.

ResNet-20 on a CIFAR-10 subset, a random ERK mask at ``--sparsity``, trained for ``--epochs``
with the same recipe and seed, once statically and once with RigL updates every ``--delta-t``
steps (until 75% of training). Runs alternate so machine noise hits both alike. Reported: the
training-time ratio (RigL / static, median over repeats) and the time spent inside the updates
(drop, grow, optimiser-state reset) as a fraction of RigL's training time. Target: <= 5%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import prunelab
from prunelab import data as datasets
from prunelab import models
from prunelab.training import TrainRecipe, train
from prunelab.training.dynamic import DynamicSparsity

from common import report


class TimedRigL(DynamicSparsity):
    """RigL that adds up the seconds its updates take."""

    seconds = 0.0

    def update(self, state) -> None:
        start = time.perf_counter()
        super().update(state)
        self.seconds += time.perf_counter() - start


def one(bundle, args, rigl: bool) -> tuple[float, float, int]:
    torch.manual_seed(0)
    model = prunelab.prune(models.create("resnet20"), "random", args.sparsity, scope="erk")
    recipe = TrainRecipe(epochs=args.epochs, batch_size=64, lr=0.1, momentum=0.9,
                         weight_decay=1e-4, schedule="cosine")
    callbacks = [TimedRigL("gradient", interval=args.delta_t)] if rigl else []
    batches = bundle.loader("train", recipe.batch_size, shuffle=True, seed=0)
    result = train(model, batches, recipe, callbacks=callbacks, quiet=True)
    inside = callbacks[0].seconds if rigl else 0.0
    updates = len(callbacks[0].updates) if rigl else 0
    return result.seconds, inside, updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--delta-t", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = datasets.load("cifar10", limit=args.samples)
    static, rigl, inside = [], [], []
    for _ in range(args.repeats):
        static.append(one(bundle, args, rigl=False)[0])
        seconds, spent, updates = one(bundle, args, rigl=True)
        rigl.append(seconds)
        inside.append(spent)
    ratio = statistics.median(rigl) / statistics.median(static)
    share = statistics.median(s / t for s, t in zip(inside, rigl, strict=True))
    rows = [{"training": "static", "median_s": statistics.median(static), "updates": 0},
            {"training": f"rigl (delta_t {args.delta_t})", "median_s": statistics.median(rigl),
             "updates": updates, "seconds_in_updates": statistics.median(inside)}]
    print(f"RigL / static training time: {ratio:.3f}; updates take {100 * share:.2f}% of "
          f"RigL's training time ({updates} updates, "
          f"{1000 * statistics.median(inside) / max(updates, 1):.1f} ms each)")
    report("rigl_overhead", "RigL mask-update overhead, ResNet-20 / CIFAR-10 subset", rows,
           {"ratio": ratio, "update_share": share, "args": vars(args)})


if __name__ == "__main__":
    main()

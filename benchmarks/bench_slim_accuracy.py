"""S-Net vs the same widths trained one by one, and the shared-BatchNorm baseline, on CIFAR-10.

ResNet-20 at widths 0.25, 0.5, 0.75, 1.0 on a subset of the CIFAR-10 JPEG copy, same recipe
and epochs for every variant:
- ``snet``: one slimmable net, switchable BatchNorm, every width's loss each step;
- ``naive``: the same with one BatchNorm shared by all widths (the paper's failing baseline);
- ``individual``: each width exported from an untrained supernet and trained alone;
- ``usnet``: a US-Net (0.25-1.0, sandwich 4, inplace distillation), evaluated at 10 widths with
  and without BatchNorm calibration, and (a diagnostic, not a deployable number) with each test
  batch normalised by its own statistics, which separates a badly trained net from bad
  BatchNorm statistics;
- ``usnet-no-distill``: the same with every width learning from the labels (ablation).
Test top-1 and MACs per width. Small CPU budgets: trends, not the paper's numbers. Run one
variant per call (``--variant``), each writes results/slim_accuracy_<variant>[_<name>].json.
"""

from __future__ import annotations

import argparse
import copy

import torch

import prunelab
from prunelab import slim
from prunelab.metrics import evaluate
from prunelab.training import TrainRecipe, train

from common import report

WIDTHS = [0.25, 0.5, 0.75, 1.0]
US_WIDTHS = [round(0.25 + k / 12, 4) for k in range(10)]  # 0.25, 0.333, ..., 1.0


def test_top1(model, bundle) -> float:
    return evaluate(model, bundle.loader("test", 256), topk=(1,))["top1"]


def top1_batch_statistics(net, w: float, bundle) -> float:
    """Test top-1 at width ``w`` with every BatchNorm using the test batch's own statistics."""
    probe = copy.deepcopy(net).train()  # train-mode BatchNorm; the copy absorbs the updates
    correct = total = 0
    with torch.no_grad(), slim.width(probe, w):
        for x, y in bundle.loader("test", 256):
            correct += int((probe(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def macs(model) -> int:
    return prunelab.measure(model, torch.zeros(1, 3, 32, 32)).macs


def run(variant: str, seed: int, bundle, recipe: TrainRecipe,
        widths: list[float] = WIDTHS) -> list[dict]:
    torch.manual_seed(seed)
    model = prunelab.models.create("resnet20")
    loader = bundle.loader("train", recipe.batch_size, shuffle=True, seed=seed)
    rows = []
    if variant == "individual":
        base = slim.convert(model, widths=widths)
        for w in widths:
            small = slim.export(base, w)
            train(small, loader, recipe, quiet=True)
            rows.append({"width": w, "top1": test_top1(small, bundle), "macs": macs(small)})
        return rows
    universal = variant.startswith("usnet")
    if universal:
        net = slim.convert(model, width_range=(widths[0], widths[-1]))
    else:
        net = slim.convert(model, widths=widths, switchable_bn=variant == "snet")
    slim.train(net, loader, recipe, quiet=True, seed=seed,
               inplace_distillation=variant == "usnet" if universal else None)
    for w in US_WIDTHS if universal else widths:
        with slim.width(net, w):
            row = {"width": w, "top1": test_top1(net, bundle)}
        row["macs"] = macs(slim.export(net, w))
        if universal:
            slim.calibrate_bn(net, w, bundle.loader("train", 256, augment=False), limit=10)
            with slim.width(net, w):
                row["top1 (uncalibrated)"] = row["top1"]
                row["top1"] = test_top1(net, bundle)
            row["top1 (test-batch statistics)"] = top1_batch_statistics(net, w, bundle)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True,
                        choices=["snet", "naive", "individual", "usnet", "usnet-no-distill"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=5000, help="samples per split")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--widths", type=float, nargs="+", default=WIDTHS,
                        help="S-Net / individual widths, ascending")
    parser.add_argument("--name", default=None, help="suffix of the results file name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = prunelab.data.load("cifar10", limit=args.limit)
    recipe = TrainRecipe(epochs=args.epochs, batch_size=128, lr=args.lr, weight_decay=1e-4,
                         schedule="cosine", precision=args.precision)
    rows = []
    for seed in args.seeds:
        for row in run(args.variant, seed, bundle, recipe, sorted(args.widths)):
            rows.append({"variant": args.variant, "seed": seed, **row})
    name = f"slim_accuracy_{args.variant}" + (f"_{args.name}" if args.name else "")
    report(name, f"ResNet-20 {args.variant}, CIFAR-10 JPEG subset ({args.limit}/split), "
           f"{args.epochs} epochs ({args.precision}), test top-1", rows,
           extra={"epochs": args.epochs, "limit": args.limit, "precision": args.precision,
                  "lr": args.lr, "widths": sorted(args.widths),
                  "source": bundle.source})


if __name__ == "__main__":
    main()

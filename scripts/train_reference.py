"""Train a converged reference model and ship it with prunelab (issue 15: converged dense models).

    python scripts/train_reference.py lenet-300-100 mnist --epochs 40 --lr 0.05
    python scripts/train_reference.py resnet20 cifar10 --epochs 60 --lr 0.1 --precision bf16

Training is resumable: a checkpoint under ``--work`` is written after every epoch and a re-run
of the same command continues from it (so a long ResNet-20 run survives the session that started
it). Validation is carved from the training data (10%, split seed 0); the epoch with the best
validation top-1 is kept; the test split is evaluated once, at the end. The weights go into
``src/prunelab/models/weights`` with their SHA-256, accuracy, recipe and provenance in the
manifest, and load with ``prunelab.models.create(name, pretrained=dataset)``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import prunelab
from prunelab.models.pretrained import add_weights
from prunelab.provenance import environment
from prunelab.training import TrainRecipe, train
from prunelab.utils import seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("dataset")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 autocast: about 2x faster on CPUs with AMX, about 12x "
                        "slower on CPUs without bf16 instructions (emulated; prunelab warns)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/reference", help="checkpoints (resumable)")
    args = parser.parse_args()

    started = time.perf_counter()
    bundle = prunelab.data.load(args.dataset, val_fraction=0.1, split_seed=0)
    seed_everything(args.seed)
    model = prunelab.models.create(args.model, num_classes=bundle.num_classes,
                                   input_shape=bundle.input_shape)
    recipe = TrainRecipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, schedule="cosine",
                         label_smoothing=args.label_smoothing, precision=args.precision)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = train(model, bundle.loader("train", recipe.batch_size, shuffle=True, seed=args.seed),
                   recipe, val_data=bundle.loader("val", 1000), keep_best=True,
                   checkpoint=work / f"{args.model}-{args.dataset}-seed{args.seed}.ckpt")
    val = prunelab.evaluate(model, bundle.loader("val", 1000))
    test = prunelab.evaluate(model, bundle.loader("test", 1000))
    env = environment()
    info = {"num_classes": bundle.num_classes, "input_shape": list(bundle.input_shape),
            "model_kwargs": {}, "data_source": bundle.source, "sizes": bundle.sizes,
            "val_top1": round(val["top1"], 2), "test_top1": round(test["top1"], 2),
            "best_epoch": result.best_epoch, "recipe": recipe.model_dump(mode="json"),
            "seed": args.seed, "git_commit": env["git_commit"], "torch": env["torch"],
            "seconds_this_session": round(time.perf_counter() - started)}
    path = add_weights(model, args.model, args.dataset, info)
    print(f"{args.model} on {args.dataset}: validation {val['top1']:.2f}%, test "
          f"{test['top1']:.2f}% (best epoch {result.best_epoch}); saved {path}")


if __name__ == "__main__":
    main()

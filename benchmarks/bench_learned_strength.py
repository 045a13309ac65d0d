"""How strong must a learned-sparsity penalty be for training *alone* to reach 12x or 50x?

LeNet-300-100 / MNIST trained 30 epochs (the recipe of ``examples/learned-mnist-lenet300.yaml``:
SGD lr 0.05, cosine, batch 128) with L0 hard-concrete gates per weight at several penalty
strengths, or with STR thresholds at several weight decays (STR's threshold parameter decays
with the recipe's weight decay, which is what makes it sparse) and starting thresholds. The mask
is what training learned (gates at zero in eval mode, weights below their threshold): no top-up
by magnitude, no fine-tuning. Reported: compression of all parameters and of the weights, and
test error. The strength is picked by the compression it reaches (a property of training), never
by test error.

    python benchmarks/bench_learned_strength.py --method l0 --values 1 10 100 1000
    python benchmarks/bench_learned_strength.py --method str --values 5e-4 2e-3 --s-init -5
    python benchmarks/bench_learned_strength.py --method l0 --granularity neuron \
        --optimizer adam --lr 1e-3 --values 0.1 1 10
"""

from __future__ import annotations

import argparse

import torch

import prunelab
from prunelab.methods import METHODS
from prunelab.training import TrainRecipe, train
from prunelab.utils import seed_everything

from bench_sparse_vd import error, weight_compression
from common import report

RECIPE = TrainRecipe(epochs=30, batch_size=128, lr=0.05, weight_decay=1e-4, schedule="cosine",
                     channels_last=False)


def inputs_kept(model: torch.nn.Module) -> str:
    """Input units each Linear layer still reads, e.g. "219-214-100" (Louizos et al.'s Table 1)."""
    return "-".join(str(int((m.weight != 0).any(0).sum())) for m in model.modules()
                    if isinstance(m, torch.nn.Linear))


def one_run(method: str, value: float, args: argparse.Namespace, seed: int, bundle) -> dict:
    seed_everything(seed)
    model = prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28)).to(args.device)
    recipe = RECIPE.model_copy(update={"epochs": args.epochs, "optimizer": args.optimizer,
                                       "lr": args.lr})
    s_init = args.s_init
    if method == "l0":
        chosen = METHODS.get("l0").create(strength=value, granularity=args.granularity,
                                          init_keep=args.init_keep)
    else:
        chosen = METHODS.get("str").create(s_init=s_init)
        recipe = recipe.model_copy(update={"weight_decay": value})
    result = train(model, bundle.loader("train", recipe.batch_size, shuffle=True, seed=seed),
                   recipe, callbacks=chosen.training_callbacks(), quiet=True)
    model = model.cpu()
    measured = prunelab.measure(model, torch.zeros(1, 1, 28, 28))
    return {"method": method, "strength" if method == "l0" else "weight_decay": value,
            **({"s_init": s_init} if method == "str" else
               {"granularity": args.granularity, "init_keep": args.init_keep}),
            "optimizer": args.optimizer, "lr": args.lr, "seed": seed, "epochs": args.epochs,
            "compression_all_params": measured.compression,
            "compression_weights": weight_compression(model),
            "test_error": error(model, bundle), "inputs_kept": inputs_kept(model),
            "minutes": result.seconds / 60,
            "device": args.device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["l0", "str"], required=True)
    parser.add_argument("--values", type=float, nargs="+", required=True,
                        help="L0 penalty strengths, or STR weight decays")
    parser.add_argument("--s-init", type=float, default=-8.0, help="STR's starting threshold")
    parser.add_argument("--granularity", choices=["weight", "neuron"], default="weight",
                        help="L0 gates per weight or per neuron (Linear inputs, as the paper)")
    parser.add_argument("--init-keep", type=float, default=0.9,
                        help="L0 gates' starting open probability (the authors' code: 0.5)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default=RECIPE.optimizer)
    parser.add_argument("--lr", type=float, default=RECIPE.lr)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=RECIPE.epochs)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None, help="results file name")
    args = parser.parse_args()
    bundle = prunelab.data.load("mnist")
    rows = [one_run(args.method, v, args, s, bundle) for v in args.values for s in args.seeds]
    report(args.name or f"learned_strength_{args.method}",
           f"{args.method}: compression learned by training alone, LeNet-300-100 / MNIST", rows,
           {"recipe": RECIPE.model_dump(), "args": vars(args), "data": bundle.source})


if __name__ == "__main__":
    main()

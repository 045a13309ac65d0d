"""Training throughput on CPU: prunelab's trainer vs a plain eager loop, ResNet-20 on CIFAR-10.

Baseline: what a typical script does: a ``torch.utils.data.DataLoader`` over the (already decoded,
in-memory) training images with per-sample torchvision transforms (random crop + flip +
normalise), NCHW tensors, eager model. prunelab: in-memory uint8 tensors, augmentation on whole
batches, channels_last. Same model, optimiser, batch size and number of steps; the two alternate
in chunks within one run. Target: >= 1.3x images/s.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

import prunelab
from prunelab.training import TrainRecipe, train

from common import report


class PerSampleCifar(Dataset):
    """uint8 CHW images with the usual per-sample torchvision transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std):
        self.images, self.labels = images, labels
        self.transform = v2.Compose([
            v2.RandomCrop(32, padding=4),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


def plain_loop(model, loader, optimizer, steps: int) -> float:
    """Images per second of a textbook eager loop over ``steps`` batches."""
    model.train()
    seen, start = 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


class Limit:
    """The first ``steps`` batches of a loader (keeps ``len``, so the trainer accepts it)."""

    def __init__(self, batches, steps: int):
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.steps:
                return
            yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="steps per measured chunk")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bundle = prunelab.data.load("cifar10", limit=args.batch_size * args.steps * 2)
    images, labels = bundle.train[0], bundle.train[1]
    recipe = TrainRecipe(epochs=1, batch_size=args.batch_size, lr=0.05, weight_decay=1e-4,
                         schedule="constant")

    torch.manual_seed(0)
    baseline_model = prunelab.models.create("resnet20")
    baseline_opt = recipe.make_optimizer(baseline_model)
    dataset = PerSampleCifar(images, labels, bundle.mean, bundle.std)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=generator)

    torch.manual_seed(0)
    ours_model = prunelab.models.create("resnet20")
    ours_batches = bundle.loader("train", args.batch_size, shuffle=True, seed=0)

    plain_loop(baseline_model, loader, baseline_opt, 2)  # warm-up both
    train(ours_model, Limit(ours_batches, 2), recipe, quiet=True)
    base_rates, our_rates = [], []
    for _ in range(args.chunks):
        base_rates.append(plain_loop(baseline_model, loader, baseline_opt, args.steps))
        start = time.perf_counter()
        train(ours_model, Limit(ours_batches, args.steps), recipe, quiet=True)
        our_rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
    base, ours = sorted(base_rates)[len(base_rates) // 2], sorted(our_rates)[len(our_rates) // 2]
    rows = [
        {"loop": "plain eager (DataLoader, per-sample transforms, NCHW)", "images_per_s": base},
        {"loop": "prunelab.train (tensor batches, batched augmentation, channels_last)",
         "images_per_s": ours},
    ]
    print(f"speed-up {ours / base:.2f}x (target >= 1.3x)")
    report("train_throughput", "ResNet-20 / CIFAR-10 training throughput on CPU", rows,
           {"speedup": ours / base, "all_baseline": base_rates, "all_prunelab": our_rates,
            "threads": args.threads, "batch_size": args.batch_size, "data": bundle.source})


if __name__ == "__main__":
    main()

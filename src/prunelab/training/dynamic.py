"""Dynamic sparse training: drop-and-grow updates of the masks while training (SET, RigL).

Both keep every layer's number of active weights fixed. Every ``interval`` optimiser steps (until
``end`` of training) each masked layer drops the fraction ``f`` of its active weights with the
smallest magnitude and activates as many inactive ones: at random (SET, Mocanu et al. 2018) or
those with the largest dense-gradient magnitude (RigL, Evci et al. 2020). RigL's ``f`` decays
as f(t) = α/2 · (1 + cos(π t / t_end)); SET's is constant. A connection that is newly activated
starts at zero and its optimiser state (momentum, Adam moments) is reset; one dropped and grown
back in the same update keeps its value.

The dense gradient is ∂L/∂(w ⊙ m), the gradient with respect to the masked tensor the network
uses (the one autograd passes through the mask anyway); it is captured with hooks installed only
for update steps, so other steps cost nothing extra.
"""

from __future__ import annotations

import math

import torch
from torch.utils.hooks import RemovableHandle

from prunelab.errors import InvalidValueError
from prunelab.sparsity import PrunableWeight, keep_mask_from_scores, prunable_weights
from prunelab.sparsity.masks import WeightMask
from prunelab.training.trainer import Callback, TrainState

GROWTH = ("random", "gradient")
#: Regrowth draws from ``seed + SEED_OFFSET``, so they are not the very numbers a random mask
#: drawn with the same seed used (which would regrow exactly the weights just dropped).
SEED_OFFSET = 20_000


class DynamicSparsity(Callback):
    """Drop-by-magnitude, grow-by-``growth`` mask updates on a pruned model.

    ``growth="random"`` with ``decay=False`` is SET; ``growth="gradient"`` with the cosine decay
    is RigL. ``seed`` fixes the random draws. ``updates`` records (step, connections moved).
    """

    def __init__(self, growth: str = "gradient", *, drop_fraction: float = 0.3,
                 interval: int = 100, end: float = 0.75, decay: bool = True, seed: int = 0,
                 name: str = "rigl"):
        if growth not in GROWTH:
            raise InvalidValueError(f"growth must be one of {', '.join(GROWTH)}, got {growth!r}")
        if not 0 < drop_fraction < 1:
            raise InvalidValueError(f"{name} drop fraction must be in (0, 1), got {drop_fraction}")
        if interval < 1:
            raise InvalidValueError(f"{name} update interval must be >= 1 step, got {interval}")
        if not 0 < end <= 1:
            raise InvalidValueError(f"{name} end must be in (0, 1] (a fraction of training), "
                                    f"got {end}")
        self.growth, self.drop_fraction, self.interval = growth, drop_fraction, interval
        self.end, self.decay, self.name = end, decay, name
        self.generator = torch.Generator().manual_seed(seed + SEED_OFFSET)
        self.weights: list[PrunableWeight] = []
        self.grads: list[torch.Tensor | None] = []
        self.hooks: list[RemovableHandle] = []
        self.last = 0
        self.updates: list[tuple[int, int]] = []

    def on_train_begin(self, state: TrainState) -> None:
        self.weights = [w for w in prunable_weights(state.model) if w.mask is not None]
        if not self.weights:
            raise InvalidValueError(f"{self.name} updates masks, but the model has none: prune "
                                    "it first (e.g. schedule at-init)")
        self.last = int(self.end * state.total_steps)
        if self.interval > self.last:
            raise InvalidValueError(
                f"{self.name} interval (delta_t) {self.interval} steps is longer than the "
                f"{self.last} steps that update masks ({self.end:g} of {state.total_steps} "
                "training steps): no update would happen; lower it or train longer")

    def due(self, step: int) -> bool:
        """Whether the masks are updated after optimiser step ``step`` (counted from 1)."""
        return step % self.interval == 0 and step <= self.last

    def fraction(self, step: int) -> float:
        """The drop fraction at ``step``: cosine-decayed (RigL) or constant (SET)."""
        if not self.decay:
            return self.drop_fraction
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * step / self.last))

    def on_step_begin(self, state: TrainState) -> None:
        if self.growth == "gradient" and self.due(state.step + 1):
            self._capture()

    def on_step_end(self, state: TrainState) -> None:
        self._release()
        if self.due(state.step):
            self.update(state)
        self.grads = []

    def on_train_end(self, state: TrainState) -> None:
        self._release()

    def _capture(self) -> None:
        """Hooks keeping ∂L/∂(w ⊙ m) of every masked tensor for this step (summed over holders)."""
        self.grads = [None] * len(self.weights)

        def keep(i: int):
            def on_forward(_module, _inputs, output: torch.Tensor) -> None:
                def on_grad(grad: torch.Tensor) -> None:
                    found = self.grads[i]
                    self.grads[i] = grad.detach() if found is None else found + grad.detach()
                output.register_hook(on_grad)
            return on_forward

        for i, weight in enumerate(self.weights):
            for _, module, param in weight.holders:
                mask = next(p for p in module.parametrizations[param] if isinstance(p, WeightMask))
                self.hooks.append(mask.register_forward_hook(keep(i)))

    def _grad(self, i: int) -> torch.Tensor | None:
        return self.grads[i] if i < len(self.grads) else None

    def _release(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    @torch.no_grad()
    def update(self, state: TrainState) -> None:
        """Drop and grow in every masked layer; new connections start at 0 with fresh state."""
        fraction = self.fraction(state.step)
        moved = 0
        for i, weight in enumerate(self.weights):
            old = weight.mask.bool()
            active = int(old.sum())
            k = int(fraction * active)
            if k == 0 or (self.growth == "gradient" and self._grad(i) is None):
                continue  # nothing to move, or a layer this step's forward did not use
            original = weight.original
            magnitude = original.detach().abs().float().masked_fill(~old, float("-inf"))
            kept = keep_mask_from_scores(magnitude, old.numel() - active + k)
            if self.growth == "random":
                grow = torch.rand(old.shape, generator=self.generator).to(old.device)
            else:
                grow = self._grad(i).abs().float()
            grow = grow.masked_fill(kept, float("-inf"))
            grown = keep_mask_from_scores(grow, old.numel() - k)
            new = grown & ~old
            weight.set_mask(kept | grown)
            original[new] = 0
            for value in state.optimizer.state.get(original, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == original.shape:
                    value[new] = 0
            moved += int(new.sum())
        self.updates.append((state.step, moved))

"""Method callbacks in a training loop of your own (instead of :func:`prunelab.training.train`).

A learned-sparsity method's ``training_callbacks()`` add penalties and gates; :class:`Regularizer`
calls them at the right places of a plain PyTorch loop::

    method = prunelab.methods.METHODS.get("sparse-vd").create()
    reg = Regularizer(model, method.training_callbacks(), steps_per_epoch=len(loader),
                      batch_size=128, epochs=10)       # gates are added here ...
    optimizer = torch.optim.Adam(parameter_groups(model, 0.0))  # ... so create it after
                                                       # (gates then skip any weight decay)
    reg.begin(optimizer)
    for epoch in range(10):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y) + reg.penalty()
            optimizer.zero_grad()
            loss.backward()
            reg.after_backward()
            optimizer.step()
            reg.step_end()
    reg.end()                                          # gates become ordinary masks
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.training.recipe import TrainRecipe
from prunelab.training.trainer import Callback, TrainState


class Regularizer:
    """Drives callbacks from a user's loop; ``steps_per_epoch × batch_size`` is the N that
    penalties scaled per training example (sparse VD's KL, L0) divide by."""

    def __init__(self, model: nn.Module, callbacks: Sequence[Callback], *, steps_per_epoch: int,
                 batch_size: int, epochs: int = 1):
        if steps_per_epoch < 1 or batch_size < 1 or epochs < 1:
            raise InvalidValueError(
                "steps_per_epoch, batch_size and epochs must be >= 1, got "
                f"{steps_per_epoch}, {batch_size}, {epochs}")
        self.model, self.callbacks = model, list(callbacks)
        self.recipe = TrainRecipe(epochs=epochs, batch_size=batch_size)
        self.steps_per_epoch = steps_per_epoch
        self.state: TrainState | None = None
        for callback in self.callbacks:
            callback.on_setup(model)

    def begin(self, optimizer: torch.optim.Optimizer) -> None:
        """Call once the optimiser exists (it must have been created after the Regularizer)."""
        self.state = TrainState(self.model, optimizer, self.recipe, self.steps_per_epoch,
                                self.recipe.epochs * self.steps_per_epoch)
        for callback in self.callbacks:
            callback.on_train_begin(self.state)

    def _started(self) -> TrainState:
        if self.state is None:
            raise InvalidValueError("call Regularizer.begin(optimizer) before training")
        return self.state

    def penalty(self) -> torch.Tensor:
        """The callbacks' loss terms for this step (add to your loss before backward)."""
        state = self._started()
        for callback in self.callbacks:
            callback.on_step_begin(state)
        terms = [t for c in self.callbacks if (t := c.penalty(state)) is not None]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def after_backward(self) -> None:
        for callback in self.callbacks:
            callback.on_after_backward(self._started())

    def step_end(self) -> None:
        state = self._started()
        state.step += 1
        state.epoch = state.step // state.steps_per_epoch
        for callback in self.callbacks:
            callback.on_step_end(state)

    def end(self) -> None:
        """Finish: learned gates are baked into masks."""
        for callback in self.callbacks:
            callback.on_train_end(self._started())

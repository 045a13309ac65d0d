"""Training a supernet (several widths per step) and calibrating BatchNorm for one width.

Training is prunelab's one train loop with a :class:`SlimmableTraining` callback: the loop runs
the batch at the largest width as usual, and the callback's ``penalty`` adds the losses of the
other widths on the same batch, so one optimiser step follows the summed gradients of every
width (S-Net: all its widths; US-Net: the sandwich rule, the largest, the smallest and n-2 random
widths, with inplace distillation: the smaller widths learn the largest's detached predictions).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.metrics.accuracy import evaluate
from prunelab.slim.layers import SlimBatchNorm, SwitchableBatchNorm
from prunelab.slim.supernet import Width, set_width, spec_of, width
from prunelab.training.recipe import TrainRecipe
from prunelab.training.trainer import Callback, TrainResult, TrainState, train
from prunelab.utils import input_errors, iter_batches


class SlimmableTraining(Callback):
    """Train every width of ``net`` on each batch: the losses are summed before backward.

    Args:
        sandwich: US-Net: widths per step (the largest, the smallest and ``sandwich - 2``
            uniform random widths in between); an S-Net always trains its whole list.
        inplace_distillation: the widths below the largest learn from its softmax (detached)
            instead of the labels; the largest always learns from the labels.
        val_data: also evaluate the smallest width after each epoch (``val_top1_min_width``).
        seed: the random widths' generator.
        calibrate_batches: a US-Net: at the end, recalibrate BatchNorm at the largest width on
            the last this many training batches (its training statistics mix every width), so
            the supernet evaluates correctly as it is. 0: leave them.
    """

    def __init__(self, net: nn.Module | None, *, sandwich: int = 4,
                 inplace_distillation: bool = False, val_data: Iterable | None = None,
                 seed: int = 0, calibrate_batches: int = 0):
        if isinstance(sandwich, bool) or not isinstance(sandwich, int) or sandwich < 2:
            raise InvalidValueError(
                f"sandwich is the number of widths per step, at least 2 (the largest and the "
                f"smallest), got {sandwich!r}")
        self.sandwich, self.distill = sandwich, inplace_distillation
        self.val_data = val_data
        self.generator = torch.Generator().manual_seed(seed)
        self.min_losses: list[float] = []
        self.recent: collections.deque = collections.deque(maxlen=max(calibrate_batches, 1))
        self.calibrate = calibrate_batches > 0
        if net is not None:
            self.on_setup(net)

    def on_setup(self, model: nn.Module) -> None:
        """Train ``model`` (a supernet; ``net=None`` at construction binds the trained one)."""
        self.net, self.spec = model, spec_of(model)
        self.widths: list[float] = [self.spec.max_width]

    def step_widths(self) -> list[float]:
        """The widths of one step, the largest first."""
        if not self.spec.universal:
            return sorted(self.spec.widths, reverse=True)
        lo, hi = self.spec.width_range
        between = lo + (hi - lo) * torch.rand(self.sandwich - 2, generator=self.generator)
        return [hi, lo, *between.tolist()]

    def on_train_begin(self, state: TrainState) -> None:
        for module in self.net.modules():  # the weights will change: old calibrations go
            if isinstance(module, SlimBatchNorm):
                module.slim_calibrated.clear()

    def on_step_begin(self, state: TrainState) -> None:
        self.widths = self.step_widths()
        set_width(self.net, self.widths[0])

    def penalty(self, state: TrainState) -> torch.Tensor | None:
        """The losses of the other widths on the step's batch."""
        teacher = F.softmax(state.logits.detach(), dim=1) if self.distill else None
        total = None
        try:
            for w in self.widths[1:]:
                set_width(self.net, w)
                with state.autocast():  # every width in the recipe's precision
                    logits = self.net(state.inputs).float()
                if teacher is not None:
                    loss = -(teacher * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
                else:
                    loss = F.cross_entropy(logits, state.targets,
                                           label_smoothing=state.recipe.label_smoothing)
                if w == self.spec.min_width:
                    self.min_losses.append(float(loss.detach()))
                total = loss if total is None else total + loss
        finally:
            set_width(self.net, self.widths[0])
        return total

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        if self.min_losses:
            metrics["train_loss_min_width"] = sum(self.min_losses) / len(self.min_losses)
            self.min_losses = []
        if self.val_data is not None:
            with width(self.net, self.spec.min_width):
                metrics["val_top1_min_width"] = evaluate(self.net, self.val_data,
                                                         topk=(1,))["top1"]

    def on_step_end(self, state: TrainState) -> None:
        if self.calibrate and state.inputs is not None:
            self.recent.append((state.inputs.detach(), state.targets))

    def on_train_end(self, state: TrainState) -> None:
        set_width(self.net, self.spec.max_width)
        if self.calibrate and self.spec.universal and self.recent:
            calibrate_bn(self.net, self.spec.max_width, list(self.recent))
        self.recent.clear()


def train_slimmable(
    net: nn.Module,
    train_data: Iterable,
    recipe: TrainRecipe,
    *,
    sandwich: int = 4,
    inplace_distillation: bool | None = None,
    val_data: Iterable | None = None,
    callbacks: Sequence[Callback] = (),
    seed: int = 0,
    **options,
) -> TrainResult:
    """Train a supernet with prunelab's train loop (options as :func:`prunelab.training.train`).

    ``inplace_distillation`` defaults to on for a US-Net and off for an S-Net (as in the
    papers). Validation (``val_data``, ``keep_best``) is at the largest width; the smallest
    width's validation accuracy is added to the history as ``val_top1_min_width``.
    """
    spec = spec_of(net)
    if inplace_distillation is None:
        inplace_distillation = spec.universal
    callback = SlimmableTraining(net, sandwich=sandwich, inplace_distillation=inplace_distillation,
                                 val_data=val_data, seed=seed)
    return train(net, train_data, recipe, val_data=val_data, callbacks=[callback, *callbacks],
                 **options)


def calibrate_bn(net: nn.Module, w: Width, batches: Iterable, limit: int | None = None) -> None:
    """Recompute the BatchNorm statistics of ``net`` at width ``w`` from ``batches``.

    Each BatchNorm's statistics become the plain average of the batch means and (unbiased)
    variances over the calibration batches (at most ``limit``), as torch's ``momentum=None``
    computes, starting from nothing: the statistics gathered in training play no part. An S-Net
    stores them in that width's private BatchNorm; a US-Net keeps them for that width (the same
    channel counts), used in eval mode and by :func:`prunelab.slim.export`. Training again
    drops a US-Net's calibrations.
    """
    norms = [m for m in net.modules() if isinstance(m, (SlimBatchNorm, SwitchableBatchNorm))]
    was_training = net.training
    with width(net, w):
        for module in norms:
            module.slim_calibration = [None, None, 0]
        try:
            net.eval()
            with torch.no_grad():
                for x, _ in iter_batches(batches, net, limit):
                    with input_errors(net, x):
                        net(x)
            for module in norms:
                mean, var, count = module.slim_calibration
                if mean is None:
                    continue
                if isinstance(module, SwitchableBatchNorm):
                    private = module.bns[module.slim_choice]
                    if private.running_mean is None:
                        continue  # it always normalises with the batch's statistics
                    private.running_mean.copy_(mean)
                    private.running_var.copy_(var)
                    private.num_batches_tracked.fill_(count)
                else:
                    module.slim_calibrated[module.slim_key] = (mean, var)
        finally:
            for module in norms:
                module.slim_calibration = None
            net.train(was_training)

"""The train loop: one loop for dense training, fine-tuning and methods that act during training.

Methods that need to act while training (regularisers, gradual pruning, dynamic sparsity) plug in
as :class:`Callback` objects instead of forking the loop.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunelab.checkpoint import load_state_dict, read_checkpoint, save_checkpoint
from prunelab.errors import CheckpointError, InvalidValueError, TrainingDivergedError
from prunelab.metrics.accuracy import evaluate, task_loss
from prunelab.training.recipe import TrainRecipe
from prunelab.training.workarounds import strided_pointwise_in_nchw
from prunelab.utils import (
    check_input,
    input_errors,
    progress_enabled,
    uses_convolutions,
    warn_if_emulated_bf16,
)


@dataclass
class TrainState:
    """What callbacks see: the model, optimiser and where training is."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    recipe: TrainRecipe
    steps_per_epoch: int
    total_steps: int
    epoch: int = 0
    step: int = 0
    loss: torch.Tensor | None = None
    #: The step's batch and the model's output on it (set before ``penalty`` is asked), for
    #: callbacks whose extra loss needs them (slimmable training runs the batch at more widths).
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision the loop runs the forward pass in (bf16 autocast for a ``precision=
        "bf16"`` recipe), for callbacks that run the model themselves, so every forward pass
        of a step has the recipe's precision."""
        if self.recipe.precision != "bf16":
            return contextlib.nullcontext()
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return torch.autocast(device.type, dtype=torch.bfloat16)


class Callback:
    """Hooks into :func:`train`. Override what you need; every hook is optional."""

    def on_setup(self, model: nn.Module) -> None:
        """Before the optimiser is created: the place to add trainable parameters to the model
        (learned gates, thresholds, variances), so that the optimiser trains them."""

    def on_train_begin(self, state: TrainState) -> None: ...

    def on_step_begin(self, state: TrainState) -> None: ...

    def penalty(self, state: TrainState) -> torch.Tensor | None:
        """An extra loss term (regularisers), added before backward."""
        return None

    def on_after_backward(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


@dataclass
class TrainResult:
    """Per-epoch history (train loss, validation metrics, lr, seconds) and the chosen epoch."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    seconds: float = 0.0



def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def train(
    model: nn.Module,
    train_data: Iterable,
    recipe: TrainRecipe,
    *,
    val_data: Iterable | None = None,
    callbacks: Sequence[Callback] = (),
    start_epoch: int = 0,
    keep_best: bool = False,
    checkpoint: str | os.PathLike | None = None,
    quiet: bool = False,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` in place with ``recipe`` on batches of ``(inputs, labels)``.

    Args:
        train_data: re-iterable batches (e.g. ``bundle.loader("train", 128, shuffle=True)``).
        val_data: validation batches, evaluated after each epoch. The test set never enters here:
            the best epoch (``keep_best``) is chosen on validation accuracy only.
        callbacks: hooks for methods acting during training.
        start_epoch: resume the schedule at this epoch (used by weight rewinding).
        keep_best: restore the weights of the epoch with the best validation top-1 at the end.
        checkpoint: file written after every epoch; if it exists, training resumes from it.
        quiet: no progress bar (also off when stderr is not a terminal).
    """
    if not isinstance(recipe, TrainRecipe):
        raise InvalidValueError(f"recipe must be a prunelab TrainRecipe (prunelab.training; e.g. "
                                f"TrainRecipe(epochs=10)), got {type(recipe).__name__}")
    if keep_best and val_data is None:
        raise InvalidValueError("keep_best needs val_data: the best epoch is chosen on validation")
    steps_per_epoch = len(train_data)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise InvalidValueError("training data has no batches")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    channels_last = recipe.channels_last and uses_convolutions(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for callback in callbacks:
        callback.on_setup(model)
    optimizer = recipe.make_optimizer(model)
    total_steps = recipe.epochs * steps_per_epoch
    state = TrainState(model, optimizer, recipe, steps_per_epoch, total_steps)
    state.epoch, state.step = start_epoch, start_epoch * steps_per_epoch

    def set_lr() -> None:
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * recipe.lr_factor(state.step, total_steps)

    result = TrainResult()
    best: tuple[float, dict] | None = None
    if checkpoint is not None and Path(checkpoint).is_file():
        payload = read_checkpoint(checkpoint)
        if not {"optimizer", "epoch", "history"} <= set(payload["extra"]):
            raise CheckpointError(
                f"{str(checkpoint)!r} is not a training checkpoint (it has no optimizer state, "
                "epoch and history to resume from); give train() another checkpoint path")
        load_state_dict(model, payload["state_dict"])
        optimizer.load_state_dict(payload["extra"]["optimizer"])
        state.epoch = int(payload["extra"]["epoch"])
        state.step = state.epoch * steps_per_epoch
        result.history = list(payload["extra"]["history"])
        if keep_best and payload["extra"].get("best") is not None:
            best_top1, best_state, result.best_epoch = payload["extra"]["best"]
            best = (float(best_top1), best_state)

    with strided_pointwise_in_nchw(model, channels_last and device.type == "cpu"):
        started = time.perf_counter()
        start_step = state.step
        if recipe.precision == "bf16":
            warn_if_emulated_bf16(device, "training")
        for callback in callbacks:
            callback.on_train_begin(state)
        progress = _Progress(description, recipe.epochs, steps_per_epoch, progress_enabled(quiet))
        with progress:
            while state.epoch < recipe.epochs:
                model.train()
                epoch_start = time.perf_counter()
                loss_sum = torch.zeros((), device=device)
                samples = 0
                progress.start_epoch(state.epoch)
                if hasattr(train_data, "set_epoch"):  # the shuffle order depends on the epoch only
                    train_data.set_epoch(state.epoch)
                skipped = 0
                for x, y in train_data:
                    x, y = _to_device(x, y, device, channels_last)
                    for callback in callbacks:
                        callback.on_step_begin(state)
                    set_lr()
                    optimizer.zero_grad(set_to_none=True)
                    norm_stats = _norm_statistics(model) if recipe.on_nonfinite == "skip" else None
                    if state.step == start_step:
                        check_input(model, x)
                    with input_errors(model, x), state.autocast():
                        logits = model(x)
                        loss = task_loss(logits, y, label_smoothing=recipe.label_smoothing)
                    if recipe.precision == "bf16":  # callbacks and penalties see float32
                        logits, loss = logits.float(), loss.float()
                    state.loss, state.inputs, state.targets, state.logits = loss, x, y, logits
                    total = loss
                    for callback in callbacks:
                        extra = callback.penalty(state)
                        if extra is not None:
                            total = total + extra
                    if not bool(torch.isfinite(total.detach())):
                        _nonfinite(state, total, description, norm_stats)
                        skipped += 1
                        state.step += 1
                        for callback in callbacks:
                            callback.on_step_end(state)
                        progress.advance()
                        continue
                    total.backward()
                    for callback in callbacks:
                        callback.on_after_backward(state)
                    optimizer.step()
                    state.step += 1
                    for callback in callbacks:
                        callback.on_step_end(state)
                    loss_sum += loss.detach() * len(y)
                    samples += len(y)
                    progress.advance()
                if skipped and not samples:
                    raise TrainingDivergedError(
                        f"{description}: every batch of epoch {state.epoch + 1} had a non-finite "
                        "loss (the weights themselves are probably NaN or infinite); lower the "
                        f"learning rate (lr={recipe.lr:g})")
                state.epoch += 1
                metrics = {
                    "epoch": state.epoch,
                    "train_loss": float(loss_sum) / max(samples, 1),
                    "lr": optimizer.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - epoch_start,
                }
                if skipped:
                    metrics["skipped_batches"] = skipped
                if val_data is not None:
                    val = evaluate(model, val_data, topk=(1,))
                    metrics.update(val_loss=val["loss"], val_top1=val["top1"])
                    if "perplexity" in val:
                        metrics["val_perplexity"] = val["perplexity"]
                    # A language model is chosen on its loss (lower is better), a classifier on
                    # its top-1.
                    score = -val["loss"] if "perplexity" in val else val["top1"]
                    if keep_best and (best is None or score > best[0]):
                        best = (score, _copy_state(model))
                        result.best_epoch = state.epoch
                result.history.append(metrics)
                progress.end_epoch(metrics)
                for callback in callbacks:
                    callback.on_epoch_end(state, metrics)
                if checkpoint is not None:
                    extra = {"optimizer": optimizer.state_dict(), "epoch": state.epoch,
                             "best": (*best, result.best_epoch) if best is not None else None}
                    save_checkpoint(checkpoint, model, extra=extra | {"history": result.history})
        if best is not None:
            load_state_dict(model, best[1])
        for callback in callbacks:
            callback.on_train_end(state)
        result.seconds = time.perf_counter() - started
    return result


def _norm_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The running statistics of normalisation layers with a copy of each (to undo a batch)."""
    return [(buffer, buffer.clone()) for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._NormBase)
            for buffer in module.buffers(recurse=False)]


def _nonfinite(state: TrainState, total: torch.Tensor, description: str,
               norm_stats: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    """A NaN or infinite loss: stop with an error naming where (``on_nonfinite: stop``), or
    undo the batch's effect on BatchNorm statistics so that it can be skipped (``skip``)."""
    recipe = state.recipe
    if norm_stats is None:
        within = state.step - state.epoch * state.steps_per_epoch
        raise TrainingDivergedError(
            f"{description}: the training loss became {float(total.detach()):g} at epoch "
            f"{state.epoch + 1}/{recipe.epochs}, step {within + 1}/{state.steps_per_epoch} "
            f"(lr {state.optimizer.param_groups[0]['lr']:.3g}); lower the learning rate, or "
            "set on_nonfinite: skip in the recipe to skip such batches")
    with torch.no_grad():
        for buffer, saved in norm_stats:
            buffer.copy_(saved)


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Progress:
    """A rich progress bar over steps, or nothing when disabled."""

    def __init__(self, description: str, epochs: int, steps: int, enabled: bool):
        self.description, self.epochs, self.steps = description, epochs, steps
        self.enabled = enabled
        self._bar = None
        self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=True,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start_epoch(self, epoch: int) -> None:
        if self._bar is not None:
            label = f"{self.description} epoch {epoch + 1}/{self.epochs}"
            if self._task is None:
                self._task = self._bar.add_task(label, total=self.steps, info="")
            else:
                self._bar.reset(self._task, total=self.steps, description=label)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def end_epoch(self, metrics: dict) -> None:
        if self._bar is not None:
            info = f"loss {metrics['train_loss']:.3f}"
            if "val_perplexity" in metrics:
                info += f"  val loss {metrics['val_loss']:.3f}"
            elif "val_top1" in metrics:
                info += f"  val {metrics['val_top1']:.2f}%"
            self._bar.update(self._task, info=info)

"""One experimental setting and the stages every run goes through.

``prunelab run`` (one method, several sparsities) and ``prunelab sweep`` (a grid of methods ×
targets × seeds × recoveries, in parallel) both use :class:`Experiment`: train the dense model,
prune it with a schedule, recover (fine-tune, rewind, Scratch-E, Scratch-B), evaluate and measure.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from prunelab import data as datasets
from prunelab import models
from prunelab.experiment_config import ExperimentConfig, MethodChoice, training_method
from prunelab.methods import METHODS, Method
from prunelab.metrics import evaluate, measure
from prunelab.recoveries import Recovery, Snapshot
from prunelab.schedules import Pruner, Schedule
from prunelab.sparsity import check_not_cut, check_sparsity, mask_sparsity
from prunelab.structured.graph import structure_of
from prunelab.tracking import Tracking
from prunelab.training import Callback, TrainRecipe, TrainState, train
from prunelab.utils import seed_everything


@dataclass
class DenseModel:
    """A trained dense model, its snapshots for rewinding, and its own result row."""

    model: nn.Module
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    row: dict[str, Any] = field(default_factory=dict)


class _Phase(Callback):
    """Reports training progress (epoch k of n) to the caller, e.g. a sweep's display."""

    def __init__(self, report: Callable[[str], None], label: str):
        self.report, self.label = report, label

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        self.report(f"{self.label} epoch {state.epoch}/{state.recipe.epochs}")


class _Snapshots(Callback):
    """Snapshots at several epochs (0 = initialisation)."""

    def __init__(self, epochs: set[int]):
        self.takers = {e: Snapshot(e) for e in epochs}

    def on_train_begin(self, state: TrainState) -> None:
        for taker in self.takers.values():
            taker.on_train_begin(state)

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        for taker in self.takers.values():
            taker.on_epoch_end(state, metrics)


class Experiment:
    """Data, loaders and recipes of one :class:`ExperimentConfig`, and the stages of a run."""

    def __init__(
        self,
        config: ExperimentConfig,
        *,
        quiet: bool = True,
        on_phase: Callable[[str], None] | None = None,
    ):
        self.config, self.quiet = config, quiet
        self.on_phase = on_phase or (lambda text: None)
        #: Where the epochs of each training phase are logged (nowhere unless tracking is on).
        self.tracking = Tracking()
        self._loaders: dict[tuple, Any] = {}

    @cached_property
    def bundle(self) -> datasets.DataBundle:
        c = self.config
        return datasets.load(c.dataset, c.data_dir, val_fraction=c.val_fraction,
                             limit=c.data_limit, **c.dataset_options)

    def loader(self, split: str, batch_size: int, seed: int = 0, shuffle: bool = False):
        key = (split, batch_size, seed, shuffle)
        if key not in self._loaders:
            self._loaders[key] = self.bundle.loader(split, batch_size, shuffle=shuffle, seed=seed)
        return self._loaders[key]

    @property
    def val(self):
        return self.loader("val", 256) if self.bundle.sizes["val"] else None

    @cached_property
    def example(self) -> torch.Tensor:
        """A batch of test inputs of the latency batch size (for FLOPs and latency)."""
        return next(iter(self.loader("test", self.config.latency.batch_size)))[0]

    def new_model(self, seed: int, choice: MethodChoice | None = None) -> nn.Module:
        """A freshly initialised model; the same seed gives the same weights. With a ``choice``
        whose method trains its own way, the module it trains (a slimmable method's supernet)."""
        seed_everything(seed)
        kwargs = {"num_classes": self.bundle.num_classes, "input_shape": self.bundle.input_shape}
        model = models.create(self.config.model, **(kwargs | self.config.model_kwargs))
        method = training_method(choice)
        return model if method is None else method.training_model(model, self.example)

    def fit(self, model: nn.Module, recipe: TrainRecipe, seed: int, label: str,
            callbacks: list[Callback] = (), start_epoch: int = 0,
            keep_best: bool = True) -> None:
        """Train with the experiment's data; the epoch is chosen on validation (keep_best).

        Pass ``keep_best=False`` when the model changes during training in ways an earlier
        epoch must not undo (gradual pruning: an earlier epoch has fewer weights pruned).
        """
        val = self.val
        logged = self.tracking.callbacks(label)
        train(
            model, self.loader("train", recipe.batch_size, seed, shuffle=True), recipe,
            val_data=val, keep_best=keep_best and self.config.keep_best and val is not None,
            callbacks=[*callbacks, _Phase(self.on_phase, label), *logged], start_epoch=start_epoch,
            quiet=self.quiet, description=label,
        )

    def train_dense(self, seed: int, snapshot_epochs: set[int] = frozenset(),
                    choice: MethodChoice | None = None) -> DenseModel:
        """Train the dense model of ``seed``, keeping snapshots for rewinding.

        With a ``choice`` whose method trains its own way (e.g. Network Slimming), its training
        callbacks are used and the row is labelled ``dense (<method> training)``.
        """
        started = time.perf_counter()
        if self.config.dense == "pretrained":
            return self._pretrained(seed, started)
        model = self.new_model(seed, choice)
        snapshots = _Snapshots(set(snapshot_epochs))
        method = training_method(choice)
        extra = method.training_callbacks() if method is not None else []
        self.fit(model, self.config.train, seed, "dense", [snapshots, *extra])
        states = {e: s.state for e, s in snapshots.takers.items() if s.state is not None}
        row = self.row(model, seed, time.perf_counter() - started)
        label = f"dense ({choice.method} training)" if method is not None else "dense"
        row.update(method="dense", label=label, recovery=None, target_kind=None,
                   target_value=None)
        return DenseModel(model, states, row)

    def _pretrained(self, seed: int, started: float) -> DenseModel:
        """The shipped reference model as the dense model (the same weights for every seed)."""
        kwargs = {"num_classes": self.bundle.num_classes, "input_shape": self.bundle.input_shape}
        model = models.create(self.config.model, pretrained=self.config.dataset,
                              **(kwargs | self.config.model_kwargs))
        row = self.row(model, seed, time.perf_counter() - started)
        row.update(method="dense", label="dense", recovery=None, target_kind=None,
                   target_value=None)
        return DenseModel(model, {}, row)

    def pruner(self, choice: MethodChoice, seed: int) -> Pruner:
        c = self.config
        options = dict(choice.options)
        if "seed" in METHODS.get(choice.method).option_names():
            options.setdefault("seed", seed)  # random draws differ per run seed unless fixed
        calibration = _Limited(
            self.bundle.loader("train", c.finetune.batch_size, shuffle=True, seed=seed),
            c.calibration_batches)
        return Pruner(
            method=choice.method, scope=choice.scope, options=options,
            include=tuple(c.include) if c.include is not None else None,
            exclude=tuple(c.exclude), exclude_first=c.exclude_first,
            exclude_last=c.exclude_last, layer_sparsity=c.layer_sparsity,
            data=calibration if METHODS.get(choice.method).needs_data else None,
        )

    def prune_and_recover(self, dense: DenseModel, choice: MethodChoice, kind: str,
                          value: float, seed: int, recovery: Recovery | None = None
                          ) -> tuple[nn.Module, float | None]:
        """Prune a copy of the dense model to the target following the schedule, then recover.

        Returns the model and, for unstructured methods, the sparsity the target came to.
        """
        run = Run(self, dense, choice, kind, value, seed, self.config.schedule,
                  recovery or self.config.recovery)
        seed_everything(seed)
        model = run.schedule.run(run)
        return run.recovery.finish(model, run), run.sparsity

    def row(self, model: nn.Module, seed: int, seconds: float,
            dense: DenseModel | None = None) -> dict[str, Any]:
        """Test accuracy (every sample), sizes, FLOPs and latency of ``model``.

        With the ``dense`` model it came from, compression and speed-ups are relative to it
        (params / non-zeros and FLOPs / effective FLOPs of the *original* network), which is
        what a model that lost channels needs; measured speed-up compares latencies. The
        achieved sparsity is the masked fraction of prunable weights, or for a model that lost
        channels the fraction of the dense model's parameters that are gone.
        """
        topk = (1, 5) if self.bundle.num_classes > 10 else (1,)
        test = evaluate(model, self.loader("test", 256), topk=topk)
        latency = self.config.latency
        size = measure(model, self.example, latency=latency.enabled,
                       latency_repeats=latency.repeats, latency_threads=latency.threads)
        row: dict[str, Any] = {
            "model": self.config.model,
            "dataset": self.config.dataset,
            "data_source": self.bundle.source,
            "seed": seed,
            "achieved_sparsity": mask_sparsity(model),
            "test_top1": test["top1"],
            "test_loss": test["loss"],
            "test_samples": test["samples"],
        }
        if "top5" in test:
            row["test_top5"] = test["top5"]
        if "perplexity" in test:  # a language model: loss in nats per token, and perplexity
            row["test_perplexity"] = test["perplexity"]
        row.update(size.summary())
        if dense is not None:
            if structure_of(model):  # channels removed, no masks: the parameters removed
                row["achieved_sparsity"] = 1 - size.nonzero_params / dense.row["params"]
                row["round_to"] = str(structure_of(model)[-1].get("round_to", 1))
            row["compression"] = dense.row["params"] / max(size.nonzero_params, 1)
            row["theoretical_speedup"] = dense.row["flops"] / max(size.effective_flops, 1)
            row["dense_top1"] = dense.row["test_top1"]
            row["dense_loss"] = dense.row["test_loss"]
            if row.get("latency_ms") and dense.row.get("latency_ms"):
                row["measured_speedup"] = dense.row["latency_ms"] / row["latency_ms"]
        row["seconds"] = seconds
        return row


@dataclass
class Run:
    """One run in progress: what schedules and recoveries work with.

    The schedule decides when to call :meth:`prune` (and :meth:`resolve_sparsity`) and calls
    ``recovery.between`` after each step; the recovery fine-tunes, rewinds or retrains.
    """

    experiment: Experiment
    dense: DenseModel
    choice: MethodChoice
    target: str
    value: float
    seed: int
    schedule: Schedule
    recovery: Recovery
    sparsity: float | None = None  # the weight sparsity the target came to (unstructured)

    @cached_property
    def method(self) -> type[Method]:
        return METHODS.get(self.choice.method)

    @cached_property
    def pruner(self) -> Pruner:
        return self.experiment.pruner(self.choice, self.seed)

    def trained_copy(self) -> nn.Module:
        """A copy of the trained dense model, to prune."""
        return copy.deepcopy(self.dense.model)

    def resolve_sparsity(self, model: nn.Module) -> float:
        """The weight sparsity that reaches the target (a sparsity, compression or speed-up)."""
        if self.sparsity is None:
            if self.target == "sparsity":
                self.sparsity = check_sparsity(self.value)
            else:
                method = self.method.create(**self.pruner.options)
                self.sparsity = method._sparsity_for(
                    model, self.target, self.value, self.pruner.scope, self.pruner.data,
                    self.pruner.selection(), self.experiment.example)
        return self.sparsity

    def prune(self, model: nn.Module) -> nn.Module:
        """Prune ``model`` to the run's target in one step (structured methods remove
        channels to reach it; unstructured ones mask to the resolved sparsity)."""
        if self.method.granularity != "unstructured":
            return self.pruner(model, self.value, self.target, self.experiment.example)
        self.pruner(model, self.resolve_sparsity(model))
        check_not_cut(model, self.experiment.example,
                      f"{self.choice.name} at {self.target} {self.value:g}")
        return model

    def finetune(self, model: nn.Module) -> None:
        """Fine-tune with the experiment's ``finetune`` recipe."""
        self.experiment.fit(model, self.experiment.config.finetune, self.seed, "finetune")


class _Limited:
    """The first ``n`` batches of a loader's first epoch, the same on every pass (calibration
    data: it must not depend on how many epochs the loader served before)."""

    def __init__(self, batches: Any, n: int):
        self.batches, self.n = batches, n

    def __iter__(self):
        self.batches.set_epoch(0)
        for i, batch in enumerate(self.batches):
            if i >= self.n:
                return
            yield batch

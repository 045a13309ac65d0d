"""One experimental setting and the stages every run goes through.

``prunelab run`` (one method, several sparsities) and ``prunelab sweep`` (a grid of methods ×
targets × seeds × recoveries, in parallel) both use :class:`Experiment`: train the dense model,
prune it with a schedule, recover (fine-tune, rewind, Scratch-E, Scratch-B), evaluate and measure.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch
from pydantic import (
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from torch import nn

from prunelab import data as datasets
from prunelab import models
from prunelab.config import CheckedModel
from prunelab.errors import ConfigError, PrunelabError
from prunelab.methods import METHODS, Method
from prunelab.metrics import evaluate, measure
from prunelab.provenance import config_hash
from prunelab.recoveries import RECOVERIES, Recovery, Snapshot
from prunelab.schedules import SCHEDULES, Pruner, Schedule
from prunelab.sparsity import check_not_cut, check_sparsity, mask_sparsity
from prunelab.strategies import strategy_field
from prunelab.structured.graph import structure_of
from prunelab.tracking import TrackConfig, Tracking
from prunelab.training import PRESETS, Callback, TrainRecipe, TrainState, train
from prunelab.utils import seed_everything

#: Config types accepting any registered schedule / recovery (``{kind: ..., options}``).
ScheduleConfig = strategy_field(SCHEDULES, "one-shot")
RecoveryConfig = strategy_field(RECOVERIES, "finetune")
#: Datasets of token sequences, trained with the language-model presets.
TEXT_DATASETS = ("tinyshakespeare",)


class LatencyConfig(CheckedModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    batch_size: int = Field(1, ge=1)
    repeats: int = Field(30, ge=1)
    threads: int = Field(1, ge=1)


def auto_preset(dataset: str, stage: str) -> str:
    """The CPU-sized recipe preset for ``dataset`` and ``stage`` (``train`` or ``finetune``)."""
    if dataset == "digits":
        return "digits" if stage == "train" else "digits-finetune"
    if "mnist" in dataset:
        return "mnist" if stage == "train" else "cpu-finetune"
    if dataset in TEXT_DATASETS:
        return "char-lm" if stage == "train" else "char-lm-finetune"
    return "cpu-cifar" if stage == "train" else "cpu-finetune"


class ExperimentConfig(CheckedModel):
    """Model, data, recipes, schedule and recovery shared by every run of an experiment."""

    model_config = ConfigDict(extra="forbid")

    model: str = "lenet-300-100"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    dense: Literal["train", "pretrained"] = Field(
        "train", description="train the dense model, or start from the reference weights "
                             "shipped for this model and dataset")
    dataset: str = "digits"
    dataset_options: dict[str, Any] = Field(
        default_factory=dict, description="loader options, e.g. {block_size: 128}")
    data_dir: str | None = None
    val_fraction: float = Field(0.1, ge=0, lt=1)
    data_limit: int | None = Field(None, ge=1, description="samples per split (CPU budgets)")
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    exclude_first: bool = False
    exclude_last: bool = False
    layer_sparsity: dict[str, float] = Field(default_factory=dict)
    calibration_batches: int = Field(8, ge=1)
    schedule: ScheduleConfig = Field(default_factory=lambda: SCHEDULES.get("one-shot")())
    recovery: RecoveryConfig = Field(default_factory=lambda: RECOVERIES.get("finetune")())
    train: TrainRecipe = Field(default_factory=TrainRecipe)
    finetune: TrainRecipe = Field(default_factory=TrainRecipe)
    keep_best: bool = True
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    track: TrackConfig | None = Field(
        None, description="log runs to tensorboard or mlflow (not part of the results' keys)")

    @model_validator(mode="before")
    @classmethod
    def _presets(cls, data: Any) -> Any:
        """``train``/``finetune`` may name a preset; ``auto`` (default) picks one by dataset, or
        for ``dense: pretrained`` the reference model's own training recipe."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        dataset = str(data.get("dataset", "digits"))
        for key in ("train", "finetune"):
            value = data.get(key, "auto")
            if key == "train" and value == "auto" and data.get("dense") == "pretrained":
                # The reference model's own recipe: what Scratch-E/B must match.
                from prunelab.models.pretrained import available

                info = available().get(f"{data.get('model', 'lenet-300-100')}/{dataset}")
                if info is not None:
                    data[key] = info["recipe"]
                    continue
            if isinstance(value, str):
                name = auto_preset(dataset, key) if value == "auto" else value
                if name not in PRESETS:
                    raise ValueError(
                        f"{key}: unknown recipe preset {value!r}; presets: auto, "
                        f"{', '.join(PRESETS)} (or give the recipe's fields)"
                    )
                data[key] = PRESETS[name]
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Leave ``dense`` at its default, empty ``dataset_options`` and no ``track`` out, so
        config hashes (the keys of stored results) stay what they were before those fields
        existed."""
        data = handler(self)
        if data.get("dense") == "train":
            del data["dense"]
        if not data.get("dataset_options"):
            data.pop("dataset_options", None)
        if data.get("track", 0) is None:
            del data["track"]
        return data

    def check_plan(self, choices: Sequence[MethodChoice] = (),
                   recoveries: Sequence[Recovery] = ()) -> None:
        """Fail before any training on what a run would only find out later: unknown names or
        method options, and method/schedule/recovery combinations that cannot work."""
        datasets.check_name(self.dataset)
        models.check_name(self.model)
        if self.track is not None:
            self.track.check()
        if self.dense == "pretrained":
            from prunelab.models.pretrained import entry

            entry(self.model, self.dataset)
        for choice in choices:
            method = METHODS.get(choice.method)
            if self.dense == "pretrained" and training_variant(choice):
                raise ConfigError(f"method {choice.method!r} trains the dense model its own way, "
                                  "so it cannot start from pretrained weights (dense: train)")
            method.create(**choice.options)
            for recovery in list(recoveries) or [self.recovery]:
                self.schedule.check(method, recovery)
                recovery.check(method, self)

    def dense_key(self, seed: int, choice: MethodChoice | None = None) -> str:
        """Identifies the dense model of this setting and seed (its cache file name).

        Methods that train the model before pruning their own way (Network Slimming's sparse
        BN scales) get their own dense model: ``choice`` names it.
        """
        fields = ("model", "model_kwargs", "dense", "dataset", "dataset_options", "val_fraction",
                  "data_limit", "train", "keep_best",
                  "latency")  # latency: its batch size sets the row's FLOPs
        variant = training_variant(choice)
        return config_hash({"dense": self.model_dump(include=set(fields), mode="json"),
                            "seed": seed} | ({"variant": variant} if variant else {}))


class MethodChoice(CheckedModel):
    """A method with its scope and options, e.g. ``{method: taylor, scope: layer}``."""

    model_config = ConfigDict(extra="forbid")
    method: str
    scope: Literal["global", "layer", "er", "erk"] = "global"
    options: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @property
    def name(self) -> str:
        """A readable label: ``magnitude/global`` unless one is given."""
        return self.label or f"{self.method}/{self.scope}"

    def settings(self) -> dict[str, Any]:
        """The options with every unset one at its method's default: what the run keys hash,
        so results are not reused once a method's default changes. Defaults that are not
        plain data (callables) are left out; an unknown method keeps just its options."""
        try:
            defaults = METHODS.get(self.method).defaults()
        except PrunelabError:
            defaults = {}
        plain = (type(None), bool, int, float, str, list, tuple)
        return {n: v for n, v in defaults.items() if isinstance(v, plain)} | self.options


def training_method(choice: MethodChoice | None) -> Method | None:
    """The method whose own training the dense model needs (its callbacks, and the module
    :meth:`~prunelab.methods.base.Method.training_model` gives), or None for plain training."""
    if choice is None:
        return None
    try:
        method = METHODS.get(choice.method).create(**choice.options)
    except PrunelabError:  # a bad option fails the run itself, where it is recorded
        return None
    return method if method.training_callbacks() else None


def training_variant(choice: MethodChoice | None) -> dict[str, Any] | None:
    """The method and options a dense model must be trained with, or None for plain training."""
    if training_method(choice) is None:
        return None
    return {"method": choice.method, "options": choice.settings()}  # type: ignore[union-attr]


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

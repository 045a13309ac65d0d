"""The configuration of an experiment: model, data, recipes, schedule, recovery, and the
methods a run or sweep compares (with the keys their results are stored under).

:class:`~prunelab.experiment.Experiment` runs what :class:`ExperimentConfig` describes; a sweep
(:class:`~prunelab.bench.SweepSpec`) adds the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from prunelab import data as datasets
from prunelab import models
from prunelab.config import CheckedModel
from prunelab.errors import ConfigError, PrunelabError
from prunelab.methods import METHODS, Method
from prunelab.provenance import config_hash
from prunelab.recoveries import RECOVERIES, Recovery
from prunelab.schedules import SCHEDULES
from prunelab.strategies import strategy_field
from prunelab.tracking import TrackConfig
from prunelab.training import PRESETS, TrainRecipe

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
            method.create(**choice.options).check_experiment(self.calibration_batches)
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

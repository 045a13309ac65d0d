"""The main job: train a model, prune it at several sparsities, recover, measure, report.

``prunelab run`` with no arguments runs this on the embedded digits data in seconds; a YAML file
or flags choose the model, dataset, method, schedule and recovery.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from prunelab import data as datasets
from prunelab import models
from prunelab.errors import ConfigError
from prunelab.methods import METHODS
from prunelab.metrics import evaluate, measure
from prunelab.provenance import config_hash, environment
from prunelab.schedules import GradualPruning, Pruner, Snapshot, iterative, one_shot, rewind_weights
from prunelab.sparsity import check_sparsity, mask_sparsity
from prunelab.training import PRESETS, TrainRecipe, train
from prunelab.utils import seed_everything


class ScheduleConfig(BaseModel):
    """When to prune: ``one-shot``, ``iterative`` (geometric rounds) or ``gradual`` (AGP)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["one-shot", "iterative", "gradual"] = "one-shot"
    rounds: int = Field(3, ge=1)
    agp_start: float = Field(0.0, ge=0, lt=1)
    agp_end: float = Field(0.75, gt=0, le=1)
    agp_frequency: int | None = Field(None, ge=1, description="steps between mask updates")


class RecoveryConfig(BaseModel):
    """After pruning: ``finetune``, ``rewind`` (lottery ticket, to epoch k) or ``none``."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["finetune", "rewind", "none"] = "finetune"
    rewind_epoch: int = Field(0, ge=0)


class LatencyConfig(BaseModel):
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
    return "cpu-cifar" if stage == "train" else "cpu-finetune"


class RunConfig(BaseModel):
    """Everything ``prunelab run`` needs; every key has a default (the digits demo)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    model: str = "lenet-300-100"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    val_fraction: float = Field(0.1, ge=0, lt=1)
    method: str = "magnitude"
    method_options: dict[str, Any] = Field(default_factory=dict)
    scope: Literal["global", "layer"] = "global"
    sparsities: list[float] = Field(default_factory=lambda: [0.5, 0.75, 0.9, 0.95])
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    exclude_first: bool = False
    exclude_last: bool = False
    layer_sparsity: dict[str, float] = Field(default_factory=dict)
    calibration_batches: int = Field(8, ge=1)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    train: TrainRecipe = Field(default_factory=TrainRecipe)
    finetune: TrainRecipe = Field(default_factory=TrainRecipe)
    keep_best: bool = True
    seed: int = 0
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    out: str = "runs"

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one sparsity")
        return [check_sparsity(v) for v in value]

    @model_validator(mode="before")
    @classmethod
    def _presets(cls, data: Any) -> Any:
        """``train``/``finetune`` may name a preset; ``auto`` (default) picks one by dataset."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        dataset = str(data.get("dataset", "digits"))
        for key in ("train", "finetune"):
            value = data.get(key, "auto")
            if isinstance(value, str):
                name = auto_preset(dataset, key) if value == "auto" else value
                if name not in PRESETS:
                    raise ValueError(
                        f"{key}: unknown recipe preset {value!r}; presets: auto, "
                        f"{', '.join(PRESETS)} (or give the recipe's fields)"
                    )
                data[key] = PRESETS[name]
        return data

    def check_names(self) -> None:
        """Fail on unknown method/model/dataset names before any training starts."""
        METHODS.get(self.method)
        datasets.check_name(self.dataset)
        models.check_name(self.model)
        if self.schedule.kind == "gradual" and self.recovery.kind != "finetune":
            raise ConfigError("gradual pruning happens while fine-tuning: use recovery finetune")


@dataclass
class RunResult:
    """Rows (one per sparsity, the dense model first), the folder written, and provenance."""

    rows: list[dict[str, Any]]
    folder: Path | None
    environment: dict[str, Any] = field(default_factory=dict)


def run_job(
    config: RunConfig,
    *,
    quiet: bool = False,
    write: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Run the job described by ``config``; write ``results.json`` and ``results.csv``.

    The results folder appears only when everything succeeded (written to a hidden temp folder
    and renamed), so a crash never leaves half a result behind.
    """
    config.check_names()
    train_recipe, finetune_recipe = config.train, config.finetune
    seed_everything(config.seed)
    bundle = datasets.load(config.dataset, config.data_dir, val_fraction=config.val_fraction)
    model_kwargs = dict(num_classes=bundle.num_classes, input_shape=tuple(bundle.input_shape))
    model_kwargs.update(config.model_kwargs)
    model = models.create(config.model, **model_kwargs)
    loaders = _Loaders(bundle, config.seed)
    val = loaders.get("val", train_recipe.batch_size) if len(bundle.val[1]) else None
    keep_best = config.keep_best and val is not None
    topk = (1, 5) if bundle.num_classes > 10 else (1,)

    started = time.perf_counter()
    snapshot = Snapshot(config.recovery.rewind_epoch)
    callbacks = [snapshot] if config.recovery.kind == "rewind" else []
    dense_fit = train(
        model, loaders.get("train", train_recipe.batch_size, shuffle=True), train_recipe,
        val_data=val, callbacks=callbacks, keep_best=keep_best, quiet=quiet,
        description="dense",
    )
    example = bundle.test[0][: config.latency.batch_size].float()
    rows = [_row(config, model, None, bundle, loaders, topk, example, dense_fit.seconds, None)]
    if on_row:
        on_row(rows[0])
    dense_latency = rows[0].get("latency_ms")

    for sparsity in config.sparsities:
        seed_everything(config.seed)
        pruned = copy.deepcopy(model)
        pruner = Pruner(
            method=config.method, scope=config.scope, options=config.method_options,
            include=tuple(config.include) if config.include is not None else None,
            exclude=tuple(config.exclude), exclude_first=config.exclude_first,
            exclude_last=config.exclude_last, layer_sparsity=config.layer_sparsity,
            data=_Limited(loaders.get("train", train_recipe.batch_size, shuffle=True),
                          config.calibration_batches),
        )
        t0 = time.perf_counter()
        recover = _recovery(config, train_recipe, finetune_recipe, loaders, val, keep_best,
                            snapshot, quiet, f"{sparsity:.0%}")
        if config.schedule.kind == "one-shot":
            one_shot(pruned, pruner, sparsity, recover)
        elif config.schedule.kind == "iterative":
            iterative(pruned, pruner, sparsity, config.schedule.rounds, recover)
        else:
            steps = len(loaders.get("train", finetune_recipe.batch_size))
            agp = GradualPruning(
                pruner, sparsity, start=config.schedule.agp_start, end=config.schedule.agp_end,
                frequency=config.schedule.agp_frequency or max(1, steps // 4),
            )
            train(pruned, loaders.get("train", finetune_recipe.batch_size, shuffle=True),
                  finetune_recipe, val_data=val, callbacks=[agp], quiet=quiet,
                  description=f"gradual {sparsity:.0%}")
        row = _row(config, pruned, sparsity, bundle, loaders, topk, example,
                   time.perf_counter() - t0, dense_latency)
        rows.append(row)
        if on_row:
            on_row(row)

    env = environment()
    env["wall_seconds"] = time.perf_counter() - started
    folder = _write_results(config, rows, env) if write else None
    return RunResult(rows=rows, folder=folder, environment=env)


class _Loaders:
    """Batches of the bundle, built once per (split, batch size, shuffle)."""

    def __init__(self, bundle: Any, seed: int):
        self.bundle, self.seed, self._cache = bundle, seed, {}

    def get(self, split: str, batch_size: int, shuffle: bool = False):
        key = (split, batch_size, shuffle)
        if key not in self._cache:
            self._cache[key] = self.bundle.loader(
                split, batch_size, shuffle=shuffle, seed=self.seed, augment=shuffle or None
            )
        return self._cache[key]


class _Limited:
    """The first ``n`` batches of a loader, re-iterable (calibration data)."""

    def __init__(self, batches: Any, n: int):
        self.batches, self.n = batches, n

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i >= self.n:
                return
            yield batch


def _recovery(config, train_recipe, finetune_recipe, loaders, val, keep_best, snapshot, quiet,
              label) -> Callable[[nn.Module], Any] | None:
    kind = config.recovery.kind
    if kind == "none" or config.schedule.kind == "gradual":
        return None
    if kind == "finetune":
        recipe, start = finetune_recipe, 0
    else:
        recipe, start = train_recipe, config.recovery.rewind_epoch
        if start >= recipe.epochs:
            raise ConfigError(
                f"rewind_epoch {start} must be below the training epochs ({recipe.epochs})"
            )

    def recover(model: nn.Module) -> None:
        if kind == "rewind":
            rewind_weights(model, snapshot.state)
        train(model, loaders.get("train", recipe.batch_size, shuffle=True), recipe,
              val_data=val, keep_best=keep_best, start_epoch=start, quiet=quiet,
              description=f"{kind} {label}")

    return recover


def _row(config: RunConfig, model: nn.Module, sparsity: float | None, bundle: Any, loaders: Any,
         topk: tuple[int, ...], example: torch.Tensor, seconds: float,
         dense_latency: float | None) -> dict[str, Any]:
    test = evaluate(model, loaders.get("test", 256), topk=topk)
    size = measure(model, example, latency=config.latency.enabled,
                   latency_repeats=config.latency.repeats, latency_threads=config.latency.threads)
    row: dict[str, Any] = {
        "method": "dense" if sparsity is None else config.method,
        "scope": None if sparsity is None else config.scope,
        "schedule": None if sparsity is None else config.schedule.kind,
        "recovery": None if sparsity is None else config.recovery.kind,
        "model": config.model,
        "dataset": config.dataset,
        "seed": config.seed,
        "target_sparsity": sparsity or 0.0,
        "achieved_sparsity": mask_sparsity(model),
        "test_top1": test["top1"],
        "test_loss": test["loss"],
        "test_samples": test["samples"],
    }
    if "top5" in test:
        row["test_top5"] = test["top5"]
    row.update(size.summary())
    if dense_latency and "latency_ms" in row:
        row["measured_speedup"] = dense_latency / row["latency_ms"]
    row["seconds"] = seconds
    return row


def _write_results(config: RunConfig, rows: list[dict], env: dict) -> Path:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    digest = config_hash(config)
    final = out / f"{config.name}-{stamp}-{digest}"
    n = 1
    while final.exists():
        n += 1
        final = out / f"{config.name}-{stamp}-{digest}-{n}"
    tmp = out / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        payload = {
            "config": config.model_dump(mode="json"),
            "config_hash": digest,
            "environment": env,
            "rows": rows,
        }
        (tmp / "results.json").write_text(json.dumps(payload, indent=2, default=str))
        with open(tmp / "results.csv", "w", newline="") as handle:
            columns = list(dict.fromkeys(key for row in rows for key in row))
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final

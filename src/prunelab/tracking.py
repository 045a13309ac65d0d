"""Experiment tracking: a run's config, provenance, per-epoch and final metrics, logged to
TensorBoard event files or an MLflow tracking store, where users already look at their runs.

Tracking is optional (``pip install 'prunelab[track]'``) and is not part of an experiment's
identity: it never changes a result's key or config hash. A :class:`Tracker` is one tracked run;
:class:`Tracking` feeds it from the train loop (a :class:`~prunelab.training.Callback` per
training phase, metrics named ``<phase>/<metric>``) and from the results (``final/<metric>``).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from pydantic import ConfigDict, Field, field_validator, model_validator

from prunelab.config import CheckedModel
from prunelab.errors import ConfigError, did_you_mean
from prunelab.training import Callback, TrainState
from prunelab.utils import missing_packages

#: The trackers, and the modules each needs (all installed by ``prunelab[track]``).
TRACKERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),
}
#: MLflow URI schemes served without a local SQL store (the rest need SQLAlchemy and Alembic).
_REMOTE_SCHEMES = ("http", "https", "databricks", "file")
INSTALL_HINT = "pip install 'prunelab[track]'"


class TrackConfig(CheckedModel):
    """Where to log runs: ``tensorboard`` or ``mlflow``, and optionally where to.

    ``uri`` is TensorBoard's log folder (one sub-folder per run; default ``<out>/tensorboard``)
    or an MLflow tracking URI (default ``$MLFLOW_TRACKING_URI``, else the SQLite store
    ``<out>/mlflow.db``). A bare name stands for ``{backend: name}``.
    """

    model_config = ConfigDict(extra="forbid")
    backend: str
    uri: str | None = Field(None, description="TensorBoard log folder or MLflow tracking URI")
    experiment: str | None = Field(
        None, description="MLflow experiment (default: the run's or sweep's name)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"backend": data} if isinstance(data, str) else data

    @field_validator("backend")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in TRACKERS:
            raise ValueError(f"unknown tracker {value!r}.{did_you_mean(value, TRACKERS)} "
                             f"Trackers: {', '.join(TRACKERS)} ({INSTALL_HINT})")
        return value

    def check(self) -> None:
        """Fail before any training when the tracker's packages are not installed."""
        needed = list(TRACKERS[self.backend])
        if self.backend == "mlflow" and _scheme(self.uri) not in _REMOTE_SCHEMES:
            needed += ["sqlalchemy", "alembic"]  # a local SQLite (or other database) store
        missing = missing_packages(*needed)
        if missing:
            raise ConfigError(f"tracking with {self.backend} needs {', '.join(missing)}, which "
                              f"is not installed: {INSTALL_HINT}")

    def resolved(self, out: str | os.PathLike, experiment: str) -> TrackConfig:
        """The config with its defaults filled in and local paths made absolute, so that
        worker processes (and Ray workers elsewhere) log to the same place."""
        uri = self.uri
        if self.backend == "tensorboard":
            uri = str(Path(uri or Path(out) / "tensorboard").resolve())
        elif uri is None:
            uri = (os.environ.get("MLFLOW_TRACKING_URI")
                   or f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}")
        return self.model_copy(update={"uri": uri, "experiment": self.experiment or experiment})


def _scheme(uri: str | None) -> str:
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:")
    return uri.partition(":")[0] if "://" in uri or uri.startswith("sqlite:") else "file"


class Tracker(Protocol):
    """One tracked run in a tracking backend."""

    def start(self, config: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
        """Record what the run is (its config) and what produced it (versions, commit, host)."""

    def log_epoch(self, phase: str, metrics: Mapping[str, Any], step: int) -> None:
        """Record one epoch of a training phase as ``<phase>/<metric>`` at ``step``."""

    def log_final(self, metrics: Mapping[str, Any]) -> None:
        """Record the run's results (already named, e.g. ``final/test_top1``)."""

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Close the run: ``FINISHED``, or ``FAILED`` with the error."""


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` (not flags, names or missing values)."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config as ``a.b.c`` keys with scalar values (lists and nulls as JSON text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{name}.")
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


def safe_name(text: str) -> str:
    """``text`` usable as a folder name and an MLflow run name."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "run"


class TensorBoardTracker:
    """Event files in ``<uri>/<name>``: scalars per phase and epoch, config and provenance as
    text, and the flattened config with the final metrics in the HParams dashboard."""

    def __init__(self, track: TrackConfig, name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(track.uri or "runs/tensorboard") / name))
        self.hparams: dict[str, Any] = {}
        self.final: list[str] = []

    def start(self, config: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
        self.hparams = flatten(config)
        for tag, value in (("config", config), ("provenance", provenance)):
            self.writer.add_text(tag, f"```\n{json.dumps(value, indent=2, default=str)}\n```")
        self.writer.flush()

    def log_epoch(self, phase: str, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in numeric(metrics).items():
            self.writer.add_scalar(f"{phase}/{key}", value, step)

    def log_final(self, metrics: Mapping[str, Any]) -> None:
        for key, value in numeric(metrics).items():
            self.writer.add_scalar(key, value, 0)
            self.final.append(key)

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        from torch.utils.tensorboard.summary import hparams

        # The HParams dashboard: the run's config beside its final metrics (scalars logged).
        for summary in hparams(self.hparams, dict.fromkeys(self.final, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("status", status + (f": {error}" if error else ""))
        self.writer.close()


class MlflowTracker:
    """A run in an MLflow experiment: config as params, provenance as tags, metrics with steps."""

    def __init__(self, track: TrackConfig, name: str):
        self.client, experiment_id = mlflow_experiment(track)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id

    def _batch(self, metrics: Mapping[str, float] | None = None, step: int = 0,
               params: Mapping[str, Any] | None = None,
               tags: Mapping[str, Any] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        metric_list = [Metric(k, v, now, step) for k, v in (metrics or {}).items()]
        param_list = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, str(v)[:8000]) for k, v in (tags or {}).items()]
        for i in range(0, max(len(param_list), len(tag_list), 1), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metric_list if i == 0 else [],
                                  params=param_list[i:i + 100], tags=tag_list[i:i + 100])

    def start(self, config: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
        tags = {f"prunelab.{k}": v for k, v in provenance.items() if v is not None}
        if provenance.get("git_commit"):
            tags["mlflow.source.git.commit"] = provenance["git_commit"]
        self._batch(params=flatten(config), tags=tags)

    def log_epoch(self, phase: str, metrics: Mapping[str, Any], step: int) -> None:
        self._batch({f"{phase}/{k}": v for k, v in numeric(metrics).items()}, step)

    def log_final(self, metrics: Mapping[str, Any]) -> None:
        self._batch(numeric(metrics))

    def end(self, status: str = "FINISHED", error: str | None = None) -> None:
        if error:
            self._batch(tags={"prunelab.error": error})
        self.client.set_terminated(self.run_id, status)


def mlflow_experiment(track: TrackConfig) -> tuple[Any, str]:
    """A client of ``track.uri`` and the id of its experiment, created if missing (sweeps call
    this once before starting workers, so that they do not race to create it)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name = track.experiment or "prunelab"
    if track.uri and track.uri.startswith("sqlite:///"):  # SQLite makes the file, not its folder
        Path(track.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MlflowClient(tracking_uri=track.uri)
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return client, client.create_experiment(name)
            except MlflowException:  # created meanwhile by another process
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
        return client, found.experiment_id
    except MlflowException as exc:
        raise ConfigError(f"the MLflow tracking store {track.uri!r} cannot be used: "
                          f"{exc.message}") from None


def prepare_tracking(track: TrackConfig) -> None:
    """Make the destination ready before workers log to it: check the packages, and for MLflow
    create the store and the experiment (workers would race to)."""
    track.check()
    if track.backend == "mlflow":
        mlflow_experiment(track)


def open_tracker(track: TrackConfig, name: str) -> Tracker:
    """A new tracked run named ``name``, ``track`` resolved (:meth:`TrackConfig.resolved`)."""
    track.check()
    return (TensorBoardTracker if track.backend == "tensorboard" else MlflowTracker)(
        track, safe_name(name))


class _EpochLogger(Callback):
    def __init__(self, tracking: Tracking, phase: str):
        self.tracking, self.phase = tracking, phase

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        self.tracking.log_epoch(self.phase, metrics)


class Tracking:
    """A tracked run in progress, or nothing when tracking is off (``tracker`` None).

    Each training phase (``dense``, ``finetune``, ``rewind``...) logs under its own name, behind
    ``prefix`` when one run holds several pruned models (``sparsity-0.9/finetune``); its steps
    count the phase's epochs, continuing when the phase trains again (iterative rounds).
    """

    def __init__(self, tracker: Tracker | None = None):
        self.tracker = tracker
        self.prefix = ""
        self._steps: Counter[str] = Counter()

    def _name(self, name: str) -> str:
        """``name`` behind the prefix, in characters every backend takes in a metric name
        (``sparse-train (rigl)`` -> ``sparse-train-rigl``)."""
        name = re.sub(r"[^\w./-]+", "-", name).strip("-")
        return f"{self.prefix}/{name}" if self.prefix else name

    def callbacks(self, phase: str) -> list[Callback]:
        """The callbacks that log the epochs of ``phase`` (none when tracking is off)."""
        return [_EpochLogger(self, self._name(phase))] if self.tracker else []

    def log_epoch(self, phase: str, metrics: Mapping[str, Any]) -> None:
        if self.tracker:
            self._steps[phase] += 1
            self.tracker.log_epoch(phase, metrics, self._steps[phase])

    def log_final(self, metrics: Mapping[str, Any], row: str = "") -> None:
        """Results as ``final/<metric>``, or ``final/<row>/<metric>`` when one run holds
        several rows (``final/sparsity-0.9/test_top1``)."""
        if self.tracker:
            where = f"final/{row}/" if row else "final/"
            self.tracker.log_final({where + k: v for k, v in metrics.items() if k != "seed"})


@contextmanager
def tracked(track: TrackConfig | None, name: str, config: Mapping[str, Any],
            provenance: Mapping[str, Any]) -> Iterator[Tracking]:
    """A tracked run around the block (``FAILED`` with the error if it raises); with ``track``
    None, a :class:`Tracking` that logs nothing."""
    if track is None:
        yield Tracking()
        return
    tracker = open_tracker(track, name)
    tracker.start(config, provenance)
    try:
        yield Tracking(tracker)
    except BaseException as exc:
        tracker.end("FAILED", f"{type(exc).__name__}: {exc}")
        raise
    tracker.end()

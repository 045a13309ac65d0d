"""What runs in a worker process (local pool or Ray): train a dense model, or do one run.

Tasks and results are plain dicts so they cross process and machine boundaries. Dense models are
cached as checkpoint files in the results folder (for Ray clusters that folder must be on storage
every node can reach); a file lock keeps two workers from training the same one at once.
"""

from __future__ import annotations

import fcntl
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from prunelab.bench.spec import RunSpec, SweepSpec
from prunelab.checkpoint import load_state_dict, read_checkpoint, save_checkpoint
from prunelab.errors import PrunelabError, is_disk_full
from prunelab.experiment import DenseModel, Experiment
from prunelab.experiment_config import MethodChoice
from prunelab.provenance import config_hash, environment
from prunelab.tracking import Tracker, Tracking, open_tracker

_experiments: dict[str, Experiment] = {}  # per worker process: data stays loaded between runs


def ignore_progress(key: str, text: str) -> None:
    """Default progress sink: no display attached."""


_report: Callable[[str, str], None] = ignore_progress


def set_progress(report: Callable[[str, str], None], every: float = 0.5) -> None:
    """Route phase messages ``(task key, text)`` to the sweep's display, at most one per
    ``every`` seconds per task (sending one can cost a round trip, as with Ray's queue)."""
    global _report
    last: dict[str, float] = {}

    def throttled(key: str, text: str) -> None:
        now = time.monotonic()
        if now - last.get(key, -every) >= every:
            last[key] = now
            report(key, text)

    _report = throttled


def _experiment(spec: SweepSpec, key: str, tracking: Tracking) -> Experiment:
    digest = config_hash(spec.experiment_fields() | {"data_dir": spec.data_dir})
    if digest not in _experiments:
        _experiments[digest] = Experiment(spec)
    experiment = _experiments[digest]
    experiment.on_phase = lambda text: _report(key, text)
    experiment.tracking = tracking
    return experiment


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_or_train_dense(out: Path, spec: SweepSpec, seed: int, key: str,
                        choice: MethodChoice | None = None,
                        tracking: Tracking | None = None) -> tuple[DenseModel, bool]:
    """The cached dense model of ``seed`` (trained and cached first if missing); ``choice``
    selects a method's own dense training (e.g. Network Slimming's), if it has one."""
    path = out / "dense" / f"{spec.dense_key(seed, choice)}.pt"
    needed = spec.snapshot_epochs()
    experiment = _experiment(spec, key, tracking or Tracking())
    with _locked(path.with_suffix(".lock")):
        if path.is_file():
            payload = read_checkpoint(path)
            saved = payload["extra"].get("snapshots")
            snapshots = {int(e): s for e, s in (saved or {}).items()}
            if saved is not None and "row" in payload["extra"] and needed <= set(snapshots):
                model = load_state_dict(experiment.new_model(seed, choice),
                                        payload["state_dict"])
                return DenseModel(model, snapshots, payload["extra"]["row"]), False
        dense = experiment.train_dense(seed, needed, choice)
        snapshots = {str(e): s for e, s in dense.snapshots.items()}
        save_checkpoint(path, dense.model, model_name=spec.model,
                        extra={"row": dense.row, "snapshots": snapshots})
        return dense, True


def execute(task: dict[str, Any]) -> dict[str, Any]:
    """Run one task; never raises: a failure becomes a row with ``status = "failed"``.

    Besides the store's columns, a failed row says whether the error was a bad input
    (``user_error``: a ``PrunelabError``) and whether the disk is full (``disk_full``), and
    holds the plain ``message``; the store keeps only its columns.
    """
    started = time.perf_counter()
    spec = SweepSpec.model_validate(task["spec"])
    threads = task.get("threads")
    if threads:
        torch.set_num_threads(threads)
    tracker = None
    try:
        tracker = _start_tracking(spec, task)
        tracking = Tracking(tracker)
        if task["kind"] == "dense":
            choice = MethodChoice.model_validate(task["choice"]) if task.get("choice") else None
            dense, _ = load_or_train_dense(Path(task["out"]), spec, task["seed"], task["key"],
                                           choice, tracking)
            row = dense.row | {"config_json": _dense_config(spec, task)}
        else:
            row = _run(Path(task["out"]), spec, RunSpec.model_validate(task["run"]), task["key"],
                       tracking)
        row["status"] = "ok"
        tracking.log_final(row)
        if tracker is not None:
            tracker.end()
    except Exception as exc:  # recorded, and the sweep goes on
        row = {"status": "failed", "error": _describe(exc),
               "message": str(exc) or type(exc).__name__,
               "user_error": isinstance(exc, PrunelabError), "disk_full": is_disk_full(exc)}
        if task["kind"] == "run":
            row |= _run_fields(spec, RunSpec.model_validate(task["run"]))
        row.setdefault("seconds", time.perf_counter() - started)
        if tracker is not None:
            with suppress(Exception):  # the failure is what is recorded, not the tracker's
                tracker.end("FAILED", row["error"])
    return _with_provenance(task, spec, row)


def _dense_config(spec: SweepSpec, task: dict[str, Any]) -> dict[str, Any]:
    return spec.experiment_fields() | {"seed": task["seed"],
                                       "training_variant": task.get("choice")}


def trial_name(task: dict[str, Any]) -> str:
    """A tracked trial's name: what it runs and the start of its key."""
    if task["kind"] == "dense":
        variant = f"-{task['choice']['method']}" if task.get("choice") else ""
        return f"dense{variant}_seed{task['seed']}_{task['key'].removeprefix('dense-')[:8]}"
    run = RunSpec.model_validate(task["run"])
    return (f"{run.choice.name}_{run.recovery.label()}_{run.target_kind}-{run.target_value:g}"
            f"_seed{run.seed}_{task['key'][:8]}")


def _start_tracking(spec: SweepSpec, task: dict[str, Any]) -> Tracker | None:
    """The trial's tracked run (each worker logs its own trials), if the spec tracks."""
    if spec.track is None:
        return None
    tracker = open_tracker(spec.track, trial_name(task))
    config = (_dense_config(spec, task) if task["kind"] == "dense" else
              _run_fields(spec, RunSpec.model_validate(task["run"]))["config_json"])
    tracker.start(config, environment() | {"run_key": task["key"], "sweep": spec.name})
    return tracker


def not_run(task: dict[str, Any], dense_row: dict[str, Any]) -> dict[str, Any]:
    """The failed row of a run that is not attempted because its dense model failed."""
    spec = SweepSpec.model_validate(task["spec"])
    message = f"not run: its dense model failed: {dense_row.get('message')}"
    row = {"status": "failed", "error": message, "message": message, "seconds": 0.0,
           "user_error": dense_row.get("user_error", False)}
    return _with_provenance(task, spec, row | _run_fields(spec, RunSpec.model_validate(
        task["run"])))


def _with_provenance(task: dict[str, Any], spec: SweepSpec, row: dict[str, Any]
                     ) -> dict[str, Any]:
    env = environment()
    return row | {"run_key": task["key"], "sweep": spec.name, "config_hash": task["key"],
                  "threads": torch.get_num_threads(), "host": socket.gethostname(),
                  "environment_json": env, "git_commit": env["git_commit"],
                  "finished_at": env["time_utc"]}


def _run_fields(spec: SweepSpec, run: RunSpec) -> dict[str, Any]:
    return {
        "method": run.choice.method, "label": run.choice.name, "scope": run.choice.scope,
        "schedule": spec.schedule.label(), "recovery": run.recovery.label(), "seed": run.seed,
        "model": spec.model, "dataset": spec.dataset, "target_kind": run.target_kind,
        "target_value": run.target_value,
        "config_json": {"experiment": spec.experiment_fields(), "run": run.model_dump()},
    }


def _run(out: Path, spec: SweepSpec, run: RunSpec, key: str,
         tracking: Tracking) -> dict[str, Any]:
    started = time.perf_counter()
    dense, _ = load_or_train_dense(out, spec, run.seed, key, spec.variant_of(run), tracking)
    experiment = _experiment(spec, key, tracking)
    _report(key, "pruning")
    model, sparsity = experiment.prune_and_recover(dense, run.choice, run.target_kind,
                                                   run.target_value, run.seed, run.recovery)
    _report(key, "measuring")
    row = experiment.row(model, run.seed, time.perf_counter() - started, dense)
    return row | _run_fields(spec, run) | {"target_sparsity": sparsity}


def _describe(exc: BaseException) -> str:
    """The error and where it happened (last frames), short enough for a table cell."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames)
    return f"{type(exc).__name__}: {exc} [{where}]"

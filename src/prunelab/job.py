"""The main job: train a model, prune it at several sparsities, recover, measure, report.

``prunelab run`` with no arguments runs this on the embedded digits data in seconds; a YAML file
or flags choose the model, dataset, method, schedule and recovery.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from prunelab.errors import ConfigError
from prunelab.experiment import Experiment
from prunelab.experiment_config import ExperimentConfig, MethodChoice
from prunelab.provenance import config_hash, environment
from prunelab.recoveries import Recovery
from prunelab.sparsity import check_sparsity
from prunelab.tracking import tracked


class RunConfig(ExperimentConfig):
    """Everything ``prunelab run`` needs; every key has a default (the digits demo)."""

    name: str = "run"
    method: str = "magnitude"
    method_options: dict[str, Any] = Field(default_factory=dict)
    scope: Literal["global", "layer", "er", "erk"] = "global"
    sparsities: list[float] = Field(default_factory=lambda: [0.5, 0.75, 0.9, 0.95])
    seed: int = 0
    out: str = "runs"

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one sparsity")
        return [check_sparsity(v) for v in value]

    @property
    def choice(self) -> MethodChoice:
        return MethodChoice(method=self.method, scope=self.scope, options=self.method_options)

    def check_plan(self, choices: Sequence[MethodChoice] = (),
                   recoveries: Sequence[Recovery] = ()) -> None:
        super().check_plan([self.choice, *choices], recoveries)


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
    and renamed), so a crash never leaves half a result behind. With ``config.track`` the job is
    one tracked run: phases ``dense`` and ``sparsity-<s>/<phase>``, results ``final/<row>/...``.
    """
    config.check_plan()
    if write:
        _check_out(Path(config.out))
    started = time.perf_counter()
    experiment = Experiment(config, quiet=quiet)
    choice = config.choice
    digest = run_hash(config)
    track = config.track.resolved(config.out, config.name) if config.track else None
    with tracked(track, f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{digest}",
                 config.model_dump(mode="json"), environment() | {"config_hash": digest}
                 ) as tracking:
        experiment.tracking = tracking
        dense = experiment.train_dense(config.seed, config.recovery.snapshot_epochs(), choice)
        rows = [dense.row | {"target_sparsity": 0.0}]
        tracking.log_final(rows[0], "dense")
        if on_row:
            on_row(rows[0])
        for sparsity in config.sparsities:
            t0 = time.perf_counter()
            tracking.prefix = f"sparsity-{sparsity:g}"
            pruned, _ = experiment.prune_and_recover(dense, choice, "sparsity", sparsity,
                                                     config.seed)
            row = experiment.row(pruned, config.seed, time.perf_counter() - t0, dense)
            row.update(method=config.method, scope=config.scope, schedule=config.schedule.kind,
                       recovery=config.recovery.label(), target_sparsity=sparsity)
            rows.append(row)
            tracking.log_final(row, tracking.prefix)
            if on_row:
                on_row(row)
        env = environment()
        env["wall_seconds"] = time.perf_counter() - started
        folder = _write_results(config, rows, env) if write else None
    return RunResult(rows=rows, folder=folder, environment=env)


def _check_out(out: Path) -> None:
    """Fail before training if the results folder cannot be made or written. Nothing is created
    yet: a run that fails leaves no (empty) folder behind."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {str(out)!r} is a file; give a folder for the results")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create the results folder {str(out)!r}: "
                          f"{str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"the results folder {str(out)!r} is not writable"
                          + (f" (nor is {str(existing)!r})" if existing != out else ""))


def run_hash(config: RunConfig) -> str:
    """The hash naming a run's results: its settings, not where its data or results live."""
    return config_hash(config.model_dump(mode="json", exclude={"out", "data_dir", "track"}))


def _write_results(config: RunConfig, rows: list[dict], env: dict) -> Path:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    digest = run_hash(config)
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

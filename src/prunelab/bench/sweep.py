"""``prunelab sweep``: run a grid of runs in parallel, resumably, into one results store."""

from __future__ import annotations

import os
import sqlite3
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from prunelab.bench import worker
from prunelab.bench.executors import (
    InlineExecutor,
    LocalExecutor,
    RayExecutor,
    default_threads,
)
from prunelab.bench.spec import RunSpec, SweepSpec
from prunelab.bench.store import Claimant, Heartbeat, ResultStore
from prunelab.config import load_config
from prunelab.errors import ConfigError, DiskFullError, InvalidValueError
from prunelab.tracking import prepare_tracking
from prunelab.utils import progress_enabled, write_atomically

STORE = "results.sqlite"


@dataclass
class SweepSummary:
    """What a sweep did. ``elsewhere``: runs left to another sweep process on the same folder
    (finished or claimed by it); ``errors``: each distinct error of the failed runs, with its
    count; ``user_errors``: every failure was a bad input (a ``PrunelabError``)."""

    total: int
    skipped: int
    ok: int
    failed: int
    seconds: float
    store: Path
    elsewhere: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    user_errors: bool = False


def plan(spec: SweepSpec, store: ResultStore, out: Path, threads: int) -> tuple[list, list, int]:
    """Tasks still to do: dense models (with their baseline rows), then runs. And how many
    runs were already done."""
    done = store.done()
    runs = [(spec.run_key(r), r) for r in spec.runs()]
    todo = [(k, r) for k, r in runs if k not in done]
    common = {"spec": spec.model_dump(mode="json"), "out": str(out), "threads": threads}
    needed: dict[str, dict] = {}  # dense models still to train (or load), by key
    for seed in spec.grid.seeds:
        for variant in spec.dense_variants():
            key = spec.dense_run_key(seed, variant)
            wanted = key not in done or any(
                r.seed == seed and spec.dense_run_key(seed, spec.variant_of(r)) == key
                for _, r in todo)
            if wanted:
                needed[key] = {"kind": "dense", "key": key, "seed": seed,
                               "choice": variant.model_dump(mode="json") if variant else None}
    dense = [common | task for task in needed.values()]
    tasks = [common | {"kind": "run", "key": k, "run": r.model_dump(mode="json")}
             for k, r in todo]
    return dense, tasks, len(runs) - len(todo)


def run_sweep(
    spec: SweepSpec,
    out: str | os.PathLike,
    *,
    jobs: int = 1,
    executor: str = "local",
    address: str | None = None,
    quiet: bool = False,
    console: Console | None = None,
) -> SweepSummary:
    """Run every missing run of ``spec`` into ``out/results.sqlite`` and return a summary.

    Dense models are trained once per seed and cached in ``out/dense``; finished runs are skipped,
    failed ones retried. ``jobs`` runs go in parallel, each with cores/jobs torch threads.
    Several sweeps started on one folder split the runs between them (each run is claimed in the
    store before it starts). The runs of a dense model that failed are not attempted (they would
    retrain it and fail again); a full disk stops the sweep at once with
    :class:`DiskFullError`. With ``spec.track`` every task (a dense model or a run) is one
    tracked run, logged by the worker that runs it.
    """
    if jobs < 1:
        raise InvalidValueError(f"--jobs must be at least 1, got {jobs}")
    if executor not in ("local", "ray"):
        raise InvalidValueError(f"executor must be local or ray, got {executor!r}")
    spec.check_plan()
    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = spec.threads or default_threads(jobs)
    started = time.perf_counter()
    with ResultStore(out / STORE) as store:
        _write_spec(spec, out, store)
        if spec.track is not None:  # one destination for every worker, made ready once here
            spec = spec.model_copy(update={"track": spec.track.resolved(out, spec.name)})
            prepare_tracking(spec.track)
        dense, tasks, skipped = plan(spec, store, out, threads)
        if not quiet:
            console.print(f"sweep {spec.name!r}: {skipped + len(tasks)} runs, {skipped} already "
                          f"done, {len(tasks)} to run ({len(dense)} dense models first); "
                          f"{jobs} job(s) x {threads} thread(s), {executor} executor",
                          markup=False)
        if not dense and not tasks:
            return SweepSummary(skipped, skipped, 0, 0, 0.0, out / STORE)
        if executor == "ray":
            pool = RayExecutor(jobs, threads, address)
        else:
            pool = InlineExecutor() if jobs == 1 else LocalExecutor(jobs)
        tally = _Tally(spec)
        owner = Claimant()
        display = _Display(console, len(dense) + len(tasks), quiet)
        aborted = False
        try:
            with display, Heartbeat(out / STORE, owner):
                pending = [*dense, *tasks]
                while pending:
                    elsewhere = tally.run(pool, store, owner, display, pending)
                    # Tasks another sweep process held: take over those it abandoned (killed).
                    pending = elsewhere if len(elsewhere) < len(pending) else []
                    tally.elsewhere = len([t for t in elsewhere if t["kind"] == "run"])
        except BaseException:
            aborted = True
            raise
        finally:
            pool.close(wait=not aborted)
            with suppress(sqlite3.Error):  # e.g. a full disk: the claims lapse by themselves
                store.release_all(owner)
    return SweepSummary(skipped + len(tasks), skipped, tally.ok, tally.failed,
                        time.perf_counter() - started, out / STORE, tally.elsewhere,
                        dict(tally.errors.most_common()),
                        tally.failed > 0 and tally.user_errors == tally.failed)


class _Tally:
    """Runs tasks through an executor into the store and counts what happened."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.ok = self.failed = self.user_errors = self.elsewhere = 0
        self.errors: Counter[str] = Counter()
        self.failed_dense: dict[str, dict] = {}  # dense key -> its failed row

    def run(self, pool, store: ResultStore, owner: Claimant, display: _Display,
            tasks: list[dict]) -> list[dict]:
        """Run ``tasks`` (dense ones first); returns those left to another sweep process."""
        elsewhere = []
        for phase in ([t for t in tasks if t["kind"] == "dense"],
                      [t for t in tasks if t["kind"] == "run"]):
            runnable = []
            for task in phase:
                dense_row = self.failed_dense.get(self._dense_of(task))
                if dense_row is None:
                    runnable.append(task)
                elif store.claim(task["key"], owner):  # its dense model failed: not attempted
                    self.record(store, owner, display, task, worker.not_run(task, dense_row))
                else:
                    elsewhere.append(task)
            results = pool.run(runnable, lambda: display.phases(pool.drain()),
                               lambda task: store.claim(task["key"], owner))
            for task, row in results:
                if row is None:
                    elsewhere.append(task)
                else:
                    self.record(store, owner, display, task, row)
        return elsewhere

    def _dense_of(self, task: dict) -> str | None:
        """The key of the dense model a run starts from."""
        if task["kind"] != "run":
            return None
        run = RunSpec.model_validate(task["run"])
        return self.spec.dense_run_key(run.seed, self.spec.variant_of(run))

    def record(self, store: ResultStore, owner: Claimant, display: _Display, task: dict,
               row: dict) -> None:
        row = {"run_key": task["key"], **row}
        store.put(row)
        store.release(task["key"], owner)
        display.finished(task, row)
        if row.get("disk_full"):
            raise DiskFullError(
                f"no space left on device: {row.get('message')}. The sweep stopped; free some "
                "space and run the same command again to finish what is missing")
        if row["status"] != "ok" and task["kind"] == "dense":
            self.failed_dense[task["key"]] = row
        if task["kind"] == "run":
            self.ok += row["status"] == "ok"
            if row["status"] != "ok":
                self.failed += 1
                self.user_errors += bool(row.get("user_error"))
                self.errors[str(row.get("message") or row.get("error"))] += 1


def _write_spec(spec: SweepSpec, out: Path, store: ResultStore) -> None:
    """Keep the spec next to its results as ``spec-<name>.yaml`` (atomically written).

    One folder may hold several sweeps, told apart by name in the store and the report; a
    sweep whose name is taken by a different experiment there is refused. The name is claimed
    in the store, so of two such sweeps started together exactly one goes ahead.
    """
    path = out / f"spec-{spec.name}.yaml"
    taken = path.is_file() and (load_config(SweepSpec, path).experiment_fields()
                                != spec.experiment_fields())
    if taken or not store.claim_sweep_name(spec.name, spec.experiment_fields()):
        raise ConfigError(
            f"{str(out)!r} already holds a sweep named {spec.name!r} with another "
            f"experiment (model, data or recipes differ); give this one another name "
            f"or another --out folder")
    write_atomically(path, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))


def saved_specs(folder: Path) -> dict[str, SweepSpec]:
    """The specs of the sweeps run into ``folder``, by name."""
    specs = (load_config(SweepSpec, path) for path in sorted(folder.glob("spec-*.yaml")))
    return {spec.name: spec for spec in specs}


def spec_keys(spec: SweepSpec) -> set[str]:
    """The store keys of a spec's rows: its runs and its dense models."""
    keys = {spec.run_key(run) for run in spec.runs()}
    keys |= {spec.dense_run_key(seed, variant) for seed in spec.grid.seeds
             for variant in spec.dense_variants()}
    return keys


class _Display:
    """Overall progress (done/total, ETA), the phase of each run in flight, a line per run."""

    def __init__(self, console: Console, total: int, quiet: bool):
        self.console, self.quiet = console, quiet
        self.live = progress_enabled(quiet) and console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
            "{task.total}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
            transient=True, disable=not self.live,
        )
        self.overall = self.progress.add_task("sweep", total=total)
        self.running: dict[str, int] = {}

    def __enter__(self) -> _Display:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def phases(self, messages: list[tuple[str, str]]) -> None:
        for key, text in messages:
            if key not in self.running:
                self.running[key] = self.progress.add_task(f"  {key[:10]}", total=None)
            self.progress.update(self.running[key], description=f"  {key[:10]} {text}")

    def finished(self, task: dict, row: dict) -> None:
        self.progress.advance(self.overall)
        if task["key"] in self.running:
            self.progress.remove_task(self.running.pop(task["key"]))
        if self.quiet:
            return
        what = ("dense" if task["kind"] == "dense" else
                f"{row.get('label')} {row.get('recovery')} {row.get('target_kind')}="
                f"{row.get('target_value')}")
        seed = task.get("seed", task.get("run", {}).get("seed"))
        if row["status"] == "ok":
            quality = (f"loss {row['test_loss']:.3f} nats/token"
                       if row.get("test_perplexity") is not None
                       else f"top-1 {row['test_top1']:.2f}%")
            self.console.print(f"ok     {what} seed {seed}: {quality} "
                               f"({row.get('seconds', 0):.1f} s)", markup=False)
        else:
            self.console.print(f"FAILED {what} seed {seed}: {row.get('error')}", markup=False)

"""The results store: one SQLite file, one row per run.

SQLite in WAL mode with a busy timeout lets several processes (two sweeps on one folder, or
``prunelab results`` while a sweep runs) read and write safely. Each row is written in one
statement, so a crash leaves either the whole row or nothing. A finished (``ok``) row is never
replaced; a failed one is, when the run is retried.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunelab.errors import InvalidValueError

COLUMNS: dict[str, str] = {
    "run_key": "TEXT PRIMARY KEY",
    "sweep": "TEXT",
    "status": "TEXT NOT NULL",
    "method": "TEXT",
    "label": "TEXT",
    "scope": "TEXT",
    "schedule": "TEXT",
    "recovery": "TEXT",
    "model": "TEXT",
    "dataset": "TEXT",
    "data_source": "TEXT",
    "seed": "INTEGER",
    "target_kind": "TEXT",
    "target_value": "REAL",
    "target_sparsity": "REAL",
    "achieved_sparsity": "REAL",
    "test_top1": "REAL",
    "test_top5": "REAL",
    "test_loss": "REAL",
    "test_samples": "INTEGER",
    "params": "INTEGER",
    "nonzero_params": "INTEGER",
    "sparsity": "REAL",
    "compression": "REAL",
    "flops": "INTEGER",
    "macs": "INTEGER",
    "effective_flops": "INTEGER",
    "effective_macs": "INTEGER",
    "theoretical_speedup": "REAL",
    "latency_ms": "REAL",
    "latency_batch_size": "INTEGER",
    "latency_threads": "INTEGER",
    "measured_speedup": "REAL",
    "dense_top1": "REAL",
    "seconds": "REAL",
    "threads": "INTEGER",
    "config_hash": "TEXT",
    "config_json": "TEXT",
    "environment_json": "TEXT",
    "git_commit": "TEXT",
    "host": "TEXT",
    "error": "TEXT",
    "finished_at": "TEXT",
}


class ResultStore:
    """Rows of one results folder (``results.sqlite``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 120000")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        self._db.execute(f"CREATE TABLE IF NOT EXISTS runs ({columns})")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, row: Mapping[str, Any]) -> None:
        """Insert or (unless the stored row is ``ok``) replace a row; unknown keys are dropped.

        A replaced row is replaced whole: columns missing from ``row`` become NULL, so a run
        that succeeds on retry keeps no ``error`` of its failed try.
        """
        names = list(COLUMNS)
        values = {n: _sql_value(row.get(n)) for n in names}
        updates = ", ".join(f"{n} = excluded.{n}" for n in names if n != "run_key")
        self._db.execute(
            f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
            f"ON CONFLICT(run_key) DO UPDATE SET {updates} WHERE runs.status != 'ok'",
            [values[n] for n in names],
        )

    def done(self) -> set[str]:
        """Keys of runs that finished successfully."""
        return {k for (k,) in self._db.execute("SELECT run_key FROM runs WHERE status = 'ok'")}

    def rows(self, where: Mapping[str, Any] | None = None, status: str | None = "ok"
             ) -> list[dict[str, Any]]:
        """Rows as dicts, filtered by equality on columns (``status=None``: any status)."""
        conditions, params = [], []
        for key, value in {**(where or {}), **({"status": status} if status else {})}.items():
            if key not in COLUMNS:
                raise InvalidValueError(f"unknown column {key!r}; columns: {', '.join(COLUMNS)}")
            conditions.append(f"{key} = ?")
            params.append(value)
        sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(conditions)}" if conditions else "")
        cursor = self._db.execute(sql + " ORDER BY finished_at, run_key", params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, values, strict=True)) for values in cursor]

    def integrity(self) -> str:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]


def _sql_value(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if isinstance(value, bool):
        return int(value)
    return value


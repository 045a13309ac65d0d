"""The results store: one SQLite file, one row per run.

SQLite in WAL mode with a busy timeout lets several processes (two sweeps on one folder, or
``prunelab results`` while a sweep runs) read and write safely. Each row is written in one
statement, so a crash leaves either the whole row or nothing. A finished (``ok``) row is never
replaced; a failed one is, when the run is retried.

Sweeps sharing a folder (on one machine or several) split the work through *claims*: a sweep
process claims a run just before starting it and releases it once its row is stored; a run
claimed by a live process is left to it. A claim is a lease: its owner renews it while it works
(:class:`Heartbeat`), so the claims of a process that was killed expire after
:data:`LEASE_SECONDS`, and at once for a dead process on the same host. A sweep's name is claimed
the same way, atomically: one name, one experiment per folder.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunelab.errors import DiskFullError, InvalidValueError, PrunelabError, is_disk_full

#: A claim not renewed for this long is free again (its owner is presumed dead).
LEASE_SECONDS = 120.0
#: How often a working sweep renews its claims.
HEARTBEAT_SECONDS = 20.0

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
    "test_perplexity": "REAL",
    "params": "INTEGER",
    "nonzero_params": "INTEGER",
    "sparsity": "REAL",
    "compression": "REAL",
    "flops": "INTEGER",
    "macs": "INTEGER",
    "effective_flops": "INTEGER",
    "effective_macs": "INTEGER",
    "theoretical_speedup": "REAL",
    "round_to": "TEXT",
    "latency_ms": "REAL",
    "latency_batch_size": "INTEGER",
    "latency_threads": "INTEGER",
    "measured_speedup": "REAL",
    "dense_top1": "REAL",
    "dense_loss": "REAL",
    "macs_per_token": "REAL",
    "effective_macs_per_token": "REAL",
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


class StoreError(PrunelabError):
    """A results store that cannot be opened: not a database, or not prunelab's."""


@dataclass(frozen=True)
class Claimant:
    """Who holds a claim: one sweep process (a random token, its host and pid)."""

    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    token: str = field(default_factory=lambda: secrets.token_hex(8))


class ResultStore:
    """Rows of one results folder (``results.sqlite``).

    ``readonly=True`` opens an existing store for reading only (``prunelab results`` and
    ``report``): it works in a folder this user cannot write, and creates nothing.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._db = _open_readonly(self.path) if readonly else _open_writable(self.path)
        tables = {name for (name,) in self._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if readonly and "runs" not in tables:
            self.close()
            raise StoreError(f"{str(self.path)!r} is an SQLite file without a runs table: "
                             "it is not a prunelab results store")
        if not readonly:
            self._create_tables()
        self._columns = [row[1] for row in self._db.execute("PRAGMA table_info(runs)")]

    def _create_tables(self) -> None:
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        self._db.execute(f"CREATE TABLE IF NOT EXISTS runs ({columns})")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        for name, kind in COLUMNS.items():  # a store from an older prunelab: add new columns
            if name not in have:
                self._db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
        self._db.execute("CREATE TABLE IF NOT EXISTS claims (run_key TEXT PRIMARY KEY, "
                         "token TEXT NOT NULL, host TEXT, pid INTEGER, expires REAL NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS sweeps (name TEXT PRIMARY KEY, "
                         "experiment TEXT NOT NULL)")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, taken at once (two processes cannot both read then write)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def put(self, row: Mapping[str, Any]) -> None:
        """Insert or (unless the stored row is ``ok``) replace a row; unknown keys are dropped.

        A replaced row is replaced whole: columns missing from ``row`` become NULL, so a run
        that succeeds on retry keeps no ``error`` of its failed try.
        """
        names = list(COLUMNS)
        values = {n: _sql_value(row.get(n)) for n in names}
        updates = ", ".join(f"{n} = excluded.{n}" for n in names if n != "run_key")
        try:
            self._db.execute(
                f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
                f"ON CONFLICT(run_key) DO UPDATE SET {updates} WHERE runs.status != 'ok'",
                [values[n] for n in names],
            )
        except sqlite3.OperationalError as exc:
            if is_disk_full(exc):
                raise DiskFullError(f"no space left on device while writing "
                                    f"{str(self.path)!r}: free some space and run again"
                                    ) from None
            raise

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
            if key not in self._columns:  # an older store without this column: nothing matches
                return []
            conditions.append(f"{key} = ?")
            params.append(value)
        sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(conditions)}" if conditions else "")
        order = [c for c in ("finished_at", "run_key") if c in self._columns]
        cursor = self._db.execute(sql + (f" ORDER BY {', '.join(order)}" if order else ""),
                                  params)
        names = [d[0] for d in cursor.description]
        empty = dict.fromkeys(COLUMNS)
        return [empty | dict(zip(names, values, strict=True)) for values in cursor]

    def integrity(self) -> str:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    # -- claims: several sweep processes sharing the work of one folder ----------------------

    def claim(self, key: str, owner: Claimant) -> bool:
        """Claim run ``key`` for ``owner``; False if it is finished or a live process holds it."""
        now = time.time()
        with self._transaction():
            if self._db.execute("SELECT 1 FROM runs WHERE run_key = ? AND status = 'ok'",
                                (key,)).fetchone():
                return False
            held = self._db.execute("SELECT token, host, pid, expires FROM claims "
                                    "WHERE run_key = ?", (key,)).fetchone()
            if held is not None and held[0] != owner.token and _alive(*held[1:], now):
                return False
            self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                             (key, owner.token, owner.host, owner.pid, now + LEASE_SECONDS))
        return True

    def release(self, key: str, owner: Claimant) -> None:
        """Give up ``owner``'s claim on ``key`` (after its row is stored)."""
        self._db.execute("DELETE FROM claims WHERE run_key = ? AND token = ?", (key, owner.token))

    def release_all(self, owner: Claimant) -> None:
        self._db.execute("DELETE FROM claims WHERE token = ?", (owner.token,))

    def renew(self, owner: Claimant) -> None:
        """Extend every claim of ``owner`` by another lease."""
        self._db.execute("UPDATE claims SET expires = ? WHERE token = ?",
                         (time.time() + LEASE_SECONDS, owner.token))

    def claim_sweep_name(self, name: str, experiment: Mapping[str, Any]) -> bool:
        """Record that sweep ``name`` runs ``experiment`` here; False if the name is taken by a
        different experiment. Atomic: of two sweeps started together, one gets the name."""
        text = json.dumps(experiment, sort_keys=True, default=str)
        with self._transaction():
            held = self._db.execute("SELECT experiment FROM sweeps WHERE name = ?",
                                    (name,)).fetchone()
            if held is None:
                self._db.execute("INSERT INTO sweeps VALUES (?, ?)", (name, text))
                return True
        return held[0] == text


def _alive(host: str | None, pid: int | None, expires: float, now: float) -> bool:
    """Whether a claim still holds: its lease runs, and on this host its process lives."""
    if expires < now:
        return False
    if host == socket.gethostname() and pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
    return True


class Heartbeat:
    """Renews a claimant's claims every :data:`HEARTBEAT_SECONDS` from a thread of its own
    (with its own connection), so a long run keeps its claims while the sweep waits on it."""

    def __init__(self, path: Path, owner: Claimant, every: float = HEARTBEAT_SECONDS):
        self.path, self.owner, self.every = path, owner, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="prunelab-claims", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        with ResultStore(self.path) as store:
            while not self._stop.wait(self.every):
                with suppress(sqlite3.Error):  # a busy or full disk: try again next beat
                    store.renew(self.owner)


def _open_writable(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=120, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 120000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
    except sqlite3.DatabaseError as exc:
        db.close()
        _raise_unusable(path, exc)
    return db


def _open_readonly(path: Path) -> sqlite3.Connection:
    """Open for reading only. In a folder this user cannot write, SQLite cannot create the
    WAL's shared-memory file; the store is then opened as immutable (nobody can change it)."""
    uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
    error: sqlite3.DatabaseError | None = None
    for suffix in ("", "&immutable=1"):
        db = sqlite3.connect(uri + suffix, uri=True, timeout=120, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout = 120000")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.DatabaseError as exc:
            db.close()
            if not isinstance(exc, sqlite3.OperationalError):
                _raise_unusable(path, exc)
            error = exc
    raise StoreError(f"cannot read the results store {str(path)!r}: {error}")


def _raise_unusable(path: Path, exc: sqlite3.DatabaseError) -> None:
    raise StoreError(
        f"{str(path)!r} is not a prunelab results store ({exc}): it is not an SQLite database, "
        "or it is damaged; move it away or use another folder") from None


def _sql_value(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if isinstance(value, bool):
        return int(value)
    return value


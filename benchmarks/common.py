"""Shared helpers for benchmark scripts: timing, a printed table, JSON next to the scripts."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def report(name: str, title: str, rows: list[dict[str, Any]], extra: dict | None = None) -> Path:
    """Print ``rows`` as a table and save them (with environment) to results/<name>.json."""
    from prunelab.provenance import environment

    table = Table(title=title)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    Console(width=max(Console().width, 200)).print(table)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "title": title, "argv": sys.argv, "environment": environment(),
               "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"saved {path}")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)

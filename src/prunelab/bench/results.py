"""``prunelab results``: rows of a store as a table or CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from prunelab.bench.stats import language_model_rows
from prunelab.bench.store import COLUMNS, ResultStore
from prunelab.bench.sweep import STORE
from prunelab.errors import PrunelabError
from prunelab.utils import write_atomically

SHOWN = ("label", "recovery", "target_kind", "target_value", "seed", "test_top1",
         "achieved_sparsity", "compression", "theoretical_speedup", "latency_ms", "seconds")
#: Language-model rows show the loss (nats/token) and perplexity instead of top-1.
SHOWN_LM = ("label", "recovery", "target_kind", "target_value", "seed", "test_loss",
            "test_perplexity", "achieved_sparsity", "compression", "theoretical_speedup",
            "latency_ms", "seconds")
FAILED = ("label", "recovery", "target_kind", "target_value", "seed", "error")


def _typed(filters: Mapping[str, str]) -> dict[str, object]:
    """Filter values from the command line as numbers where the column is numeric."""
    out: dict[str, object] = {}
    for key, value in filters.items():
        kind = COLUMNS.get(key, "")
        out[key] = (int(value) if kind.startswith("INTEGER") else
                    float(value) if kind.startswith("REAL") else value)
    return out


def show_results(folder: Path, filters: Mapping[str, str], *, failed: bool = False,
                 csv_path: Path | None = None, console: Console | None = None) -> list[dict]:
    """Print the rows of ``folder``'s store, filtered; write them to ``csv_path`` if given."""
    path = Path(folder) / STORE
    if not path.is_file():
        raise PrunelabError(f"no results store at {str(path)!r}; run `prunelab sweep` first")
    try:
        typed = _typed(filters)
    except ValueError as exc:
        raise PrunelabError(f"bad --where value: {exc}") from None
    with ResultStore(path, readonly=True) as store:
        rows = store.rows(typed, status="failed" if failed else "ok")
    columns = FAILED if failed else SHOWN_LM if language_model_rows(rows) else SHOWN
    table = Table(title=f"{len(rows)} {'failed ' if failed else ''}runs in {folder}")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(Text(_cell(row.get(c))) for c in columns))  # Text: no markup
    (console or Console()).print(table)
    if csv_path is not None:
        if not Path(csv_path).parent.is_dir():
            raise PrunelabError(f"cannot write {str(csv_path)!r}: its folder does not exist")
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
        write_atomically(csv_path, text.getvalue())
    return rows


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

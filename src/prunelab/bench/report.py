"""``prunelab report``: a self-contained HTML report of a results folder, plus PNG/SVG figures.

Figures follow ShrinkBench's advice: accuracy against compression and against theoretical
speed-up on log axes, mean ± std over seeds, the unpruned model as a reference line. For a
language model the quality is the test loss (nats per token; perplexity alongside) instead of
top-1. Tables give
mean, std and the 95% confidence interval per method × recovery × target, and compare the
recovery modes (fine-tune, rewind, Scratch-E, Scratch-B) side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunelab.bench.stats import (
    Metric,
    group_rows,
    mark_pareto,
    pareto_front,
    quality_metric,
    summarize,
    table,
)
from prunelab.bench.store import ResultStore
from prunelab.bench.sweep import STORE, saved_specs, spec_keys
from prunelab.errors import PrunelabError
from prunelab.utils import write_atomically

# A check run by the browser: records script errors and whether every figure decoded.
CHECK_SCRIPT = """
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.figures = ok + '/' + imgs.length;
  document.body.dataset.errors = String(window.__errors.length);
});
"""


def load_sweep(folder: str | os.PathLike, sweep: str | None = None
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Finished and failed rows of one sweep in ``folder`` (the only one, or ``sweep``).

    A sweep's rows are those its saved spec (``spec-<name>.yaml``) asks for, so runs shared by
    two sweeps on one folder (the same dense models, say) belong to both.
    """
    folder = Path(folder)
    if not (folder / STORE).is_file():
        raise PrunelabError(f"no results store at {str(folder / STORE)!r}; run a sweep first")
    with ResultStore(folder / STORE, readonly=True) as store:
        rows = store.rows()
        failed = store.rows(status="failed")
    specs = saved_specs(folder)
    if sweep is None and len(specs) > 1:
        raise PrunelabError(f"{str(folder)!r} holds several sweeps ({', '.join(specs)}); "
                            f"choose one with --sweep")
    if sweep is not None and sweep not in specs:
        raise PrunelabError(f"no sweep {sweep!r} in {str(folder)!r}; it holds: "
                            f"{', '.join(specs) or 'no saved sweep spec'}")
    spec = specs[sweep] if sweep is not None else next(iter(specs.values()), None)
    if spec is not None:
        keys = spec_keys(spec)
        rows = [r for r in rows if r["run_key"] in keys]
        failed = [r for r in failed if r["run_key"] in keys]
    if not rows:
        raise PrunelabError(f"{str(folder)!r} has no finished runs to report yet")
    return rows, failed


def write_report(folder: str | os.PathLike, sweep: str | None = None,
                 out: str | os.PathLike | None = None) -> Path:
    """Write ``folder/report/index.html`` (+ figures) from ``folder/results.sqlite``
    (``folder/report-<sweep>`` when a sweep is named; ``out/index.html`` when ``out`` is given).
    The store is only read, so the results folder may be read-only (with ``out`` elsewhere)."""
    folder = Path(folder)
    rows, failed = load_sweep(folder, sweep)
    out = Path(out) if out is not None else folder / ("report" if sweep is None
                                                      else f"report-{sweep}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise PrunelabError(f"cannot write the report into {str(out)!r} ({exc.strerror}); "
                            "choose another folder with --out") from None
    figures = _figures(rows, out)
    page = _page(folder, rows, failed, figures)
    write_atomically(out / "index.html", page)
    return out / "index.html"


Point = tuple[float, float, float]


def _series(rows: Sequence[Mapping[str, Any]], x: str, metric: Metric
            ) -> dict[tuple[str, str], list[Point]]:
    """Per (method, recovery): (mean x, mean metric, std metric) per target, sorted by x."""
    series: dict[tuple[str, str], list[Point]] = {}
    runs = [r for r in rows if r["method"] != "dense"]
    for (label, recovery, _, _), members in group_rows(runs).items():
        top1 = summarize(r[metric.column] for r in members)
        xs = summarize(r[x] for r in members)
        series.setdefault((str(label), str(recovery)), []).append((xs.mean, top1.mean, top1.std))
    return {k: sorted(v) for k, v in sorted(series.items())}


MARKERS, LINES = "osD^vPX*", ("-", "--", ":", "-.")


def _figures(rows: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    """Top-1 against compression and against theoretical speed-up: a colour per method, a
    marker and line style per recovery mode, the unpruned mean ± std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    metric = quality_metric(rows)
    dense = summarize(r[metric.column] for r in rows if r.get("label") == "dense")
    made = []
    axes = [("compression", "compression (params / non-zeros)"),
            ("theoretical_speedup", "theoretical speed-up (dense / effective FLOPs)")]
    if all(r.get("measured_speedup") is not None for r in rows if r["method"] != "dense"):
        axes.append(("measured_speedup", "measured speed-up (dense / pruned latency)"))
    for x, label in axes:
        series = _series(rows, x, metric)
        methods = sorted({m for m, _ in series})
        recoveries = sorted({r for _, r in series})
        colours = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for (method, recovery), points in series.items():
            xs, ys, errs = zip(*points, strict=True)
            k = recoveries.index(recovery)
            ax.errorbar(xs, ys, yerr=errs, capsize=3, color=colours(methods.index(method)),
                        marker=MARKERS[k % len(MARKERS)], linestyle=LINES[k % len(LINES)],
                        label=method if len(recoveries) == 1 else f"{method} + {recovery}")
        if x != "compression":
            _draw_front(ax, series, dense, metric.higher_is_better)
        if dense.n:
            ax.axhline(dense.mean, color="black", linestyle="--", linewidth=1,
                       label=f"unpruned ({dense.mean:.2f}{metric.unit})")
            ax.axhspan(dense.mean - dense.std, dense.mean + dense.std, color="grey", alpha=0.2)
        xs = [point[0] for points in series.values() for point in points]
        if xs and max(xs) > 3 * min(xs):  # a log axis; a narrow range reads better on a linear one
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(_log_label))
            ax.xaxis.set_minor_formatter(ticker.FuncFormatter(_log_label))
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric.label} ({metric.unit.strip()})"
                      + ("" if metric.higher_is_better else ", lower is better"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        name = f"{'top1' if metric.higher_is_better else 'loss'}_vs_{x}"
        made.append((name, _save(fig, out, name)))
        plt.close(fig)
    return made


def _draw_front(ax: Any, series: dict[tuple[str, str], list[Point]], dense: Any,
                higher_is_better: bool) -> None:
    """The Pareto front of the mean quality against speed-up, as a grey step line."""
    points = [(x, y) for values in series.values() for x, y, _ in values]
    if dense.n:
        points.append((1.0, dense.mean))
    sign = 1.0 if higher_is_better else -1.0
    on_front = pareto_front([(x, sign * y) for x, y in points])
    front = sorted(p for p, on in zip(points, on_front, strict=True) if on)
    if len(front) > 1:
        xs, ys = zip(*front, strict=True)
        ax.step(xs, ys, where="post", color="grey", linewidth=4, alpha=0.35, zorder=0,
                label="Pareto front")


def _log_label(value: float, _: int) -> str:
    """Label 1, 2, 5 × powers of ten on a log axis (e.g. 2x, 5x, 10x, 20x)."""
    if value <= 0:
        return ""
    mantissa = value / 10 ** math.floor(math.log10(value))
    return f"{value:g}x" if round(mantissa, 6) in (1.0, 2.0, 5.0) else ""


def _save(fig: Any, out: Path, name: str) -> str:
    """Save PNG and SVG next to the report; return the PNG as base64 for embedding."""
    fig.savefig(out / f"{name}.svg")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    (out / f"{name}.png").write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode()


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _html_table(headers: Sequence[str], lines: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in line) + "</tr>"
                   for line in lines)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _recovery_comparison(rows: list[dict[str, Any]]) -> str:
    """Mean top-1 per method × target, one column per recovery mode."""
    lines = table(rows)
    recoveries = sorted({line["recovery"] for line in lines})
    if len(recoveries) < 2:
        return ""
    key_prefix, what = (("top1", "test top-1 %") if quality_metric(rows).higher_is_better
                        else ("loss", "test loss, nats/token"))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for line in lines:
        key = (line["method"], line["target"])
        mean, std, d = line[f"{key_prefix}_mean"], line[f"{key_prefix}_std"], _digits(key_prefix)
        cells.setdefault(key, {})[line["recovery"]] = f"{mean:.{d}f} ± {std:.{d}f}"
    body = [[m, t, *(cells[(m, t)].get(r, "–") for r in recoveries)] for m, t in sorted(cells)]
    return (f"<h2>Recovery modes compared ({what}, mean ± std over seeds)</h2>"
            "<p>Fine-tuning vs weight rewinding vs training the pruned network from scratch "
            "for the same epochs (Scratch-E) or the same compute (Scratch-B).</p>"
            + _html_table(["method", "target", *recoveries], body))


def _digits(key_prefix: str) -> int:
    """Decimals shown: top-1 in % to 2, a loss in nats to 3."""
    return 2 if key_prefix == "top1" else 3


def _page(folder: Path, rows: list[dict], failed: list[dict], figures: list[tuple[str, str]]
          ) -> str:
    dense = [r for r in rows if r["method"] == "dense"]
    metric = quality_metric(rows)
    dense_top1 = summarize(r[metric.column] for r in dense if r.get("label") == "dense")
    first = rows[0]
    env = json.loads(first.get("environment_json") or "{}")
    lines = mark_pareto(table(rows), dense_top1, metric)
    if metric.higher_is_better:
        main = _html_table(
            ["method", "recovery", "target", "seeds", "top-1 mean", "std", "95% CI ±",
             "compression", "theor. speed-up", "measured speed-up", "Pareto"],
            [[x["method"], x["recovery"], x["target"], x["seeds"], x["top1_mean"],
              x["top1_std"], x["top1_ci95"], x["compression"], x["speedup"],
              x["measured_speedup"], _front(x)] for x in lines],
        )
    else:
        main = _html_table(
            ["method", "recovery", "target", "seeds", "loss mean (nats/token)", "std",
             "95% CI ±", "perplexity", "next-token top-1 %", "compression", "theor. speed-up",
             "measured speed-up", "Pareto"],
            [[x["method"], x["recovery"], x["target"], x["seeds"], x["loss_mean"],
              x["loss_std"], x["loss_ci95"], x["perplexity_mean"], x["top1_mean"],
              x["compression"], x["speedup"], x["measured_speedup"], _front(x)]
             for x in lines],
        )
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
        f"<figcaption>{name.replace('_', ' ')} (also {name}.png / {name}.svg)</figcaption></figure>"
        for name, data in figures
    )
    failures = ""
    if failed:
        failures = "<h2>Failed runs</h2>" + _html_table(
            ["method", "recovery", "target", "seed", "error"],
            [[f.get("label"), f.get("recovery"), f"{f.get('target_kind')} {f.get('target_value')}",
              f.get("seed"), f.get("error")] for f in failed])
    baseline = (f"{dense_top1.mean:.{3 - metric.higher_is_better}f} ± "
                f"{dense_top1.std:.{3 - metric.higher_is_better}f}{metric.unit} "
                f"({metric.label}) over {dense_top1.n} seed(s)"
                if dense_top1.n else "not recorded")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>prunelab report: {html.escape(folder.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; }}
</style><script>{CHECK_SCRIPT}</script></head>
<body>
<h1>Pruning benchmark: {html.escape(folder.name)}</h1>
<p>{_fmt(first['model'])} on {_fmt(first.get('data_source') or first['dataset'])};
{len(rows) - len(dense)} finished runs, {len(failed)} failed. Unpruned baseline: {baseline}.
Quality is measured on the test set; epochs were chosen on a validation split.</p>
{images}
<h2>Results per method, recovery and target</h2>
<p>Pareto: on the front of the mean quality (top-1, or the loss of a language model) against
theoretical (T) or measured (M) speed-up, the
unpruned model included; the figures draw the fronts as grey steps.</p>{main}
{_recovery_comparison(rows)}
{failures}
<h2>Provenance</h2>
<p>prunelab {_fmt(env.get('prunelab'))}, torch {_fmt(env.get('torch'))}, commit
{_fmt(env.get('git_commit'))}, host {_fmt(env.get('host'))}. Every row in
<code>results.sqlite</code> records its own config, seed, versions and commit.</p>
</body></html>
"""


def _measured(line: Mapping[str, Any]) -> str:
    value = line["measured_speedup"]
    return f"{value:.2f}" if value is not None else "–"


def _front(line: Mapping[str, Any]) -> str:
    """``T``/``M``: the line is on the theoretical / measured speed-up Pareto front."""
    return "".join(tag for tag, key in (("T", "pareto_theoretical"), ("M", "pareto_measured"))
                   if line.get(key))


def markdown_summary(folder: str | os.PathLike, sweep: str | None = None) -> str:
    """The report's tables as Markdown (for docs): per method × recovery × target, and the
    recovery comparison. Language models show loss (nats/token) and perplexity."""
    rows, _ = load_sweep(folder, sweep)
    metric = quality_metric(rows)
    dense = summarize(r[metric.column] for r in rows if r.get("label") == "dense")
    source = rows[0].get("data_source") or rows[0]["dataset"]
    if not metric.higher_is_better:
        perplexity = summarize(r["test_perplexity"] for r in rows if r.get("label") == "dense")
        lines = [f"Unpruned: test loss {dense.mean:.3f} ± {dense.std:.3f} nats/token "
                 f"(perplexity {perplexity.mean:.3f}) over {dense.n} seeds ({source}).", "",
                 "| method | recovery | target | seeds | loss nats/token (mean ± std) | "
                 "95% CI ± | perplexity | compression | theor. speed-up | measured speed-up | "
                 "Pareto |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in mark_pareto(table(rows), dense, metric):
            ci = f"{x['loss_ci95']:.3f}" if x["loss_ci95"] is not None else "–"
            lines.append(f"| {x['method']} | {x['recovery']} | {x['target']} | {x['seeds']} | "
                         f"{x['loss_mean']:.3f} ± {x['loss_std']:.3f} | {ci} | "
                         f"{x['perplexity_mean']:.3f} | {x['compression']:.2f} | "
                         f"{x['speedup']:.2f} | {_measured(x)} | {_front(x)} |")
        return "\n".join(lines) + "\n"
    lines = [f"Unpruned: {dense.mean:.2f} ± {dense.std:.2f}% top-1 over {dense.n} seeds "
             f"({source}).", "",
             "| method | recovery | target | seeds | top-1 % (mean ± std) | 95% CI ± | "
             "compression | theor. speed-up | measured speed-up | Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in mark_pareto(table(rows), dense):
        ci = f"{x['top1_ci95']:.2f}" if x["top1_ci95"] is not None else "–"
        lines.append(f"| {x['method']} | {x['recovery']} | {x['target']} | {x['seeds']} | "
                     f"{x['top1_mean']:.2f} ± {x['top1_std']:.2f} | {ci} | "
                     f"{x['compression']:.2f} | {x['speedup']:.2f} | {_measured(x)} | "
                     f"{_front(x)} |")
    return "\n".join(lines) + "\n"

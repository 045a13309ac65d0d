"""The ``prunelab`` command line: run, methods, models, inspect."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from prunelab.cli_slim import slim_app
from prunelab.errors import PrunelabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Prune any PyTorch model and evaluate it honestly.",
    pretty_exceptions_enable=False,
)
app.add_typer(slim_app, name="slim")
# Wide tables when output is piped or logged (rich would otherwise truncate to 80 columns).
# No markup: names, paths and messages from the user are printed as they are ("[/x]" included).
console = Console(width=None if sys.stdout.isatty() else 160, markup=False)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160, markup=False)


def _show_version(value: bool) -> None:
    if value:
        import torch

        from prunelab import __version__

        console.print(f"prunelab {__version__} (torch {torch.__version__}, Python "
                      f"{sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _app_options(version: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True,
        help="Print the versions of prunelab, torch and Python, and exit.")] = False) -> None:
    """Prune any PyTorch model and evaluate it honestly."""


def _floats(text: list[str] | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(part) for item in text for part in item.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected numbers like 0.5,0.9, got {text!r}") from None


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML run config")] = None,
    model: Annotated[str | None, typer.Option(help="model name (see `prunelab models`)")] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset name, or imagefolder:PATH")] = None,
    method: Annotated[str | None, typer.Option(help="method (see `prunelab methods`)")] = None,
    sparsity: Annotated[
        list[str] | None, typer.Option(help="target sparsities, e.g. 0.5,0.9 (repeatable)")
    ] = None,
    scope: Annotated[str | None, typer.Option(help="global, layer, er or erk")] = None,
    schedule: Annotated[str | None, typer.Option(
        help="when to prune: one-shot, iterative, gradual, ... (`prunelab methods` lists all)")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="rounds of the iterative schedule")] = None,
    recovery: Annotated[str | None, typer.Option(
        help="after pruning: finetune, rewind, scratch-e, scratch-b, none, ... "
             "(`prunelab methods` lists all)")] = None,
    pretrained: Annotated[bool, typer.Option(
        "--pretrained", help="start from the shipped reference model of --model on --dataset "
                             "instead of training it (`prunelab models` lists them)")] = False,
    epochs: Annotated[int | None, typer.Option(help="dense training epochs")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="fine-tuning epochs")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    data_dir: Annotated[
        str | None, typer.Option(help="dataset root (default: $PRUNELAB_DATA)")
    ] = None,
    out: Annotated[str | None, typer.Option(help="folder for run results")] = None,
    track: Annotated[str | None, typer.Option(
        help="log the run to tensorboard or mlflow (pip install 'prunelab[track]')")] = None,
    track_uri: Annotated[str | None, typer.Option(
        help="TensorBoard log folder or MLflow tracking URI (default: inside --out)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Train, prune at several sparsities, recover, and print a table (defaults: digits demo)."""
    from prunelab.config import load_yaml_mapping, validate
    from prunelab.job import RunConfig, run_job

    overrides: dict[str, Any] = {
        key: value
        for key, value in dict(
            model=model, dataset=dataset, method=method, scope=scope, seed=seed,
            data_dir=data_dir, out=out, sparsities=_floats(sparsity),
            dense="pretrained" if pretrained else None,
        ).items()
        if value is not None
    }
    data = load_yaml_mapping(config) if config else {}
    data.update(overrides)
    for key, kind, options in (("schedule", schedule, {"rounds": rounds}),
                               ("recovery", recovery, {})):
        value = _strategy(data.get(key), kind, **options)
        if value:
            data[key] = value
    _track(data, track, track_uri)
    source = str(config) if config else "the command-line options"
    cfg = validate(RunConfig, data, source)
    for stage, value in (("train", epochs), ("finetune", finetune_epochs)):
        if value is not None:
            recipe = getattr(cfg, stage).model_dump() | {"epochs": value}
            cfg = validate(RunConfig, cfg.model_dump() | {stage: recipe}, source)
    cfg.check_plan()
    console.print(Text.assemble(
        ("prunelab run", "bold"),
        f": {cfg.model} on {cfg.dataset}, {cfg.method} ({cfg.scope}), "
        f"{cfg.schedule.kind} + {cfg.recovery.kind}, seed {cfg.seed}"))
    result = run_job(cfg, quiet=quiet)
    console.print(results_table(result.rows))
    console.print(f"results: {result.folder}/results.json and results.csv")


def _track(data: dict[str, Any], backend: str | None, uri: str | None) -> None:
    """``--track`` and ``--track-uri`` over the config's ``track`` (a new backend drops the
    destination of the old one)."""
    if backend is None and uri is None:
        return
    current = data.get("track")
    current = {"backend": current} if isinstance(current, str) else dict(current or {})
    if backend is not None and backend != current.get("backend"):
        current = {"backend": backend}
    if uri is not None:
        current["uri"] = uri
    data["track"] = current


def _strategy(given: Any, kind: str | None, **options: Any) -> Any:
    """A schedule or recovery from the config file with command-line overrides: a new kind
    drops the options of the old one."""
    current = {"kind": given} if isinstance(given, str) else dict(given or {})
    if kind is not None and kind != current.get("kind"):
        current = {"kind": kind}
    return current | {key: value for key, value in options.items() if value is not None}


def results_table(rows: list[dict]) -> Table:
    """The run's rows as a rich table (a language model's show loss, perplexity and MACs per
    token instead of top-1 and MACs per input)."""
    language = any("test_perplexity" in row for row in rows)
    table = Table(title="pruning results (test set)")
    quality = ("loss nats/token", "perplexity") if language else ("top-1 %",)
    macs = ("MACs/token", "eff. MACs/token") if language else ("MACs", "eff. MACs")
    for column in ("method", "sparsity", *quality, "params", "non-zeros", "compression",
                   *macs, "latency ms"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        latency = row.get("latency_ms")
        if language:
            cells = (f"{row['test_loss']:.4f}", f"{row['test_perplexity']:.3f}")
            work = (f"{row['macs_per_token']:,.0f}", f"{row['effective_macs_per_token']:,.0f}")
        else:
            cells = (f"{row['test_top1']:.2f}",)
            work = (f"{row['macs']:,}", f"{row['effective_macs']:,}")
        table.add_row(
            row["method"],
            f"{row['achieved_sparsity']:.3f}",
            *cells,
            f"{row['params']:,}",
            f"{row['nonzero_params']:,}",
            f"{row['compression']:.2f}x",
            *work,
            f"{latency:.3f}" if latency is not None else "-",
        )
    return table


@app.command()
def methods(
    markdown: Annotated[bool, typer.Option(help="print docs/methods.md, not a table")] = False,
) -> None:
    """List the registered pruning methods, schedules and recoveries, with their options."""
    from prunelab.methods import METHODS
    from prunelab.reference import STRATEGIES, reference_markdown

    if markdown:
        sys.stdout.write(reference_markdown())
        return
    table = Table(title="pruning methods")
    for column in ("name", "granularity", "needs data", "description", "options"):
        table.add_column(column)
    for name, cls in METHODS.items():
        table.add_row(name, cls.granularity, "yes" if cls.needs_data else "no", cls.summary(),
                      _options(cls.option_table()))
    console.print(table)
    for title, registry in STRATEGIES:
        table = Table(title=title.lower())
        for column in ("kind", "description", "options"):
            table.add_column(column)
        for name, cls in registry.items():
            table.add_row(name, cls.summary(), _options(cls.option_table()))
        console.print(table)


def _options(rows: list[tuple[str, str, Any]]) -> str:
    return ", ".join(f"{name}={default!r}" for name, _, default in rows) or "-"


@app.command(name="models")
def list_models() -> None:
    """List the model zoo (any torchvision classification model name works too)."""
    from prunelab import models as zoo

    table = Table(title="model zoo")
    table.add_column("name")
    table.add_column("description")
    from prunelab.models.pretrained import available

    shipped: dict[str, list[str]] = {}
    for key, info in available().items():
        name, dataset = key.split("/")
        shipped.setdefault(name, []).append(f"{dataset} ({info['test_top1']:.2f}% test top-1)")
    table.add_column("pretrained (shipped)")
    for name in zoo.names():
        table.add_row(name, zoo.describe(name), ", ".join(shipped.get(name, [])) or "–")
    console.print(table)
    console.print("Any torchvision classification model also works by name, e.g. resnet50. "
                  "Shipped weights: create(name, pretrained=dataset), `prunelab run "
                  "--pretrained`, or `dense: pretrained` in a spec.")


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="model name, or a checkpoint file (.pt)")],
    input_shape: Annotated[
        str, typer.Option(help="C,H,W of one input (default from the model/checkpoint)")
    ] = "",
    num_classes: Annotated[int, typer.Option(help="number of classes")] = 10,
) -> None:
    """Per-layer table: shapes, parameters, non-zeros, FLOPs of a model or checkpoint."""
    import torch

    from prunelab import models as zoo
    from prunelab.checkpoint import load_checkpoint
    from prunelab.metrics import measure
    from prunelab.structured.graph import zeros_input

    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if input_shape:
        try:
            kwargs["input_shape"] = tuple(int(v) for v in input_shape.split(","))
        except ValueError:
            raise typer.BadParameter(
                f"--input-shape must look like 3,32,32, got {input_shape!r}"
            ) from None
    before: dict[str, tuple[int, ...] | None] = {}
    if Path(model).suffix in {".pt", ".pth"} or Path(model).is_file():
        net, payload = load_checkpoint(model)
        kwargs = {**payload["model"].get("kwargs", {}), **kwargs}
        title = f"{model} ({payload['model'].get('name')})"
        if payload.get("structure") and payload["model"].get("name"):
            # Channels were removed: show each layer's shape before -> after.
            original = zoo.create(payload["model"]["name"], **payload["model"]["kwargs"])
            before = {n: tuple(m.weight.shape) for n, m in original.named_modules()
                      if isinstance(getattr(m, "weight", None), torch.Tensor)}
    else:
        net = zoo.create(model, **kwargs)
        title = model
    shape = tuple(kwargs.get("input_shape") or zoo.default_input_shape(net))
    stats = measure(net, zeros_input(net, shape))
    table = Table(title=f"{title}, input {shape}")
    for column in ("layer", "type", "weight shape", "params", "non-zeros", "density", "MACs",
                   "eff. MACs"):
        table.add_column(column, justify="left" if column in {"layer", "type"} else "right")

    def shape_text(name: str, shape: tuple[int, ...] | None) -> str:
        text = "x".join(map(str, shape)) if shape else "-"
        old = before.get(name)
        return f"{'x'.join(map(str, old))} -> {text}" if old and old != shape else text

    for layer in stats.layers:
        table.add_row(
            layer.name or "(root)", layer.type, shape_text(layer.name, layer.weight_shape),
            f"{layer.params:,}", f"{layer.nonzero_params:,}", f"{layer.density:.3f}",
            f"{layer.flops // 2:,}", f"{layer.effective_flops // 2:,}",
        )
    table.add_section()
    table.add_row("total", "", "", f"{stats.params:,}", f"{stats.nonzero_params:,}",
                  f"{1 - stats.sparsity:.3f}", f"{stats.macs:,}", f"{stats.effective_macs:,}")
    console.print(table)
    console.print("MACs = multiply-accumulates; FLOPs = 2 x MACs (convolutions and matmuls).")
    if stats.tokens:  # a language model: the sequence's MACs per token, attention included
        summary = stats.summary()
        console.print(f"MACs per token: {summary['macs_per_token']:,.0f} "
                      f"(effective {summary['effective_macs_per_token']:,.0f}) over "
                      f"{stats.tokens} tokens")


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="a prunelab checkpoint (.pt)")],
    out: Annotated[Path, typer.Option(help="where to write the ONNX file (onnxruntime) or the "
                                           "IR .xml + .bin (openvino)")],
    batch_size: Annotated[int, typer.Option(help="batch size of the example input")] = 1,
    backend: Annotated[str, typer.Option(help="onnxruntime or openvino (pip install "
                                              "'prunelab[openvino]')")] = "onnxruntime",
    precision: Annotated[str, typer.Option(help="fp32, or bf16 (openvino)")] = "fp32",
) -> None:
    """Export a checkpoint for serving: masks baked, BatchNorm folded, ONNX or OpenVINO IR,
    output-checked."""
    import torch

    from prunelab import models as zoo
    from prunelab.checkpoint import load_checkpoint
    from prunelab.deploy import deploy

    if batch_size < 1:
        raise typer.BadParameter(f"--batch-size must be >= 1, got {batch_size}")
    if backend not in ("onnxruntime", "openvino"):
        raise typer.BadParameter(f"--backend must be onnxruntime or openvino, got {backend!r}")
    net, payload = load_checkpoint(checkpoint)
    shape = payload["model"].get("kwargs", {}).get("input_shape") or zoo.default_input_shape(net)
    generator, dtype = torch.Generator().manual_seed(0), getattr(net, "input_dtype", torch.float32)
    if dtype.is_floating_point:
        example = torch.randn(batch_size, *shape, generator=generator)
    else:  # token ids, drawn from the first embedding's vocabulary
        vocab = next(m.num_embeddings for m in net.modules() if isinstance(m, torch.nn.Embedding))
        example = torch.randint(vocab, (batch_size, *shape), generator=generator, dtype=dtype)
    paths = {"onnx_path": out} if backend == "onnxruntime" else {"ir_path": out}
    deployed = deploy(net, example, backend=backend, precision=precision, **paths)
    console.print(Text(deployed.summary()))


@app.command()
def sweep(
    spec: Annotated[Path, typer.Argument(help="sweep spec (YAML), e.g. examples/*.yaml")],
    out: Annotated[Path, typer.Option("--out", "-o", help="results folder (resumable)")],
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="runs in parallel")] = 1,
    executor: Annotated[str, typer.Option(help="local or ray")] = "local",
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: start Ray here)")
    ] = None,
    track: Annotated[str | None, typer.Option(
        help="log each run to tensorboard or mlflow (pip install 'prunelab[track]')")] = None,
    track_uri: Annotated[str | None, typer.Option(
        help="TensorBoard log folder or MLflow tracking URI (default: inside --out)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
) -> None:
    """Run a benchmark grid into OUT; re-running finishes only what is missing."""
    from prunelab.bench import SweepSpec, run_sweep
    from prunelab.config import load_yaml_mapping, validate

    data = load_yaml_mapping(spec)
    _track(data, track, track_uri)
    summary = run_sweep(validate(SweepSpec, data, str(spec)), out, jobs=jobs, executor=executor,
                        address=address, quiet=quiet, console=err_console)
    elsewhere = (f", {summary.elsewhere} left to another sweep on this folder"
                 if summary.elsewhere else "")
    console.print(
        f"{summary.total} runs: {summary.skipped} already done, {summary.ok} finished, "
        f"{summary.failed} failed{elsewhere} ({summary.seconds:.1f} s). Store: {summary.store}"
    )
    if summary.failed:
        # Exit 2 when every failure was a bad input (as `prunelab run` would), 1 otherwise.
        errors = "; ".join(f"{' '.join(message.split())} ({n} run{'s' * (n > 1)})"
                           for message, n in list(summary.errors.items())[:3])
        more = f"; and {len(summary.errors) - 3} other errors" if len(summary.errors) > 3 else ""
        _fail(f"{summary.failed} of {summary.ok + summary.failed} runs failed: {errors}{more}. "
              f"All errors: prunelab results {out} --failed",
              status=2 if summary.user_errors else 1)


@app.command()
def results(
    folder: Annotated[Path, typer.Argument(help="a sweep's results folder")],
    where: Annotated[
        list[str] | None, typer.Option(help="column=value filter (repeatable)")
    ] = None,
    failed: Annotated[bool, typer.Option(help="show failed runs and their errors")] = False,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="export rows as CSV")] = None,
) -> None:
    """Print (and optionally export) the rows of a results store."""
    from prunelab.bench.results import show_results

    filters = {}
    for item in where or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--where takes column=value, got {item!r}")
        filters[key] = value
    show_results(folder, filters, failed=failed, csv_path=csv_path, console=console)


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="a sweep's results folder")],
    markdown: Annotated[bool, typer.Option(help="also print the tables as Markdown")] = False,
    sweep: Annotated[str | None, typer.Option(
        help="the sweep to report, when FOLDER holds several")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="write the report here (default: inside FOLDER)")] = None,
) -> None:
    """Write a self-contained HTML report (and PNG/SVG figures) into FOLDER/report
    (FOLDER/report-NAME with --sweep NAME, or --out)."""
    from prunelab.bench.report import markdown_summary, write_report

    path = write_report(folder, sweep, out)
    if markdown:
        sys.stdout.write(markdown_summary(folder, sweep))
    console.print(f"report: {path}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2, without a traceback."""
    try:
        app(args=argv, standalone_mode=True)
    except PrunelabError as exc:
        _fail(str(exc))
    except OSError as exc:  # a path that cannot be written or read, a full disk: say which
        _fail(f"{exc.strerror or exc}: {exc.filename!r}" if exc.filename else str(exc))
    except sqlite3.DatabaseError as exc:
        hint = (": another program holds it; retry when it is done" if "locked" in str(exc)
                else "")
        _fail(f"the results store could not be used ({exc}){hint}")
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


def _fail(message: str, status: int = 2) -> None:
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())  # 1 line
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False,
                      soft_wrap=True)
    sys.exit(status)


if __name__ == "__main__":
    main()

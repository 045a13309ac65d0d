"""``prunelab slim train|search|export``: slimmable supernets from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from prunelab.errors import InvalidValueError

slim_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                       help="Slimmable networks: train a supernet, search widths, export one.")

DataDir = Annotated[str | None, typer.Option(help="dataset root (default: $PRUNELAB_DATA)")]
Limit = Annotated[int | None, typer.Option(help="at most this many samples per split")]


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidValueError(f"{what} must be numbers like 0.25,0.5,1.0, got {text!r}") from None


def _bundle(dataset: str, data_dir: str | None, limit: int | None):
    from prunelab import data

    return data.load(dataset, data_dir, limit=limit)


def _width_table(net: Any, bundle: Any, widths: list[float]) -> Table:
    """Test top-1 and MACs at each width (a US-Net calibrated on training batches first)."""
    from prunelab import slim
    from prunelab.metrics import evaluate

    spec = slim.spec_of(net)
    table = Table(title="supernet by width (test set)")
    for column in ("width", "MACs", "top-1 %"):
        table.add_column(column, justify="right")
    for w in widths:
        if spec.universal:
            slim.calibrate_bn(net, w, bundle.loader("train", 256, augment=False), limit=20)
        with slim.width(net, w):
            top1 = evaluate(net, bundle.loader("test", 256), topk=(1,))["top1"]
        table.add_row(f"{w:g}", f"{slim.macs(net, w):,}", f"{top1:.2f}")
    return table


@slim_app.command()
def train(
    out: Annotated[Path, typer.Option(help="where to save the supernet (.pt)")],
    model: Annotated[str, typer.Option(help="zoo model")] = "resnet20",
    dataset: Annotated[str, typer.Option(help="dataset name")] = "cifar10",
    widths: Annotated[str | None, typer.Option(help="S-Net widths, e.g. 0.25,0.5,0.75,1")] = None,
    width_range: Annotated[str | None, typer.Option(help="US-Net range lo,hi")] = None,
    round_to: Annotated[int, typer.Option(help="channels per group: a multiple of this")] = 1,
    widen: Annotated[float, typer.Option(
        help="widen the model by this factor first (AutoSlim's 1.5x supernet)")] = 1.0,
    sandwich: Annotated[int, typer.Option(help="US-Net widths per step")] = 4,
    distill: Annotated[bool | None, typer.Option(
        help="inplace distillation (default: on for US-Net, off for S-Net)")] = None,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 10,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 128,
    lr: Annotated[float, typer.Option(help="learning rate (SGD, cosine)")] = 0.1,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    data_dir: DataDir = None,
    limit: Limit = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Train a slimmable supernet (S-Net with --widths, US-Net with --width-range)."""
    import torch

    from prunelab import models, slim
    from prunelab.cli import console
    from prunelab.training import TrainRecipe

    if out.is_dir():
        raise InvalidValueError(f"--out {str(out)!r} is a folder: give a file name, e.g. "
                                f"{str(out / 'supernet.pt')!r}")

    options: dict[str, Any] = {"round_to": round_to}
    if widths is not None:
        options["widths"] = _numbers(widths, "--widths")
    if width_range is not None:
        bounds = _numbers(width_range, "--width-range")
        if len(bounds) != 2:
            raise InvalidValueError(f"--width-range is lo,hi, got {width_range!r}")
        options["width_range"] = tuple(bounds)
    if widths is None and width_range is None:
        options["widths"] = [0.25, 0.5, 0.75, 1.0]
    recipe = TrainRecipe(epochs=epochs, batch_size=batch_size, lr=lr, schedule="cosine",
                         weight_decay=1e-4)
    bundle = _bundle(dataset, data_dir, limit)
    torch.manual_seed(seed)
    kwargs = {"num_classes": bundle.num_classes, "input_shape": bundle.input_shape}
    base = models.create(model, **kwargs)
    if widen != 1:
        base = slim.widen(base, widen, round_to=round_to)
    net = slim.convert(base, **options)
    val = bundle.loader("val", 256) if bundle.sizes["val"] else None
    slim.train(net, bundle.loader("train", batch_size, shuffle=True, seed=seed), recipe,
               sandwich=sandwich, inplace_distillation=distill, val_data=val, seed=seed,
               quiet=quiet)
    slim.save_supernet(out, net, model_name=model, model_kwargs=kwargs,
                       extra={"dataset": dataset})
    spec = slim.spec_of(net)
    shown = spec.widths or [float(w) for w in torch.linspace(*spec.width_range, 4)]
    console.print(_width_table(net, bundle, shown))
    console.print(f"supernet: {out}")


@slim_app.command()
def search(
    supernet: Annotated[Path, typer.Argument(help="a US-Net saved by `prunelab slim train`")],
    speedup: Annotated[str, typer.Option(help="speed-ups, e.g. 1.5,2,3 (of MACs, or of "
                                              "latency with --latency)")],
    out: Annotated[Path, typer.Option(help="JSON file for the per-layer widths found")],
    dataset: Annotated[str | None, typer.Option(
        help="dataset (its validation split is used; default: the supernet's)")] = None,
    step: Annotated[float, typer.Option(help="shrink step, a fraction of a group")] = 0.1,
    batches: Annotated[int, typer.Option(help="validation batches of 256 per evaluation")] = 4,
    latency: Annotated[bool, typer.Option(help="budgets of latency, predicted from every layer "
                                               "timed on --backend (cached per machine)")] = False,
    backend: Annotated[str, typer.Option(help="torch, onnxruntime or openvino")] = "torch",
    precision: Annotated[str, typer.Option(help="fp32 or bf16")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="the batch size latency is timed at")] = 64,
    data_dir: DataDir = None,
    limit: Limit = None,
) -> None:
    """AutoSlim: greedy per-layer channel counts under MACs (or latency) budgets, on
    validation data."""
    import torch

    from prunelab import slim
    from prunelab.cli import console
    from prunelab.slim.autoslim import latency_cost

    if not latency and (backend, precision, batch_size) != ("torch", "fp32", 64):
        raise InvalidValueError("--backend, --precision and --batch-size set how latency is "
                                "timed: add --latency, or leave them out for a MACs budget")
    net, payload = slim.load_supernet(supernet)
    dataset = _trained_on(payload, dataset, supernet)
    bundle = _bundle(dataset, data_dir, limit)
    if not bundle.sizes["val"]:
        raise InvalidValueError(f"{dataset} has no validation split to search on")
    speedups = _numbers(speedup, "--speedup")
    if batch_size < 1:
        raise InvalidValueError(f"--batch-size must be at least 1, got {batch_size}")
    spec = slim.spec_of(net)
    budget: dict[str, Any] = {"speedup": speedups}
    if latency:
        example = torch.zeros(batch_size, *spec.input_shape)
        budget = {"latency_speedup": speedups, "example_input": example, "backend": backend,
                  "precision": precision}
    configs = slim.autoslim(net, bundle.loader("val", 256), step=step, limit=batches, **budget)
    full = slim.macs(net, spec.max_width)
    found = [{"speedup": s, "macs": slim.macs(net, c), "width": c}
             for s, c in zip(speedups, configs, strict=True)]
    table = Table(title="AutoSlim")
    columns = ["speed-up asked", "MACs", "MACs speed-up", "channels"]
    if latency:
        predict = latency_cost(net, example, backend, precision)
        top = predict(spec.max_width)
        for row in found:
            ms = predict(row["width"])
            row |= {"budget": "latency", "backend": backend, "precision": precision,
                    "batch_size": batch_size, "predicted_ms": ms, "predicted_speedup": top / ms}
        columns.insert(3, "latency speed-up (predicted)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(found, indent=1))
    for column in columns:
        table.add_column(column, justify="right")
    for row in found:
        cells = [f"{row['speedup']:g}", f"{row['macs']:,}", f"{full / row['macs']:.2f}",
                 " ".join(str(k) for k in row["width"].values())]
        if latency:
            cells.insert(3, f"{row['predicted_speedup']:.2f}")
        table.add_row(*cells)
    console.print(table)
    console.print(f"widths: {out}")


@slim_app.command()
def export(
    supernet: Annotated[Path, typer.Argument(help="a supernet saved by `prunelab slim train`")],
    out: Annotated[Path, typer.Option(help="where to save the narrow model (.pt)")],
    width: Annotated[float | None, typer.Option(help="a uniform width")] = None,
    search_file: Annotated[Path | None, typer.Option(
        "--widths-file", help="per-layer widths from `prunelab slim search`")] = None,
    speedup: Annotated[float | None, typer.Option(
        help="which entry of --widths-file (by its speed-up)")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="dataset (US-Net BatchNorm calibration; default: the supernet's)")] = None,
    data_dir: DataDir = None,
    limit: Limit = None,
) -> None:
    """Export one width as a plain narrow model (a checkpoint `prunelab inspect` reads)."""
    import torch

    from prunelab import slim
    from prunelab.checkpoint import save_checkpoint
    from prunelab.cli import console
    from prunelab.metrics import measure

    net, payload = slim.load_supernet(supernet)
    dataset = _trained_on(payload, dataset, supernet)
    chosen: Any = width
    if (width is None) == (search_file is None):
        raise InvalidValueError("give either --width or --widths-file")
    if search_file is not None:
        chosen = _pick(search_file, speedup)
    spec = slim.spec_of(net)
    if spec.universal:
        bundle = _bundle(dataset, data_dir, limit)
        slim.calibrate_bn(net, chosen, bundle.loader("train", 256, augment=False), limit=20)
    small = slim.export(net.eval(), chosen)
    save_checkpoint(out, small, model_name=payload["model"]["name"],
                    model_kwargs=payload["model"]["kwargs"])
    x = torch.zeros(1, *spec.input_shape)
    stats = measure(small, x, reference=net)
    console.print(f"exported: {out}  params {stats.params:,}  MACs {stats.flops // 2:,} "
                  f"({stats.reference_flops / stats.flops:.2f}x fewer than the supernet)")


def _trained_on(payload: dict[str, Any], dataset: str | None, path: Path) -> str:
    """The supernet's own dataset (recorded by `slim train`), which --dataset may only repeat:
    searching or calibrating BatchNorm on other data gives wrong widths and statistics."""
    recorded = payload["extra"].get("dataset")
    if dataset is not None and recorded is not None and dataset != recorded:
        raise InvalidValueError(
            f"{str(path)!r} was trained on {recorded}, not {dataset}: leave --dataset out (it "
            "defaults to the supernet's dataset)")
    return dataset or recorded or "cifar10"


def _pick(path: Path, speedup: float | None) -> dict[str, int]:
    try:
        entries = json.loads(path.read_text())
        by_speedup = {float(e["speedup"]): dict(e["width"]) for e in entries}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InvalidValueError(
            f"{str(path)!r} is not a widths file from `prunelab slim search` ({exc})") from None
    if not by_speedup:
        raise InvalidValueError(f"{str(path)!r} holds no widths: run `prunelab slim search` "
                                "again")
    if speedup is None and len(by_speedup) == 1:
        return next(iter(by_speedup.values()))
    if speedup not in by_speedup:
        raise InvalidValueError(
            f"choose --speedup from {', '.join(f'{s:g}' for s in by_speedup)} "
            f"(the entries of {str(path)!r})")
    return by_speedup[speedup]

"""Experiment tracking: what a run logs is read back from real TensorBoard event files and a
real local MLflow store, and compared with the run's own training history and results."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunelab import experiment as experiment_module
from prunelab import tracking
from prunelab.bench import SweepSpec, run_sweep
from prunelab.bench import worker as sweep_worker
from prunelab.cli import app, main
from prunelab.config import validate
from prunelab.errors import ConfigError, PrunelabError
from prunelab.job import RunConfig, run_hash, run_job
from prunelab.tracking import TrackConfig, flatten

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_MLFLOW = all(importlib.util.find_spec(m) is not None
                 for m in ("mlflow", "sqlalchemy", "alembic"))
needs_tensorboard = pytest.mark.skipif(
    not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'prunelab[track]')")
needs_mlflow = pytest.mark.skipif(
    not HAS_MLFLOW, reason="mlflow-skinny, sqlalchemy or alembic is not installed "
                           "(pip install 'prunelab[track]')")


def tiny(tmp_path: Path, **overrides) -> RunConfig:
    """Seconds on the embedded digits: 2 dense epochs, 1 fine-tuning epoch, one sparsity."""
    data = {
        "out": str(tmp_path / "runs"),
        "sparsities": [0.5],
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "schedule": "cosine"},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "latency": {"enabled": False},
    }
    return validate(RunConfig, data | overrides)


@pytest.fixture
def histories(monkeypatch) -> dict[str, list[list[dict]]]:
    """The train loop's own per-epoch history of every phase trained, by phase label."""
    seen: dict[str, list[list[dict]]] = {}
    train = experiment_module.train

    def recording(*args, **kwargs):
        result = train(*args, **kwargs)
        seen.setdefault(kwargs["description"], []).append(result.history)
        return result

    monkeypatch.setattr(experiment_module, "train", recording)
    return seen


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made (the migrations take seconds, once)."""
    if not HAS_MLFLOW:
        pytest.skip("mlflow is not installed")
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "empty.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(_empty_store, tmp_path) -> str:
    path = tmp_path / "mlflow.db"
    shutil.copy(_empty_store, path)
    return f"sqlite:///{path}"


def event_file_scalars(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict, str]:
    """Scalars (tag -> [(step, value)]), texts (tag -> text) and the HParams plugin's data of
    the one run logged under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"):
             events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
             for tag in events.Tags()["tensors"] if tag.endswith("/text_summary")}
    return scalars, texts, events.PluginTagToContent("hparams")


def epoch_values(history: list[dict], metric: str) -> list[tuple[int, float]]:
    return [(step, entry[metric]) for step, entry in enumerate(history, 1)]


@needs_tensorboard
def test_tensorboard_logs_every_epoch_the_config_and_the_results(tmp_path, histories) -> None:
    config = tiny(tmp_path, track="tensorboard")
    result = run_job(config, quiet=True)
    scalars, texts, hparams = event_file_scalars(tmp_path / "runs" / "tensorboard")

    (dense,) = histories["dense"]
    (finetune,) = histories["finetune"]
    assert len(dense) == 2 and len(finetune) == 1
    for metric in ("train_loss", "val_top1", "val_loss", "lr"):
        for phase, history in (("dense", dense), ("sparsity-0.5/finetune", finetune)):
            logged = scalars[f"{phase}/{metric}"]
            assert [s for s, _ in logged] == [s for s, _ in epoch_values(history, metric)]
            assert [v for _, v in logged] == pytest.approx(
                [v for _, v in epoch_values(history, metric)], rel=1e-6)  # float32 in files
    for row, name in ((result.rows[0], "dense"), (result.rows[1], "sparsity-0.5")):
        for metric in ("test_top1", "test_loss", "nonzero_params", "achieved_sparsity"):
            ((step, value),) = scalars[f"final/{name}/{metric}"]
            assert step == 0 and value == pytest.approx(row[metric], rel=1e-6)
    assert "final/dense/seed" not in scalars

    logged_config = json.loads(re.search(r"```\n(.*)\n```", texts["config"], re.S).group(1))
    assert logged_config == config.model_dump(mode="json")
    provenance = json.loads(re.search(r"```\n(.*)\n```", texts["provenance"], re.S).group(1))
    assert provenance["config_hash"] == run_hash(config) and provenance["torch"]
    assert texts["status"] == "FINISHED"

    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    logged_hparams = start.session_start_info.hparams
    experiment = HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    shown = {m.name.tag for m in experiment.metric_infos}
    assert {"final/dense/test_top1", "final/sparsity-0.5/test_top1"} <= shown
    assert logged_hparams["method"].string_value == "magnitude"
    assert logged_hparams["train.epochs"].number_value == 2
    assert set(flatten(config.model_dump(mode="json"))) == set(logged_hparams)


@needs_mlflow
def test_mlflow_store_holds_params_metric_histories_and_results(tmp_path, histories,
                                                                 mlflow_uri) -> None:
    from mlflow.tracking import MlflowClient

    config = tiny(tmp_path, sparsities=[0.5, 0.8], schedule={"kind": "iterative", "rounds": 2},
                  track={"backend": "mlflow", "uri": mlflow_uri, "experiment": "tiny"})
    result = run_job(config, quiet=True)

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in flatten(config.model_dump(mode="json"))
                               .items()}
    assert run.data.tags["prunelab.config_hash"] == run_hash(config)
    assert run.data.tags["prunelab.torch"] and "prunelab.host" in run.data.tags

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    (dense,) = histories["dense"]
    assert history("dense/val_top1") == epoch_values(dense, "val_top1")
    assert history("dense/train_loss") == epoch_values(dense, "train_loss")
    # Iterative pruning fine-tunes after each of its 2 rounds: one curve per sparsity, whose
    # steps go on across the rounds.
    finetunes = histories["finetune"]
    assert len(finetunes) == 4
    for i, sparsity in enumerate(("0.5", "0.8")):
        rounds = finetunes[2 * i] + finetunes[2 * i + 1]
        assert history(f"sparsity-{sparsity}/finetune/val_loss") == epoch_values(rounds,
                                                                                 "val_loss")
    for row, name in zip(result.rows, ("dense", "sparsity-0.5", "sparsity-0.8"), strict=True):
        for metric in ("test_top1", "test_loss", "params", "nonzero_params"):
            assert run.data.metrics[f"final/{name}/{metric}"] == row[metric]


def test_tracking_is_not_part_of_a_results_identity(tmp_path) -> None:
    plain = tiny(tmp_path)
    tracked = tiny(tmp_path, track={"backend": "mlflow", "uri": "sqlite:///x.db"})
    assert run_hash(tracked) == run_hash(plain)
    assert "track" not in plain.model_dump(mode="json")  # results.json unchanged without it
    spec = {"name": "s", "grid": {"methods": ["magnitude"], "targets": {"sparsity": [0.5]}}}
    plain_spec = validate(SweepSpec, spec)
    tracked_spec = validate(SweepSpec, spec | {"track": "tensorboard"})
    assert [plain_spec.run_key(r) for r in plain_spec.runs()] == [
        tracked_spec.run_key(r) for r in tracked_spec.runs()]
    assert plain_spec.dense_run_key(0) == tracked_spec.dense_run_key(0)


def test_an_unknown_tracker_or_a_missing_package_is_one_clear_error(tmp_path,
                                                                     monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"unknown tracker 'mlfow'.*Did you mean 'mlflow'"):
        tiny(tmp_path, track="mlfow")
    monkeypatch.setattr(tracking, "missing_packages",
                        lambda *names: [n for n in names if n == "mlflow"])
    config = tiny(tmp_path, track="mlflow")
    with pytest.raises(ConfigError, match=r"needs mlflow.*pip install 'prunelab\[track\]'"):
        run_job(config, quiet=True)
    assert not (tmp_path / "runs").exists()  # failed before training, nothing written


def test_cli_bad_tracker_exits_2_with_one_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--quiet", "--out", str(tmp_path), "--track", "wandb"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown tracker 'wandb'" in err and "prunelab[track]" in err


@needs_tensorboard
def test_cli_run_track_logs_to_the_given_folder(tmp_path) -> None:
    logs = tmp_path / "tb"
    result = CliRunner().invoke(app, [
        "run", "--quiet", "--epochs", "1", "--finetune-epochs", "1", "--sparsity", "0.5",
        "--out", str(tmp_path / "runs"), "--track", "tensorboard", "--track-uri", str(logs)])
    assert result.exit_code == 0, result.output
    scalars, texts, _ = event_file_scalars(logs)
    assert [s for s, _ in scalars["dense/train_loss"]] == [1]
    assert {"final/dense/test_top1", "final/sparsity-0.5/test_top1"} <= set(scalars)
    assert '"method": "magnitude"' in texts["config"]


def tiny_sweep(**changes) -> SweepSpec:
    return validate(SweepSpec, {
        "name": "tiny",
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "latency": {"enabled": False},
        "grid": {"methods": ["magnitude", {"method": "random", "label": "coin"}],
                 "targets": {"sparsity": [0.5]}, "seeds": [0], "controls": False},
    } | changes)


@needs_mlflow
def test_a_tracked_sweep_logs_one_run_per_trial(tmp_path, mlflow_uri, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    run = sweep_worker._run

    def failing_coin(out, spec, run_spec, key, tracking):
        if run_spec.choice.name == "coin":
            raise PrunelabError("the coin fell off the table")
        return run(out, spec, run_spec, key, tracking)

    monkeypatch.setattr(sweep_worker, "_run", failing_coin)
    spec = tiny_sweep(track={"backend": "mlflow", "uri": mlflow_uri})
    summary = run_sweep(spec, tmp_path / "out", quiet=True)
    assert (summary.ok, summary.failed) == (1, 1)

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("tiny")  # the sweep's name
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 3  # the dense model and the two runs of the grid
    names = sorted(runs)
    assert names[0].startswith("coin_finetune_sparsity-0.5_seed0_")
    assert names[1].startswith("dense_seed0_")
    assert names[2].startswith("magnitude_global_finetune_sparsity-0.5_seed0_")
    dense, ok, failed = runs[names[1]], runs[names[2]], runs[names[0]]
    assert [m.step for m in client.get_metric_history(dense.info.run_id, "dense/val_top1")] == [
        1, 2]
    assert [m.step for m in client.get_metric_history(ok.info.run_id, "finetune/val_top1")] == [
        1]
    assert ok.info.status == "FINISHED" and failed.info.status == "FAILED"
    assert "the coin fell off the table" in failed.data.tags["prunelab.error"]
    assert ok.data.params["run.target_value"] == "0.5"
    assert ok.data.params["run.choice.method"] == "magnitude"
    assert ok.data.tags["prunelab.run_key"] == spec.run_key(spec.runs()[0])
    from prunelab.bench import ResultStore

    with ResultStore(tmp_path / "out" / "results.sqlite") as store:
        (row,) = [r for r in store.rows() if r["label"] == "magnitude/global"]
    assert ok.data.metrics["final/test_top1"] == row["test_top1"]


@needs_tensorboard
def test_a_tracked_sweep_writes_one_event_folder_per_trial(tmp_path) -> None:
    spec = tiny_sweep(track="tensorboard")
    run_sweep(spec, tmp_path / "out", quiet=True)
    folders = sorted(p.name for p in (tmp_path / "out" / "tensorboard").iterdir())
    assert len(folders) == 3
    assert [f.split("_")[0] for f in folders] == ["coin", "dense", "magnitude"]
    # A re-run finds everything done and tracks nothing new.
    run_sweep(spec, tmp_path / "out", quiet=True)
    assert len(list((tmp_path / "out" / "tensorboard").iterdir())) == 3


def test_track_config_defaults(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    board = TrackConfig(backend="tensorboard").resolved(tmp_path / "out", "run")
    assert board.uri == str((tmp_path / "out" / "tensorboard").resolve())
    flow = TrackConfig.model_validate("mlflow").resolved(tmp_path / "out", "run")
    assert flow.uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    assert flow.experiment == "run"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert TrackConfig(backend="mlflow").resolved(tmp_path, "run").uri == (
        "http://tracking.example:5000")
    assert TrackConfig(backend="mlflow", uri="sqlite:///a.db", experiment="e").resolved(
        tmp_path, "run").experiment == "e"


class Recorder:
    """A tracker of this test: any object with the four methods is one."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, config, provenance) -> None:
        self.calls.append(("start", dict(config)))

    def log_epoch(self, phase, metrics, step) -> None:
        self.calls.append(("epoch", phase, step, metrics["epoch"]))

    def log_final(self, metrics) -> None:
        self.calls.append(("final", dict(metrics)))

    def end(self, status="FINISHED", error=None) -> None:
        self.calls.append(("end", status))


def test_phases_get_metric_safe_names_and_steps_that_go_on() -> None:
    from prunelab.training import TrainState

    recorder = Recorder()
    run = tracking.Tracking(recorder)
    run.prefix = "sparsity-0.9"
    for _ in range(2):  # the phase trains twice (iterative rounds) for 2 epochs each
        (callback,) = run.callbacks("sparse-train (rigl)")
        for epoch in (1, 2):
            state = TrainState(None, None, None, 1, 1, epoch=epoch)
            callback.on_epoch_end(state, {"epoch": epoch, "train_loss": 0.5})
    run.log_final({"test_top1": 91.0, "seed": 3, "label": "x"}, "sparsity-0.9")
    assert recorder.calls == [
        ("epoch", "sparsity-0.9/sparse-train-rigl", step, epoch)
        for step, epoch in ((1, 1), (2, 2), (3, 1), (4, 2))
    ] + [("final", {"final/sparsity-0.9/test_top1": 91.0, "final/sparsity-0.9/label": "x"})]
    assert tracking.Tracking().callbacks("dense") == []  # off: nothing added to the loop


def test_a_run_that_fails_is_tracked_as_failed(tmp_path, monkeypatch) -> None:
    recorder = Recorder()
    monkeypatch.setattr(tracking, "open_tracker", lambda track, name: recorder)
    monkeypatch.setattr(tracking, "missing_packages", lambda *names: [])  # the recorder needs none

    def broken(*args, **kwargs):
        raise PrunelabError("pruning went wrong")

    monkeypatch.setattr(experiment_module.Experiment, "prune_and_recover", broken)
    with pytest.raises(PrunelabError, match="pruning went wrong"):
        run_job(tiny(tmp_path, train={"epochs": 1, "batch_size": 64}, track="tensorboard"),
                quiet=True)
    kinds = [call[0] for call in recorder.calls]
    assert kinds == ["start", "epoch", "final", "end"]  # dense trained and measured, then failed
    assert recorder.calls[-1] == ("end", "FAILED")

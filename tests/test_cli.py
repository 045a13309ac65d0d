"""The main job and the CLI, end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunelab.bench import ResultStore
from prunelab.cli import app, main
from prunelab.config import validate
from prunelab.job import RunConfig, run_job

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def quick_config(tmp_path: Path, **overrides) -> RunConfig:
    data = {
        "out": str(tmp_path / "runs"),
        "sparsities": [0.5, 0.9],
        "train": {"epochs": 4, "batch_size": 64, "lr": 0.05, "schedule": "cosine"},
        "finetune": {"epochs": 2, "batch_size": 64, "lr": 0.01, "schedule": "cosine"},
        "latency": {"repeats": 3},
    }
    return validate(RunConfig, data | overrides)


def test_main_job_writes_results_and_reaches_the_targets(tmp_path) -> None:
    result = run_job(quick_config(tmp_path), quiet=True)
    rows = result.rows
    assert [r["method"] for r in rows] == ["dense", "magnitude", "magnitude"]
    assert [r["target_sparsity"] for r in rows] == [0.0, 0.5, 0.9]
    assert rows[2]["achieved_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert rows[0]["test_samples"] == 359 and rows[0]["test_top1"] > 80
    assert rows[2]["nonzero_params"] < rows[1]["nonzero_params"] < rows[0]["nonzero_params"]
    assert rows[2]["effective_macs"] < rows[0]["macs"]
    payload = json.loads((result.folder / "results.json").read_text())
    assert payload["config"]["method"] == "magnitude" and payload["config_hash"]
    assert {"torch", "git_commit", "host", "prunelab"} <= set(payload["environment"])
    with open(result.folder / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3


def test_same_seed_gives_identical_numbers(tmp_path) -> None:
    def numbers(seed: int) -> list[tuple]:
        rows = run_job(quick_config(tmp_path, seed=seed, latency={"enabled": False}),
                       quiet=True, write=False).rows
        return [(r["test_top1"], r["test_loss"], r["nonzero_params"]) for r in rows]

    assert numbers(0) == numbers(0)
    assert numbers(0) != numbers(1)


@pytest.mark.parametrize(
    ("schedule", "recovery"),
    [({"kind": "iterative", "rounds": 2}, {"kind": "finetune"}),
     ({"kind": "gradual"}, {"kind": "finetune"}),
     ({"kind": "one-shot"}, {"kind": "rewind", "rewind_epoch": 1}),
     ({"kind": "one-shot"}, {"kind": "scratch-e"}),
     ({"kind": "iterative", "rounds": 2}, {"kind": "scratch-b"}),
     ({"kind": "one-shot"}, {"kind": "none"})],
)
def test_schedules_and_recovery_modes_run(tmp_path, schedule, recovery) -> None:
    config = quick_config(tmp_path, schedule=schedule, recovery=recovery, sparsities=[0.8],
                          latency={"enabled": False})
    rows = run_job(config, quiet=True, write=False).rows
    assert rows[1]["achieved_sparsity"] == pytest.approx(0.8, abs=1e-2)
    # Above chance (10%); from-scratch and unrecovered runs are weak with 4 epochs.
    assert rows[1]["test_top1"] > (20 if recovery["kind"] in ("none", "scratch-e") else 50)


def test_a_failure_leaves_no_results_folder(tmp_path) -> None:
    config = quick_config(tmp_path, method_options={"bogus": 1})
    with pytest.raises(Exception, match="no option 'bogus'"):
        run_job(config, quiet=True)
    out = tmp_path / "runs"
    assert not out.exists() or not any(out.iterdir())


def test_cli_run_defaults_print_a_table(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "--quiet", "--epochs", "3", "--finetune-epochs", "1",
                                 "--sparsity", "0.5,0.8"])
    assert result.exit_code == 0, result.output
    assert "magnitude" in result.output and "0.800" in result.output
    assert len(list((tmp_path / "runs").glob("*/results.json"))) == 1


def test_cli_config_file_and_flags(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"out: {tmp_path / 'out'}\nmethod: random\nsparsities: [0.6]\n"
                      "train: {epochs: 2}\nfinetune: {epochs: 1}\nlatency: {enabled: false}\n")
    result = runner.invoke(app, ["run", "-q", "--config", str(config), "--scope", "layer"])
    assert result.exit_code == 0, result.output
    payload = json.loads(next((tmp_path / "out").glob("*/results.json")).read_text())
    assert payload["config"]["scope"] == "layer" and payload["rows"][1]["method"] == "random"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--method", "magnitud"], "Did you mean 'magnitude'"),
        (["run", "--sparsity", "1.0"], "[0, 1)"),
        (["run", "--model", "resnet21"], "Did you mean"),
        (["run", "--dataset", "mnist", "--data-dir", "{tmp}/none"], "looked in"),
        (["run", "--config", "{tmp}/missing.yaml"], "does not exist"),
        (["inspect", "{tmp}/junk.pt"], "not a readable checkpoint"),
        (["run", "--out", "{tmp}/junk.pt"], "is a file"),
        (["run", "--out", "{tmp}/junk.pt/runs"], "cannot create the results folder"),
        (["results", "{tmp}", "--csv", "{tmp}/no/such/x.csv"], "does not exist"),
        (["sweep", str(EXAMPLES / "digits-smoke.yaml"), "--out", "{tmp}/junk.pt/x"],
         "Not a directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message) -> None:
    monkeypatch.setenv("PRUNELAB_OFFLINE", "1")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    ResultStore(tmp_path / "results.sqlite").close()
    with pytest.raises(SystemExit) as exit_info:
        main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_misspelled_config_key_is_named(tmp_path, capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("sparsites: [0.5]\ntrain:\n  epoch: 3\n")
    with pytest.raises(SystemExit):
        main(["run", "--config", str(config)])
    err = capsys.readouterr().err
    assert "unknown key 'sparsites'" in err and "Did you mean 'sparsities'" in err
    assert "unknown key 'train.epoch'" in err


def test_listing_commands() -> None:
    methods = runner.invoke(app, ["methods"])
    assert methods.exit_code == 0 and "magnitude" in methods.output and "taylor" in methods.output
    models = runner.invoke(app, ["models"])
    assert models.exit_code == 0 and "resnet56" in models.output
    inspect = runner.invoke(app, ["inspect", "resnet20"])
    assert inspect.exit_code == 0 and "40,813,184" in inspect.output  # total MACs


def test_inspect_a_pruned_checkpoint(tmp_path) -> None:
    import prunelab

    model = prunelab.models.create("lenet-300-100")
    prunelab.prune(model, "magnitude", 0.9)
    path = prunelab.save_checkpoint(tmp_path / "m.pt", model, model_name="lenet-300-100",
                                    model_kwargs={"input_shape": (1, 28, 28)})
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "26,620" in result.output  # effective MACs: 10% of 266,200


def test_docs_methods_reference_is_current() -> None:
    from prunelab.reference import reference_markdown

    docs = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
    regenerate = "run: prunelab methods --markdown > docs/methods.md"
    assert docs.read_text() == reference_markdown(), regenerate


def test_example_configs_validate() -> None:
    from prunelab.bench import SweepSpec
    from prunelab.config import load_config

    examples = sorted(EXAMPLES.glob("*.yaml"))
    sweeps = [p for p in examples if "grid:" in p.read_text()]
    assert sweeps and len(sweeps) < len(examples)
    for path in examples:
        load_config(SweepSpec if path in sweeps else RunConfig, path).check_plan()


def test_version_prints_what_runs(capsys) -> None:
    import torch

    from prunelab import __version__
    from prunelab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert f"prunelab {__version__} (torch {torch.__version__}" in capsys.readouterr().out

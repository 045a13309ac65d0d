"""`prunelab slim train|search|export` end to end on the embedded digits, and its bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import prunelab
from prunelab import slim
from prunelab.cli import app, main

runner = CliRunner()
SMALL = ["--dataset", "digits", "--limit", "200"]


def test_train_search_export(tmp_path) -> None:
    supernet = tmp_path / "us.pt"
    result = runner.invoke(app, ["slim", "train", "--out", str(supernet), "--model", "resnet20",
                                 "--width-range", "0.25,1", "--epochs", "1", "-q", *SMALL])
    assert result.exit_code == 0, result.output
    assert "supernet by width" in result.output
    net, _ = slim.load_supernet(supernet)
    assert slim.spec_of(net).width_range == (0.25, 1.0)
    widths = tmp_path / "w.json"
    result = runner.invoke(app, ["slim", "search", str(supernet), "--speedup", "2",
                                 "--out", str(widths), "--step", "0.25", "--batches", "1",
                                 *SMALL])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(widths.read_text())
    assert entry["macs"] <= slim.macs(net, 1.0) / 2
    small = tmp_path / "small.pt"
    result = runner.invoke(app, ["slim", "export", str(supernet), "--widths-file", str(widths),
                                 "--out", str(small), *SMALL])
    assert result.exit_code == 0, result.output
    model, _ = prunelab.load_checkpoint(small)  # rebuilt from the zoo, no pickled model
    x = torch.zeros(1, *slim.spec_of(net).input_shape)
    assert prunelab.measure(model, x).flops // 2 == entry["macs"]


def test_train_a_wider_supernet(tmp_path) -> None:
    supernet = tmp_path / "wide.pt"
    result = runner.invoke(app, ["slim", "train", "--out", str(supernet), "--model", "resnet20",
                                 "--widths", "0.5,1", "--widen", "1.5", "--epochs", "1", "-q",
                                 *SMALL])
    assert result.exit_code == 0, result.output
    net, _ = slim.load_supernet(supernet)  # the widening is replayed on the zoo model
    assert net.conv1.out_channels == 24
    assert slim.export(net.eval(), 0.5).conv1.out_channels == 12


def test_search_under_a_latency_budget(tmp_path, monkeypatch) -> None:
    """Layer times replaced by a fake that grows with the channels (a call's overhead 0)."""
    from prunelab.structured.latency import LatencyTable

    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(LatencyTable, "_time", lambda self, shape, cin, cout:
                        0.0 if shape.kind == "linear" and cin == cout == 1 else float(cin * cout))
    net = slim.convert(prunelab.models.create("resnet20", input_shape=(1, 8, 8)),
                       width_range=(0.25, 1.0))
    supernet = tmp_path / "us.pt"
    slim.save_supernet(supernet, net, model_name="resnet20",
                       model_kwargs={"input_shape": (1, 8, 8)})
    widths = tmp_path / "w.json"
    result = runner.invoke(app, ["slim", "search", str(supernet), "--speedup", "1.5,3",
                                 "--latency", "--batch-size", "4", "--out", str(widths),
                                 "--step", "0.5", "--batches", "1", *SMALL])
    assert result.exit_code == 0, result.output
    assert "latency speed-up (predicted)" in result.output
    entries = json.loads(widths.read_text())
    assert [e["speedup"] for e in entries] == [1.5, 3.0]
    for entry in entries:
        assert entry["budget"] == "latency" and entry["batch_size"] == 4
        assert entry["predicted_speedup"] >= entry["speedup"]
    assert list((tmp_path / "cache" / "latency").glob("torch-fp32-b4-*.json"))


@pytest.mark.parametrize("args, message", [
    (["slim", "train", "--out", "x.pt", "--widths", "0.5,1.5"], "(0, 1]"),
    (["slim", "train", "--out", "x.pt", "--widths", "a,b"], "numbers like"),
    (["slim", "train", "--out", "x.pt", "--widen", "0.5"], "factor >= 1"),
    (["slim", "export", "missing.pt", "--out", "x.pt", "--width", "0.5"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *SMALL])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_supernet_is_searched_on_its_own_data_and_is_no_plain_checkpoint(tmp_path,
                                                                           capsys) -> None:
    bundle = prunelab.data.load("digits", limit=200)
    base = prunelab.models.create("lenet-300-100", input_shape=bundle.input_shape)
    net = slim.convert(base, width_range=(0.25, 1.0))
    path = tmp_path / "us.pt"
    slim.save_supernet(path, net, model_name="lenet-300-100",
                       model_kwargs={"input_shape": bundle.input_shape},
                       extra={"dataset": "digits"})
    with pytest.raises(prunelab.PrunelabError, match="is a slimmable supernet"):
        prunelab.load_checkpoint(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["slim", "export", str(path), "--width", "0.5", "--out", str(tmp_path / "e.pt"),
              "--dataset", "mnist"])
    assert exit_info.value.code == 2
    assert "was trained on digits, not mnist" in capsys.readouterr().err
    result = runner.invoke(app, ["slim", "export", str(path), "--width", "0.5", "--out",
                                 str(tmp_path / "e.pt"), "--limit", "200"])  # its own data
    assert result.exit_code == 0, result.output
    with pytest.raises(prunelab.PrunelabError, match="speedup must be a number >= 1"):
        slim.autoslim(net, bundle.loader("val", 64), speedup=float("nan"))


def test_train_refuses_a_folder_for_out_before_training(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["slim", "train", "--out", str(tmp_path), *SMALL])
    assert exit_info.value.code == 2
    assert "is a folder: give a file name" in capsys.readouterr().err


def test_search_refuses_latency_settings_without_latency(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["slim", "search", str(tmp_path / "x.pt"), "--speedup", "2", "--out",
              str(tmp_path / "w.json"), "--backend", "openvino"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "add --latency" in err

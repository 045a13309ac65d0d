"""deploy(backend="openvino") and backend="auto": served models compute what the original does."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import prunelab
from prunelab.deploy import compile_openvino, deploy
from prunelab.errors import InvalidValueError, PrunelabError

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
needs_openvino = pytest.mark.skipif(
    __import__("importlib").util.find_spec("openvino") is None,
    reason="openvino is not installed (pip install 'prunelab[openvino]')")




@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    torch.manual_seed(0)
    model = prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28))
    return prunelab.prune(model, "magnitude", sparsity=0.9, scope="layer")


@needs_openvino
def test_openvino_fp32_matches_a_pruned_conv_net_at_another_batch(resnet) -> None:
    deployed = deploy(resnet, X, backend="openvino")
    assert deployed.backend == "openvino" and deployed.max_abs_error < 1e-4
    assert any("inference precision f32" in s for s in deployed.steps)
    other = torch.randn(7, 3, 32, 32)  # a dynamic batch dimension
    assert torch.allclose(deployed(other), resnet.eval()(other), atol=1e-4)


@needs_openvino
def test_openvino_threads_are_set(resnet) -> None:
    deployed = deploy(resnet, X, backend="openvino", threads=1)
    assert any(s.endswith(", 1 threads") for s in deployed.steps), deployed.steps
    assert deployed.max_abs_error < 1e-4


@needs_openvino
def test_openvino_fp32_matches_a_masked_mlp(mlp) -> None:
    x = torch.randn(16, 1, 28, 28)
    deployed = deploy(mlp, x, backend="openvino")
    assert "masks baked into plain tensors" in deployed.steps
    assert torch.allclose(deployed(x), mlp(x), atol=1e-4)


@needs_openvino
def test_openvino_bf16_runs_and_reports_its_error(resnet) -> None:
    deployed = deploy(resnet, X, backend="openvino", precision="bf16")
    assert deployed(X).dtype == torch.float32
    assert 0 <= deployed.max_abs_error < 0.5
    assert any("asked bf16" in s for s in deployed.steps)


@needs_openvino
def test_the_ir_round_trips_from_disk(resnet, tmp_path) -> None:
    deployed = deploy(resnet, X, backend="openvino", ir_path=tmp_path / "m.xml")
    assert deployed.ir_path == tmp_path / "m.xml"
    assert (tmp_path / "m.bin").stat().st_size > 10_000
    reloaded = compile_openvino(tmp_path / "m.xml")
    assert torch.allclose(reloaded(X), resnet.eval()(X), atol=1e-4)


def test_auto_picks_a_checked_candidate_and_reports_the_times(resnet) -> None:
    deployed = deploy(resnet, X, backend="auto", repeats=2)
    chosen = [s for s in deployed.steps if "chosen by measurement" in s]
    assert len(chosen) == 1 and f"backend {deployed.backend} chosen" in chosen[0]
    for backend in ("torch", "onnxruntime"):
        assert f"{backend} " in chosen[0] and " ms" in chosen[0]
    assert deployed.max_abs_error < 1e-4


def test_a_missing_openvino_is_one_clear_error(resnet, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    with pytest.raises(PrunelabError, match=r"pip install 'prunelab\[openvino\]'"):
        deploy(resnet, X, backend="openvino")
    deployed = deploy(resnet, X, backend="auto", repeats=2)  # auto leaves it out
    assert "openvino" not in next(s for s in deployed.steps if "chosen" in s)


def test_an_unknown_backend_is_refused(resnet) -> None:
    with pytest.raises(InvalidValueError, match="backend must be one of torch, onnxruntime, "
                                                "openvino, auto"):
        deploy(resnet, X, backend="tensorrt")


def test_cli_export_without_openvino_exits_2(tmp_path, monkeypatch, capsys) -> None:
    from prunelab.checkpoint import save_checkpoint
    from prunelab.cli import main

    model = prunelab.models.create("lenet-5")
    save_checkpoint(tmp_path / "m.pt", model, model_name="lenet-5")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m.xml"),
              "--backend", "openvino"])
    assert exit_info.value.code == 2
    assert "prunelab[openvino]" in capsys.readouterr().err.replace("\n", "")


@needs_openvino
def test_cli_export_writes_a_checked_ir(tmp_path, capsys) -> None:
    from prunelab.checkpoint import save_checkpoint
    from prunelab.cli import main

    model = prunelab.models.create("lenet-5")
    prunelab.prune(model, "magnitude", sparsity=0.5)
    save_checkpoint(tmp_path / "m.pt", model, model_name="lenet-5")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m.xml"),
              "--backend", "openvino", "--precision", "bf16"])
    assert exit_info.value.code in (0, None)
    assert "max |output - original output|" in capsys.readouterr().out
    assert (tmp_path / "m.xml").is_file() and (tmp_path / "m.bin").is_file()

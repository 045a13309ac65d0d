"""deploy(): a pruned model ready to serve computes what the original computes."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import prunelab
from prunelab.deploy import SparseLinear, deploy, semi_structured_linear
from prunelab.errors import InvalidValueError, PrunelabError
from prunelab.sparsity import make_permanent

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_torch_backend_folds_batchnorm_and_matches(resnet) -> None:
    deployed = deploy(resnet, X, repeats=2)
    assert "BatchNorm folded into the convolution before it (21 of 21)" in deployed.steps
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.module.modules())
    assert torch.allclose(deployed(X), resnet.eval()(X), atol=1e-4)
    assert deployed.max_abs_error < 1e-4


def test_onnxruntime_backend_matches_and_keeps_its_file(resnet, tmp_path) -> None:
    deployed = deploy(resnet, X, backend="onnxruntime", onnx_path=tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size > 10_000
    other = torch.randn(7, 3, 32, 32)  # a dynamic batch dimension
    assert torch.allclose(deployed(other), resnet.eval()(other), atol=1e-4)


def test_bf16_reports_its_error_instead_of_failing(resnet) -> None:
    deployed = deploy(resnet, X, precision="bf16", repeats=2)
    assert 0 < deployed.max_abs_error < 0.5
    assert deployed(X).dtype == torch.float32


def test_sparse_linear_equals_the_dense_layer() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(50, 20)
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < 0.9] = 0
    x = torch.randn(3, 5, 50)
    assert torch.allclose(SparseLinear(layer)(x), layer(x), atol=1e-5)


def test_a_very_sparse_mlp_keeps_its_output_whatever_each_layer_chose() -> None:
    torch.manual_seed(0)
    model = prunelab.models.create("lenet-300-100", input_shape=(1, 28, 28))
    prunelab.prune(model, "magnitude", sparsity=0.95, scope="layer")
    x = torch.randn(64, 1, 28, 28)
    deployed = deploy(model, x, repeats=3)
    choices = [s for s in deployed.steps if "density" in s]
    assert len(choices) == 3 and all(("CSR" in s) or ("dense (" in s) for s in choices)
    assert torch.allclose(deployed(x), model(x), atol=1e-4)


def test_a_deployment_that_changes_the_output_is_refused(resnet, monkeypatch) -> None:
    import prunelab.deploy as module

    def broken(model: nn.Module) -> tuple[nn.Module, str]:
        model.fc.bias.data += 1
        return model, "broken"

    monkeypatch.setattr(module, "_fold_batchnorm", broken)
    with pytest.raises(PrunelabError, match="differs from the original by 1"):
        deploy(resnet, X, repeats=2)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"backend": "tensorrt"}, "backend must be one of torch, onnxruntime, openvino"),
    ({"precision": "int8"}, "precision must be one of fp32, bf16"),
    ({"backend": "onnxruntime", "precision": "bf16"}, "serves fp32"),
    ({"threads": 0}, "threads must be a positive whole number"),
    ({"repeats": 0}, "repeats must be a whole number >= 1"),
    ({"repeats": 1.5}, "repeats must be a whole number >= 1"),
    ({"onnx_path": "m.onnx"}, "onnx_path keeps the file of the onnxruntime backend"),
    ({"backend": "onnxruntime", "ir_path": "m.xml"}, "ir_path keeps the file of the openvino"),
])
def test_bad_deploy_options(resnet, kwargs, message) -> None:
    with pytest.raises(InvalidValueError, match=message):
        deploy(resnet, X, **kwargs)


@pytest.mark.parametrize(("example", "message"), [
    (torch.randn(4, 1, 28, 28), "takes inputs of shape \\(batch, 3, 32, 32\\)"),
    (torch.randn(3, 32, 32), "add the batch dimension"),
    (torch.randn(0, 3, 32, 32), "at least one input"),
    (torch.randn(2, 3, 32, 32, dtype=torch.float64), "float64 but the model's weights are"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.long), "token ids"),
])
def test_an_example_the_model_cannot_take_is_one_clear_error(resnet, example, message) -> None:
    with pytest.raises(InvalidValueError, match=message):
        deploy(resnet, example, repeats=1)


def test_a_model_that_reads_raw_pixels_takes_uint8_examples() -> None:
    class Pixels(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            return self.fc(x.float().flatten(1) / 255)

    served = deploy(Pixels(), torch.randint(0, 256, (2, 3, 2, 2), dtype=torch.uint8), repeats=1)
    assert served.max_abs_error == 0


def test_cli_export_of_a_language_model_feeds_token_ids_into_a_new_folder(tmp_path,
                                                                          capsys) -> None:
    from prunelab.checkpoint import save_checkpoint
    from prunelab.cli import main

    pytest.importorskip("onnxruntime")
    kwargs = {"num_classes": 65, "input_shape": (16,), "layers": 1, "width": 32, "heads": 4}
    save_checkpoint(tmp_path / "gpt.pt", prunelab.models.create("gpt-char", **kwargs),
                    model_name="gpt-char", model_kwargs=kwargs)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "gpt.pt"), "--out", str(tmp_path / "new" / "g.onnx")])
    assert exit_info.value.code in (0, None)
    assert "max |output - original output|" in capsys.readouterr().out
    assert (tmp_path / "new" / "g.onnx").is_file()


def test_threads_are_fixed_per_call_and_said(resnet) -> None:
    before = torch.get_num_threads()
    served = deploy(resnet, X, repeats=2, threads=1)
    assert "1 torch thread per call" in served.steps
    assert torch.get_num_threads() == before  # set around each call, then restored
    seen = []
    resnet_forward = served.module.forward

    def spy(*args):
        seen.append(torch.get_num_threads())
        return resnet_forward(*args)

    served.module.forward = spy
    served(X)
    assert seen == [1] and torch.get_num_threads() == before
    session = deploy(resnet, X, backend="onnxruntime", threads=1)
    assert any("1 intra-op threads" in step for step in session.steps)


def test_cli_export_writes_a_checked_onnx_file(tmp_path, capsys) -> None:
    from prunelab.checkpoint import save_checkpoint
    from prunelab.cli import main

    model = prunelab.models.create("lenet-5")
    prunelab.prune(model, "magnitude", sparsity=0.5)
    save_checkpoint(tmp_path / "m.pt", model, model_name="lenet-5")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m.onnx")])
    assert exit_info.value.code in (0, None)
    assert "max |output - original output|" in capsys.readouterr().out
    assert (tmp_path / "m.onnx").is_file()


@pytest.mark.parametrize("hidden", ["onnx", "onnxruntime"])
def test_a_missing_onnx_extra_is_one_clear_error(resnet, tmp_path, monkeypatch, capsys,
                                                 hidden) -> None:
    from prunelab.checkpoint import save_checkpoint
    from prunelab.cli import main

    monkeypatch.setitem(sys.modules, hidden, None)  # as if the package were not installed
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path))
    hint = r"pip install 'prunelab\[onnx\]'"
    with pytest.raises(PrunelabError, match=hint):
        deploy(resnet, X, backend="onnxruntime")
    with pytest.raises(PrunelabError, match=hint):
        prunelab.prune(resnet, "l2-channel", latency_speedup=1.5, example_input=X,
                       backend="onnxruntime")
    if hidden == "onnx":
        with pytest.raises(PrunelabError, match=r"exporting to ONNX needs onnx.*" + hint):
            prunelab.export_onnx(resnet, tmp_path / "m.onnx", X[:1])
        assert not (tmp_path / "m.onnx").exists()
    deployed = deploy(resnet, X, backend="auto", repeats=2)  # auto leaves onnxruntime out
    assert "onnxruntime" not in next(s for s in deployed.steps if "chosen" in s)
    model = prunelab.models.create("lenet-5")
    save_checkpoint(tmp_path / "m.pt", model, model_name="lenet-5")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m.onnx")])
    assert exit_info.value.code == 2
    assert "prunelab[onnx]" in capsys.readouterr().err


def two_four_mlp(width: int = 256) -> nn.Module:
    """A transformer-style MLP pruned to 2:4 along each Linear's inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
    prunelab.prune(model, "magnitude", 0.5, nm="2:4")
    return model


def test_follows_nm_by_hand() -> None:
    from prunelab.sparsity.nm import follows_nm

    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 0, 3], [0, 0, 0, 0, 1, 1, 0, 0]])
    assert follows_nm(w, 2, 4, 1) and not follows_nm(w, 1, 4, 1)
    assert not follows_nm(w, 2, 4, 0)  # 2 rows: no group of 4 along dim 0
    assert not follows_nm(torch.ones(3, 8), 2, 4, 1)


def test_two_four_layers_on_a_cpu_say_why_no_sparse_kernel_served_them() -> None:
    model = two_four_mlp(64)
    x = torch.randn(8, 64)
    deployed = deploy(model, x, repeats=2)
    assert ("2:4 sparse kernels not tried for 2 2:4 Linear layers: they need a CUDA GPU "
            "(NVIDIA Ampere or later)") in deployed.steps
    assert torch.allclose(deployed(x), model(x), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 sparse kernels need a CUDA GPU")
def test_two_four_kernels_on_a_gpu_compute_the_masked_layer() -> None:
    model = two_four_mlp().cuda()
    x = torch.randn(512, 256, device="cuda")
    layer = make_permanent(copy.deepcopy(model))[0].to(torch.bfloat16)
    served = semi_structured_linear(layer)
    dense = layer(x.bfloat16()).float()
    assert torch.allclose(served(x.bfloat16()).float(), dense, atol=0.05 * float(dense.abs().max()))
    deployed = deploy(model.float(), x, precision="bf16", repeats=3)
    choices = [s for s in deployed.steps if "density 0.500" in s]
    assert len(choices) == 2 and all(("ms 2:4)" in s) for s in choices), deployed.steps
    assert deployed.max_abs_error < 0.05 * float(model(x).abs().max())

"""Make a pruned model ready to serve, and check that it still computes the same function.

``deploy(model, example_input)`` does what a newcomer would not know to do by hand: masks baked
into plain tensors, BatchNorm folded into the convolution before it (``torch.fx``), the faster
memory layout chosen by timing both, and Linear layers whose weights are sparse enough served by
a CSR matrix product where that is *measured* to be faster on this machine, layer by layer. The
``onnxruntime`` backend exports the result to ONNX and serves it from an inference session. The
deployed model's output on the example is compared with the original's; fp32 must agree to float
tolerance (else :class:`~prunelab.errors.PrunelabError`), bf16 reports its error.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import InvalidValueError, PrunelabError
from prunelab.metrics.latency import steady_allocator
from prunelab.sparsity import make_permanent, masked_modules

BACKENDS = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16")
#: Linear layers denser than this are never tried as sparse (CSR only wins far below).
SPARSE_MAX_DENSITY = 0.5


@dataclass
class Deployed:
    """A model ready to serve: call it like the model. ``steps`` says what was done to it."""

    backend: str
    precision: str
    run: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module | None = None
    onnx_path: Path | None = None
    steps: list[str] = field(default_factory=list)
    max_abs_error: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def summary(self) -> str:
        """What was done, one step per line, and the error against the original."""
        return "\n".join([f"{self.backend} ({self.precision})", *(f"- {s}" for s in self.steps),
                          f"- max |output - original output| = {self.max_abs_error:.3g}"])


class SparseLinear(nn.Module):
    """A Linear layer whose weight is a CSR matrix: ``y = x Wᵀ + b`` as ``(W xᵀ)ᵀ + b``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # "sparse CSR support is in beta": we measured it
            warnings.simplefilter("ignore", UserWarning)
            self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def deploy(model: nn.Module, example_input: torch.Tensor, *, backend: str = "torch",
           precision: str = "fp32", sparse: bool = True, onnx_path: str | Path | None = None,
           repeats: int = 20) -> Deployed:
    """Return ``model`` made ready to serve on ``backend`` in ``precision``, output-checked.

    ``sparse=False`` keeps every layer dense; ``repeats`` is how many timed calls decide each
    measured choice (layout, dense or CSR per layer). ``onnx_path`` keeps the exported file of
    the ``onnxruntime`` backend (a temporary file otherwise).
    """
    if backend not in BACKENDS:
        raise InvalidValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise InvalidValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                                f"got {precision!r}")
    if backend == "onnxruntime" and precision != "fp32":
        raise InvalidValueError("the onnxruntime backend serves fp32; use backend='torch' for "
                                "bf16")
    if not isinstance(example_input, torch.Tensor):
        raise InvalidValueError("example_input must be a tensor (one batch of inputs)")
    steady_allocator()
    with torch.inference_mode():
        reference = model.eval()(example_input).float()
    plain, steps = _plain(model)
    plain, step = _fold_batchnorm(plain)
    steps.append(step)
    if backend == "onnxruntime":
        deployed = _onnxruntime(plain, example_input, onnx_path, steps)
    else:
        deployed = _torch(plain, example_input, precision, sparse, repeats, steps)
    with torch.inference_mode():
        error = float((deployed(example_input).float() - reference).abs().max())
    deployed.max_abs_error = error
    tolerance = 1e-4 * max(1.0, float(reference.abs().max()))
    if precision == "fp32" and not error <= tolerance:
        raise PrunelabError(f"the deployed model ({backend}) differs from the original by "
                            f"{error:.3g} (tolerance {tolerance:.3g}); steps: "
                            f"{'; '.join(deployed.steps)}")
    return deployed


def _plain(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """An eval-mode copy with masks baked into plain tensors."""
    if masked_modules(model):
        return make_permanent(copy.deepcopy(model)).eval(), ["masks baked into plain tensors"]
    return copy.deepcopy(model).eval(), []


def _fold_batchnorm(model: nn.Module) -> tuple[nn.Module, str]:
    """Fold each BatchNorm into the convolution before it (torch.fx); say why when it cannot."""
    from torch.fx.experimental.optimization import fuse

    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not norms:
        return model, "no BatchNorm to fold"
    try:
        fused = fuse(model)
    except Exception as exc:  # any tracing failure leaves the model as it was
        return model, f"BatchNorm not folded: the model does not trace ({type(exc).__name__})"
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    return fused, f"BatchNorm folded into the convolution before it ({norms - left} of {norms})"


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _torch(model: nn.Module, x: torch.Tensor, precision: str, sparse: bool, repeats: int,
           steps: list[str]) -> Deployed:
    if precision == "bf16":
        model = model.to(torch.bfloat16)
        steps.append("weights in bfloat16 (inputs cast on the way in, outputs back to float32)")
        if sparse:
            steps.append("sparse kernels not tried in bf16")
        sparse = False
    if sparse:
        steps += _sparse_linears(model, x.to(next(model.parameters()).dtype), repeats)
    layout = torch.contiguous_format
    if x.dim() == 4 and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        layout, step = _faster_layout(model, x, precision, repeats)
        steps.append(step)
    dtype = torch.bfloat16 if precision == "bf16" else x.dtype

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            inputs = inputs.to(dtype)
            if inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=layout)
            return model(inputs).float()

    return Deployed("torch", precision, run, module=model, steps=steps)


def _faster_layout(model: nn.Module, x: torch.Tensor, precision: str, repeats: int
                   ) -> tuple[torch.memory_format, str]:
    dtype = torch.bfloat16 if precision == "bf16" else x.dtype
    times = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=layout)
        inputs = x.to(dtype).contiguous(memory_format=layout)
        times[layout] = _median_ms(lambda inputs=inputs: model(inputs), repeats)
    best = min(times, key=times.get)
    model.to(memory_format=best)
    name = "channels_last" if best is torch.channels_last else "NCHW"
    return best, (f"{name} layout (measured {times[torch.contiguous_format]:.2f} ms NCHW, "
                  f"{times[torch.channels_last]:.2f} ms channels_last)")


def _sparse_linears(model: nn.Module, x: torch.Tensor, repeats: int) -> list[str]:
    """Swap each sparse-enough Linear for a :class:`SparseLinear` where that is measured faster
    on its real input; return one line per candidate saying what was chosen."""
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
                  and float((m.weight != 0).float().mean()) <= SPARSE_MAX_DENSITY}
    if not candidates:
        return []
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, _output: Any) -> None:
            inputs.setdefault(name, args[0])
        return hook

    hooks = [m.register_forward_hook(keep_input(n)) for n, m in candidates.items()]
    with torch.inference_mode():
        model(x)
    for hook in hooks:
        hook.remove()
    lines = []
    for name, linear in candidates.items():
        density = float((linear.weight != 0).float().mean())
        sparse = SparseLinear(linear)
        layer_input = inputs[name]
        dense_ms = _median_ms(lambda lin=linear, i=layer_input: lin(i), repeats)
        sparse_ms = _median_ms(lambda s=sparse, i=layer_input: s(i), repeats)
        if sparse_ms < dense_ms:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, sparse)
        choice = "CSR" if sparse_ms < dense_ms else "dense"
        lines.append(f"{name}: {choice} (density {density:.3f}; measured {dense_ms:.3f} ms "
                     f"dense, {sparse_ms:.3f} ms CSR)")
    return lines


def _onnxruntime(model: nn.Module, x: torch.Tensor, onnx_path: str | Path | None,
                 steps: list[str]) -> Deployed:
    import onnxruntime

    from prunelab.checkpoint import export_onnx

    if onnx_path is None:
        onnx_path = Path(tempfile.mkdtemp(prefix="prunelab-deploy-")) / "model.onnx"
    path = export_onnx(model, onnx_path, x)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    steps.append(f"exported to ONNX ({path}) and served by onnxruntime "
                 f"{onnxruntime.__version__} with all graph optimisations")

    def run(inputs: torch.Tensor) -> torch.Tensor:
        array = inputs.detach().float().contiguous().numpy()
        return torch.from_numpy(session.run(None, {"input": array})[0])

    return Deployed("onnxruntime", "fp32", run, onnx_path=path, steps=steps)

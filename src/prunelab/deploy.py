"""Make a pruned model ready to serve, and check that it still computes the same function.

``deploy(model, example_input)`` does what a newcomer would not know to do by hand: masks baked
into plain tensors, BatchNorm folded into the convolution before it (``torch.fx``), the faster
memory layout chosen by timing both, and Linear layers whose weights are sparse enough served by
a CSR matrix product where that is *measured* to be faster on this machine, layer by layer (on a
CUDA GPU in bf16: Linear layers with a 2:4 pattern served by the GPU's semi-structured sparse
kernels, likewise measured). The ``onnxruntime`` backend exports the result to ONNX and serves
it from an inference session; the ``openvino`` backend converts that ONNX file to an OpenVINO
model compiled for the CPU (optionally saved as IR). ``backend="auto"`` builds every installed
backend and keeps the fastest on the example.
The deployed model's output on the example is compared with the original's; fp32 must agree to
float tolerance (else :class:`~prunelab.errors.PrunelabError`), bf16 reports its error.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunelab.errors import InvalidValueError, PrunelabError
from prunelab.metrics.latency import call_times, steady_allocator
from prunelab.sparsity import make_permanent, masked_modules
from prunelab.sparsity.nm import follows_nm
from prunelab.utils import (
    check_input,
    input_errors,
    missing_packages,
    require,
    torch_threads,
    warn_if_emulated_bf16,
)

BACKENDS = ("torch", "onnxruntime", "openvino")
#: Which package each runtime backend needs, and the extra that installs it.
_PACKAGES = {"onnxruntime": (("onnx", "onnxruntime"), "onnx"),
             "openvino": (("onnx", "openvino"), "openvino")}  # it converts the ONNX export
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
    ir_path: Path | None = None
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


def semi_structured_linear(linear: nn.Linear) -> nn.Linear:
    """A copy of ``linear`` whose weight (2:4 along its inputs, on a CUDA GPU, fp16/bf16) is a
    :func:`torch.sparse.to_sparse_semi_structured` tensor, served by sparse tensor cores.
    torch refuses shapes and dtypes the kernels cannot take (the error says which)."""
    from torch.sparse import to_sparse_semi_structured

    served = copy.deepcopy(linear)
    served.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()),
                                 requires_grad=False)
    return served


def deploy(model: nn.Module, example_input: torch.Tensor, *, backend: str = "torch",
           precision: str = "fp32", sparse: bool = True, onnx_path: str | Path | None = None,
           ir_path: str | Path | None = None, repeats: int = 20,
           threads: int | None = None) -> Deployed:
    """Return ``model`` made ready to serve on ``backend`` in ``precision``, output-checked.

    ``sparse=False`` keeps every layer dense; ``repeats`` is how many timed calls decide each
    measured choice (layout, dense or sparse kernel per layer, and the backend under ``"auto"``).
    The torch backend serves the model on the device of ``example_input`` (the model must be
    there too); on a CUDA GPU in bf16, Linear layers with a 2:4 pattern are tried with 2:4
    sparse kernels, on a CPU in fp32 sparse-enough Linear layers with CSR.
    ``threads`` fixes how many threads a call uses (torch's intra-op threads around each call,
    onnxruntime's intra-op pool, OpenVINO's ``INFERENCE_NUM_THREADS``); by default each runtime
    uses its own default (all cores for onnxruntime and OpenVINO, the process's torch setting).
    ``onnx_path`` keeps the exported file of the ``onnxruntime`` backend (a temporary file
    otherwise); ``ir_path`` (``.xml``, with its ``.bin`` beside it) saves the ``openvino`` model.
    """
    if backend not in (*BACKENDS, "auto"):
        raise InvalidValueError(f"backend must be one of {', '.join(BACKENDS)}, auto; "
                                f"got {backend!r}")
    if precision not in PRECISIONS:
        raise InvalidValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                                f"got {precision!r}")
    if backend == "onnxruntime" and precision != "fp32":
        raise InvalidValueError("the onnxruntime backend serves fp32; use backend='torch' or "
                                "'openvino' for bf16")
    if not isinstance(example_input, torch.Tensor):
        raise InvalidValueError("example_input must be a tensor (one batch of inputs)")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise InvalidValueError(f"threads must be a positive whole number (or None for the "
                                f"runtime's default), got {threads!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise InvalidValueError(f"repeats must be a whole number >= 1, got {repeats!r}")
    for name, path, serves in (("onnx_path", onnx_path, "onnxruntime"),
                               ("ir_path", ir_path, "openvino")):
        if path is not None and backend not in (serves, "auto"):
            raise InvalidValueError(f"{name} keeps the file of the {serves} backend; with "
                                    f"backend={backend!r} nothing would be written there")
        if path is not None and Path(path).is_dir():
            raise InvalidValueError(f"{name} {str(path)!r} is a folder: give a file name")
    if backend != "auto":
        require_backend(backend)
    _check_example(model, example_input)
    steady_allocator()
    with torch.inference_mode(), input_errors(model, example_input):
        reference = model.eval()(example_input).float()
    plain, steps = _plain(model)
    plain, step = _fold_batchnorm(plain)
    steps.append(step)
    options = {"sparse": sparse, "repeats": repeats, "onnx_path": onnx_path, "ir_path": ir_path,
               "threads": threads}
    if backend == "auto":
        return _auto(plain, example_input, precision, reference, steps, options)
    deployed = _build(backend, plain, example_input, precision, steps, options)
    error, tolerance = _error(deployed, example_input, reference)
    if precision == "fp32" and not error <= tolerance:
        raise PrunelabError(f"the deployed model ({backend}) differs from the original by "
                            f"{error:.3g} (tolerance {tolerance:.3g}); steps: "
                            f"{'; '.join(deployed.steps)}")
    return deployed


def _check_example(model: nn.Module, x: torch.Tensor) -> None:
    """Refuse an example batch the model cannot take (empty, wrong dtype or shape) in one line."""
    if x.dim() == 0 or x.shape[0] == 0:
        raise InvalidValueError(f"example_input must hold at least one input (a batch), got "
                                f"shape {tuple(x.shape)}")
    check_input(model, x)
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    wants_tokens = not getattr(model, "input_dtype", torch.float32).is_floating_point
    if (weight is not None and not wants_tokens and x.is_floating_point()
            and x.dtype != weight.dtype):
        raise InvalidValueError(f"example_input is {x.dtype} but the model's weights are "
                                f"{weight.dtype}: convert it (x.to({weight.dtype}))")
    if not wants_tokens and not x.is_floating_point() and x.dtype != torch.uint8:  # raw pixels
        raise InvalidValueError(f"example_input is {x.dtype}; the model takes floating-point "
                                "inputs (x.float())")


def _numpy(inputs: torch.Tensor) -> Any:
    """A batch as the contiguous NumPy array a runtime reads: float32, or token ids as they are."""
    inputs = inputs.detach()
    return (inputs.float() if inputs.is_floating_point() else inputs).contiguous().numpy()


def require_backend(backend: str) -> None:
    """One clear error when a runtime backend's package is not installed."""
    if backend in _PACKAGES:
        require(f"the {backend} backend", *_PACKAGES[backend])


def _installed(backend: str) -> bool:
    return backend not in _PACKAGES or not missing_packages(*_PACKAGES[backend][0])


def _build(backend: str, plain: nn.Module, x: torch.Tensor, precision: str, steps: list[str],
           options: dict[str, Any]) -> Deployed:
    threads = options["threads"]
    if backend == "onnxruntime":
        return _onnxruntime(plain, x, options["onnx_path"], steps, threads)
    if backend == "openvino":
        return _openvino(plain, x, precision, options["ir_path"], steps, threads)
    if threads is None:
        return _torch(plain, x, precision, options["sparse"], options["repeats"], steps)
    with torch_threads(threads):
        deployed = _torch(plain, x, precision, options["sparse"], options["repeats"], steps)
    serve = deployed.run

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch_threads(threads):
            return serve(inputs)

    deployed.run = run
    deployed.steps.append(f"{threads} torch thread{'s' if threads > 1 else ''} per call")
    return deployed



def _error(deployed: Deployed, x: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """The deployed model's largest error on ``x`` (also stored on it), and the fp32 tolerance:
    1e-4 relative, 2e-3 on a GPU that multiplies fp32 in TF32 (10-bit mantissas), where folding
    BatchNorm or another layout rounds differently (ResNet-20 on an H200: 2.5e-4)."""
    with torch.inference_mode():
        error = float((deployed(x).float() - reference).abs().max())
    deployed.max_abs_error = error
    tf32 = x.is_cuda and (torch.backends.cuda.matmul.allow_tf32
                          or torch.backends.cudnn.allow_tf32)
    return error, (2e-3 if tf32 else 1e-4) * max(1.0, float(reference.abs().max()))


def _auto(plain: nn.Module, x: torch.Tensor, precision: str, reference: torch.Tensor,
          steps: list[str], options: dict[str, Any]) -> Deployed:
    """Build every installed backend that serves ``precision``, time each on ``x`` and keep the
    fastest whose output passes the check (fp32 within tolerance; bf16 reports its error)."""
    candidates = [b for b in BACKENDS if _installed(b)
                  and not (b == "onnxruntime" and precision != "fp32")]
    built, notes = {}, []
    for backend in candidates:
        try:
            deployed = _build(backend, copy.deepcopy(plain), x, precision, list(steps), options)
        except Exception as exc:  # a backend that cannot take this model is skipped, and said
            notes.append(f"{backend}: failed to build ({type(exc).__name__}: {exc})"[:200])
            continue
        error, tolerance = _error(deployed, x, reference)
        if precision == "fp32" and not error <= tolerance:
            notes.append(f"{backend}: output differs by {error:.3g}, not used")
            continue
        built[backend] = (_median_ms(lambda d=deployed: d(x), options["repeats"]), deployed)
    if not built:
        raise PrunelabError(f"no backend could serve this model: {'; '.join(notes)}")
    best = min(built, key=lambda b: built[b][0])
    times = ", ".join(f"{b} {ms:.2f} ms" for b, (ms, _) in built.items())
    chosen = built[best][1]
    chosen.steps.append(f"backend {best} chosen by measurement on the example ({times}; "
                        f"median of {options['repeats']})")
    chosen.steps += notes
    return chosen


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
    """Median time per call of ``fn`` in ms (synchronised bursts where CUDA is in use)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return statistics.median(call_times(fn, warmup=2, repeats=repeats, cuda=cuda))


def _torch(model: nn.Module, x: torch.Tensor, precision: str, sparse: bool, repeats: int,
           steps: list[str]) -> Deployed:
    if precision == "bf16":
        warn_if_emulated_bf16(x.device, "the torch backend")
        model = model.to(torch.bfloat16)
        steps.append("weights in bfloat16 (inputs cast on the way in, outputs back to float32)")
    if sparse:
        steps += _sparse_kernels(model, x.to(next(model.parameters()).dtype), precision, repeats)
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


def _sparse_kernels(model: nn.Module, x: torch.Tensor, precision: str, repeats: int
                    ) -> list[str]:
    """Serve sparse Linear layers with a sparse kernel where that is measured faster: 2:4
    semi-structured on a CUDA GPU in bf16, CSR on a CPU in fp32. Say why when none is tried."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    two_four = {n: m for n, m in linears.items() if follows_nm(m.weight, 2, 4, 1)}
    sparse_enough = {n: m for n, m in linears.items()
                     if float((m.weight != 0).float().mean()) <= SPARSE_MAX_DENSITY}
    if x.is_cuda:
        if not two_four:
            return [f"CSR kernels not tried on a GPU ({len(sparse_enough)} sparse Linear "
                    "layers, none 2:4)"] if sparse_enough else []
        if precision != "bf16":
            return [f"2:4 sparse kernels not tried for {len(two_four)} 2:4 Linear layers: "
                    "they serve fp16/bf16 (deploy with precision='bf16')"]
        return _swap_where_faster(model, x, repeats, two_four, semi_structured_linear, "2:4")
    lines = [f"2:4 sparse kernels not tried for {len(two_four)} 2:4 Linear layers: they need a "
             "CUDA GPU (NVIDIA Ampere or later)"] if two_four else []
    if precision == "bf16":
        return [*lines, "CSR kernels not tried in bf16"]
    return lines + _swap_where_faster(model, x, repeats, sparse_enough, SparseLinear, "CSR")


def _swap_where_faster(model: nn.Module, x: torch.Tensor, repeats: int,
                       candidates: dict[str, nn.Linear],
                       make: Callable[[nn.Linear], nn.Module], kernel: str) -> list[str]:
    """Swap each candidate Linear for ``make(linear)`` where that is measured faster on the
    layer's real input; return one line per candidate saying what was chosen."""
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
        layer_input = inputs[name]
        try:
            sparse = make(linear)
            sparse_ms = _median_ms(lambda s=sparse, i=layer_input: s(i), repeats)
        except (RuntimeError, ValueError) as exc:  # a shape, dtype or GPU the kernel refuses
            lines.append(f"{name}: dense (density {density:.3f}; the {kernel} kernel refused "
                         f"it: {str(exc).splitlines()[0][:120]})")
            continue
        dense_ms = _median_ms(lambda lin=linear, i=layer_input: lin(i), repeats)
        if sparse_ms < dense_ms:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, sparse)
        choice = kernel if sparse_ms < dense_ms else "dense"
        lines.append(f"{name}: {choice} (density {density:.3f}; measured {dense_ms:.3f} ms "
                     f"dense, {sparse_ms:.3f} ms {kernel})")
    return lines


def _export(model: nn.Module, x: torch.Tensor, onnx_path: str | Path | None) -> Path:
    from prunelab.checkpoint import export_onnx

    if onnx_path is None:
        onnx_path = Path(tempfile.mkdtemp(prefix="prunelab-deploy-")) / "model.onnx"
    Path(onnx_path).parent.mkdir(parents=True, exist_ok=True)
    return export_onnx(model, onnx_path, x)


def _onnxruntime(model: nn.Module, x: torch.Tensor, onnx_path: str | Path | None,
                 steps: list[str], threads: int | None = None) -> Deployed:
    import onnxruntime

    path = _export(model, x, onnx_path)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    steps.append(f"exported to ONNX ({path}) and served by onnxruntime "
                 f"{onnxruntime.__version__} with all graph optimisations, "
                 f"{threads or 'default'} intra-op threads")

    def run(inputs: torch.Tensor) -> torch.Tensor:
        array = _numpy(inputs)
        return torch.from_numpy(session.run(None, {"input": array})[0])

    return Deployed("onnxruntime", "fp32", run, onnx_path=path, steps=steps)


def _openvino(model: nn.Module, x: torch.Tensor, precision: str, ir_path: str | Path | None,
              steps: list[str], threads: int | None = None) -> Deployed:
    """Convert through the ONNX export (the same tested graph, dynamic batch) and compile it for
    the CPU with the inference precision hint; ``ir_path`` keeps the IR in full fp32 weights."""
    import openvino

    with tempfile.TemporaryDirectory(prefix="prunelab-deploy-") as folder:
        model_ov = openvino.convert_model(str(_export(model, x, Path(folder) / "model.onnx")))
    steps.append("exported to ONNX and converted by openvino.convert_model")
    if ir_path is not None:
        ir_path = Path(ir_path).with_suffix(".xml")
        ir_path.parent.mkdir(parents=True, exist_ok=True)
        openvino.save_model(model_ov, str(ir_path), compress_to_fp16=False)
        steps.append(f"OpenVINO IR saved to {ir_path} (+ .bin), fp32 weights")
    deployed = compile_openvino(model_ov, precision, threads)
    deployed.steps[:0] = steps
    deployed.ir_path = ir_path
    return deployed


def compile_openvino(model: Any, precision: str = "fp32", threads: int | None = None
                     ) -> Deployed:
    """Compile an OpenVINO model (or the path of a saved ``.xml`` IR) for the CPU with
    ``precision`` as its inference precision hint, as a :class:`Deployed` taking torch tensors.
    ``threads`` sets ``INFERENCE_NUM_THREADS`` (default: OpenVINO's, all cores).

    On a CPU without bf16 support OpenVINO runs f32 whatever the hint; the steps say which ran.
    """
    require("the openvino backend", ("openvino",), "openvino")
    if precision not in PRECISIONS:
        raise InvalidValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                                f"got {precision!r}")
    import openvino

    core = openvino.Core()
    if isinstance(model, (str, Path)):
        model = core.read_model(str(model))
    hint = {"fp32": "f32", "bf16": "bf16"}[precision]
    config = {"INFERENCE_PRECISION_HINT": hint}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    version = openvino.__version__.split("-")[0]
    step = (f"compiled by OpenVINO {version} for the CPU, inference precision {ran} (asked "
            f"{hint}), {compiled.get_property('INFERENCE_NUM_THREADS') or 'default'} threads")
    if precision == "bf16" and "BF16" not in capabilities:
        step += "; this CPU has no bf16 support, so it computes in f32"
    request = compiled.create_infer_request()

    def run(inputs: torch.Tensor) -> torch.Tensor:
        array = _numpy(inputs)
        request.infer({0: array})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return Deployed("openvino", precision, run, steps=[step])

"""Measured latency: warm-up, median of repeats, fixed thread count, a steady allocator."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from prunelab.errors import InvalidValueError
from prunelab.metrics.flops import as_inputs
from prunelab.sparsity import make_permanent, masked_modules
from prunelab.utils import eval_mode, torch_threads


@dataclass(frozen=True)
class Latency:
    """Wall-clock time of one forward pass, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int
    threads: int
    batch_size: int
    backend: str = "torch eager (CPU)"
    allocator: str = "default"

    def to_dict(self) -> dict:
        return asdict(self)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems


@functools.cache
def steady_allocator() -> str:
    """Keep freed activations in the heap for the rest of the process; say what was done.

    By default glibc serves large blocks (a CNN's activations) with mmap and returns freed heap
    memory to the system, adapting its thresholds as it goes, so the same forward pass can flip
    between two speeds within one process: one with ~10,000 page faults per call (ResNet-56 at
    batch 64: 99 vs 166 ms). Raising the mmap and trim thresholds (what the environment variables
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` do at start-up) makes the freed memory
    reusable without faults. Only glibc has ``mallopt``; elsewhere nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return "default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and libc.mallopt(
            _M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return "default"
    return "glibc, mmap threshold 32 MiB, no trimming" if ok else "default"


def call_times(fn: Callable[[], object], *, warmup: int, repeats: int,
               cuda: bool = False) -> list[float]:
    """Milliseconds per call of ``fn``, ``repeats`` samples after ``warmup`` calls, in
    inference mode. With ``cuda`` each sample is a burst of 10 calls with the GPU synchronised
    around it: kernels run asynchronously, so timing one call alone would time its launch, and
    a server keeps the GPU busy, so the host's work per call overlaps the kernels before it."""
    sync, burst = (torch.cuda.synchronize, 10) if cuda else ((lambda: None), 1)
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for _ in range(burst):
                fn()
            sync()
            times.append((time.perf_counter() - start) * 1e3 / burst)
    return times


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor],
    *,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
) -> Latency:
    """Median forward time over ``repeats`` runs after ``warmup`` runs, with ``threads`` threads
    (on a GPU, each run the average of a synchronised burst: :func:`call_times`).

    A masked model is timed as what it ships as: a copy with the masks made permanent (dense
    tensors holding zeros), not with the cost of re-applying masks on every call. The process's
    allocator is first made steady (:func:`steady_allocator`), so timings do not flip between
    two states with page faults.
    """
    if repeats < 1 or warmup < 0:
        raise InvalidValueError("latency needs repeats >= 1 and warmup >= 0")
    allocator = steady_allocator()
    if masked_modules(model):
        model = make_permanent(copy.deepcopy(model))
    inputs = as_inputs(example_input)
    threads = threads or torch.get_num_threads()
    with torch_threads(threads), eval_mode(model):
        times = call_times(lambda: model(*inputs), warmup=warmup, repeats=repeats,
                           cuda=inputs[0].is_cuda)
    deciles = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return Latency(
        median_ms=statistics.median(times),
        p10_ms=deciles[0],
        p90_ms=deciles[-1],
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        batch_size=int(inputs[0].shape[0]) if inputs[0].dim() else 1,
        allocator=allocator,
    )

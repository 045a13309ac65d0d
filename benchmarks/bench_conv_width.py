"""How fast one 3x3 convolution runs on this CPU as its channel count shrinks (GFLOP/s).

Channel pruning makes convolutions narrower. FLOP counts assume the work shrinks with the
channels, but a kernel that vectorises over channels runs a narrow layer at a fraction of its
peak. This measures the convolutions of the CIFAR ResNets' three stages (32x32, 16x16 and 8x8
maps) at the widths pruning leaves them (batch 64, channels_last, stride 1, in = out channels),
to explain where measured speed-ups fall short of theoretical ones.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import median, report

STAGES = {32: [4, 8, 12, 16], 16: [8, 16, 24, 32], 8: [16, 24, 32, 40, 48, 64]}


def conv_ms(channels: int, size: int, batch: int, repeats: int) -> float:
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for _ in range(5):
            conv(x)
        for _ in range(repeats):
            start = time.perf_counter()
            conv(x)
            times.append((time.perf_counter() - start) * 1e3)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size, widths in STAGES.items():
        for channels in widths:
            ms = conv_ms(channels, size, args.batch, args.repeats)
            flops = 2 * args.batch * channels * channels * 9 * size * size
            rows.append({"map": f"{size}x{size}", "channels": channels, "ms": ms,
                         "gflops_per_s": flops / ms / 1e6})
    report("conv_width", "3x3 convolution throughput vs channel count (CPU)", rows,
           {"threads": args.threads, "batch": args.batch, "layout": "channels_last"})


if __name__ == "__main__":
    main()

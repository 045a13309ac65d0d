"""How fast one 3x3 convolution runs on this CPU as its channel count shrinks (GFLOP/s).

Channel pruning makes convolutions narrower. FLOP counts assume the work shrinks with the
channels, but a kernel that vectorises over channels runs a narrow layer at a fraction of its
peak. This measures the convolutions of the CIFAR ResNets' three stages (32x32, 16x16 and 8x8
maps) at the widths pruning leaves them (batch 64, channels_last, stride 1), with as many input
as output channels and, for each stage, halving only the inputs or only the outputs: kernels
block over output channels (16 floats per AVX-512 register), so a narrow output costs more than
a narrow input. It explains where measured speed-ups fall short of theoretical ones.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from common import median, report, timed

SQUARE = {32: [4, 8, 12, 16], 16: [8, 16, 24, 32], 8: [16, 24, 32, 40, 48, 64]}
HALVED = {32: 16, 16: 32, 8: 64}  # each stage's full width, its inputs or outputs halved


def conv_ms(inputs: int, outputs: int, size: int, batch: int, repeats: int) -> float:
    conv = torch.nn.Conv2d(inputs, outputs, 3, padding=1, bias=False).eval()
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, inputs, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(5):
            conv(x)
        return median([timed(partial(conv, x)) * 1e3 for _ in range(repeats)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    shapes = [(size, c, c) for size, widths in SQUARE.items() for c in widths]
    shapes += [(size, c, c // 2) for size, c in HALVED.items()]
    shapes += [(size, c // 2, c) for size, c in HALVED.items()]
    for size, inputs, outputs in shapes:
        ms = conv_ms(inputs, outputs, size, args.batch, args.repeats)
        flops = 2 * args.batch * inputs * outputs * 9 * size * size
        rows.append({"map": f"{size}x{size}", "in": inputs, "out": outputs, "ms": ms,
                     "gflops_per_s": flops / ms / 1e6})
    report("conv_width", "3x3 convolution throughput vs channel count (CPU)", rows,
           {"threads": args.threads, "batch": args.batch, "layout": "channels_last"})


if __name__ == "__main__":
    main()

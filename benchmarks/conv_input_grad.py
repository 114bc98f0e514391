"""The input gradient of a B-cos network's first layer (6 input channels, Eq. 18): oneDNN against
ATen's GEMM + col2im convolution backward, each as a ratio to the layer's forward convolution.

`explain` returns exactly this gradient, so its convolution backward is on every explanation's
path. oneDNN handles so few input channels poorly; ``ConvGeometry`` therefore takes the GEMM path
on CPU for up to ``SMALL_INPUT_CHANNELS`` input channels. The shapes are the first layers of the
shipped models (MaxOut 2 doubles the output channels), at the batch and size of
``benchmarks/explain.py``, and a row with more input channels where oneDNN stays.

    python benchmarks/conv_input_grad.py [--batch 32] [--size 128] [--reps 7]
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from timm_bcos.layers.bcos_geometry import SMALL_INPUT_CHANNELS

from _timing import benchmark_parser, interleaved_medians, set_up  # benchmarks/_timing.py

# (name, input channels, output channels incl. MaxOut, kernel, stride, padding, size divisor)
LAYERS = [
    ('resnet stem 7x7/2', 6, 128, 7, 2, 3, 1),
    ('3x3/1 stem', 6, 64, 3, 1, 1, 1),
    ('convnext patchify 4x4/4', 6, 256, 4, 4, 0, 1),
    ('vit patch embed 16x16/16', 6, 384, 16, 16, 0, 1),
    ('3x3/1, 64 channels (oneDNN kept)', 64, 128, 3, 1, 1, 4),
]


def main(argv=None) -> None:
    args = benchmark_parser(__doc__, batch=32, size=128, reps=7).parse_args(argv)
    set_up(args.threads)
    print(f'batch {args.batch}, {args.size} px, float32, {args.threads} threads, median of {args.reps}; '
          f'the GEMM path is taken for <= {SMALL_INPUT_CHANNELS} input channels')
    print(f'{"layer":34s}{"fwd ms":>9s}{"oneDNN/fwd":>12s}{"GEMM/fwd":>10s}{"GEMM/oneDNN":>13s}')
    for name, cin, cout, k, s, p, div in LAYERS:
        size = args.size // div
        x = torch.rand(args.batch, cin, size, size)
        w = torch.randn(cout, cin, k, k)
        g = torch.randn_like(F.conv2d(x, w, stride=s, padding=p))
        t = interleaved_medians({
            'fwd': lambda: F.conv2d(x, w, stride=s, padding=p),
            'onednn': lambda: torch.ops.aten.convolution_backward(
                g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, [True, False, False]),
            'gemm': lambda: torch.ops.aten._slow_conv2d_backward(g, x, w, [k, k], [s, s], [p, p], [True, False, False]),
        }, args.reps)
        print(f'{name:34s}{t["fwd"] * 1e3:9.1f}{t["onednn"] / t["fwd"]:12.2f}{t["gemm"] / t["fwd"]:10.2f}'
              f'{t["gemm"] / t["onednn"]:13.2f}')


if __name__ == '__main__':
    main()

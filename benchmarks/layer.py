"""Speed of `BcosConv2d(max_out=2, b=2)` against a plain convolution and the `bcos` package's layer.

Prints, per shape, fwd+bwd and fwd-only time ratios against (a) ``nn.Conv2d`` with 2*Cout outputs
and no bias (the convolution a MaxOut-2 B-cos layer wraps), (b) ``bcos.modules.BcosConv2d``
(B-cos v2, the reference implementation), all in this process, then the medians over shapes.

    python benchmarks/layer.py [--threads 2] [--reps 7] [--max-out 2] [--b 2]
"""
from __future__ import annotations

import statistics
import warnings

import torch
from torch import nn

from timm_bcos import BcosConv2d

from _timing import benchmark_parser, interleaved_medians, set_up  # benchmarks/_timing.py

SHAPES = [  # (N, Cin, Cout, HW, k)
    (32, 64, 64, 32, 3),
    (32, 128, 128, 16, 3),
    (16, 256, 256, 14, 3),
    (32, 6, 64, 32, 3),
    (16, 256, 1024, 14, 1),
    (16, 512, 512, 7, 3),
]


def _runners(layer: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        grad = torch.randn_like(layer(x))

    def fwd():
        with torch.no_grad():
            layer(x)

    def fwd_bwd():  # a dense upstream gradient, as inside a network
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)

    return fwd, fwd_bwd


def main() -> None:
    parser = benchmark_parser(__doc__, reps=7)
    parser.add_argument('--max-out', type=int, default=2)
    parser.add_argument('--b', type=float, default=2.0)
    args = parser.parse_args()
    set_up(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            from bcos.modules import BcosConv2d as RefBcosConv2d
    except ImportError:
        RefBcosConv2d = None

    print(f'BcosConv2d(max_out={args.max_out}, b={args.b:g}) vs nn.Conv2d({args.max_out}*Cout, bias=False) '
          f'and bcos.modules.BcosConv2d; {args.threads} threads, median of {args.reps}')
    header = (f'{"N,Cin,Cout,HW,k":>22} | {"ours fb ms":>10} | {"/conv fb":>8} | {"/conv f":>8} | {"/ref fb":>8} | '
              f'{"/ref f":>8}')
    print(header)
    print('-' * len(header))
    ratios = {k: [] for k in ('conv_fb', 'conv_f', 'ref_fb', 'ref_f')}
    for n, cin, cout, hw, k in SHAPES:
        x = torch.rand(n, cin, hw, hw, requires_grad=True)
        ours = BcosConv2d(cin, cout, k, padding=k // 2, b=args.b, max_out=args.max_out)
        conv = nn.Conv2d(cin, cout * args.max_out, k, padding=k // 2, bias=False)
        layers = {'ours': ours, 'conv': conv}
        if RefBcosConv2d is not None:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                layers['ref'] = RefBcosConv2d(cin, cout, k, padding=k // 2, b=args.b, max_out=args.max_out)
        runners = {name: _runners(layer, x) for name, layer in layers.items()}
        t_fb = interleaved_medians({name: r[1] for name, r in runners.items()}, args.reps)
        t_f = interleaved_medians({name: r[0] for name, r in runners.items()}, args.reps)
        t = {name: (t_fb[name], t_f[name]) for name in layers}
        row = [t['ours'][0] / t['conv'][0], t['ours'][1] / t['conv'][1]]
        ratios['conv_fb'].append(row[0])
        ratios['conv_f'].append(row[1])
        if 'ref' in t:
            row += [t['ours'][0] / t['ref'][0], t['ours'][1] / t['ref'][1]]
            ratios['ref_fb'].append(row[2])
            ratios['ref_f'].append(row[3])
        cells = ' | '.join(f'{r:8.2f}' for r in row)
        print(f'{f"{n},{cin},{cout},{hw},{k}":>22} | {t["ours"][0] * 1e3:10.1f} | {cells}')
    med = ' | '.join(f'{statistics.median(v):8.2f}' for v in ratios.values() if v)
    print(f'{"median":>22} | {"":>10} | {med}')


if __name__ == '__main__':
    main()

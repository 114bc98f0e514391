"""Speed of converted timm models against the original timm models, and conversion time.

Prints fwd+bwd (and fwd-only) time ratios of `convert_to_bcos(model)` (MaxOut 2 and 1) against
the same timm model unconverted, in this process: batch 8, 128 px, 2 threads, flush-denormal on.
MaxOut 2 doubles every convolution, so ~2x is its floor; MaxOut 1 should cost little more than
the plain network. ``--compile``: every model (timm's too) through ``torch.compile(fullgraph=True)``
first; the compile time is not in the timings (the warm-up calls compile). The variants run
round-robin, so that a shared machine's slow spells hit them alike.
``--profile``: each variant's fwd+bwd self CPU time (torch.profiler) split into convolution forward,
convolution backward and the rest (norms, activations, the B-cos element-wise work, weight
normalisation): what is the convolutions' own cost and what is not. ``--channels-last``: every model
and input in channels-last memory format (timm's ``--channels-last``).

    python benchmarks/model.py [--models resnet50 densenet121] [--batch 8] [--size 128] [--reps 7]
                               [--compile] [--profile] [--channels-last]
"""
from __future__ import annotations


import torch

from _timing import (VARIANTS, benchmark_parser, build_variant, conv_split,  # benchmarks/_timing.py
                     interleaved_medians, set_up, variant_input)


def main() -> None:
    parser = benchmark_parser(__doc__, models=['resnet50', 'densenet121'], batch=8, size=128, reps=7)
    parser.add_argument('--compile', action='store_true', help='torch.compile(fullgraph=True) every model')
    parser.add_argument('--profile', action='store_true', help='split fwd+bwd into convolutions and the rest')
    parser.add_argument('--channels-last', action='store_true', help='models and inputs in channels-last format')
    args = parser.parse_args()
    set_up(args.threads)
    print(f'batch {args.batch}, {args.size} px, {args.threads} threads, median of {args.reps}'
          f'{", torch.compile(fullgraph=True)" if args.compile else ", eager"}'
          f'{", channels-last" if args.channels_last else ""}')
    print(f'{"model":>14} | {"variant":>10} | {"convert s":>9} | {"fb ms":>8} | {"fb ratio":>8} | {"f ratio":>7}')
    for name in args.models:
        x = torch.rand(args.batch, 3, args.size, args.size)
        variants = {v: (*build_variant(name, v), variant_input(v, x)) for v in VARIANTS}
        steps, splits = {}, {}
        for key, (model, _, inputs) in variants.items():
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            if args.compile:
                model = torch.compile(model, fullgraph=True)

            def fwd_bwd(model=model, x=inputs):
                model.zero_grad(set_to_none=True)
                model(x).sum().backward()

            def fwd(model=model, x=inputs):
                with torch.no_grad():
                    model(x)

            steps[key] = fwd_bwd, fwd
            if args.profile:
                splits[key] = conv_split(fwd_bwd)
        fb_times = interleaved_medians({k: s[0] for k, s in steps.items()}, args.reps)
        f_times = interleaved_medians({k: s[1] for k, s in steps.items()}, args.reps)
        times = {k: (fb_times[k], f_times[k]) for k in steps}
        for key, (_, convert_s, _) in variants.items():
            fb, f = times[key]
            print(f'{name:>14} | {key:>10} | {convert_s:9.2f} | {fb * 1e3:8.0f} | '
                  f'{fb / times["timm"][0]:8.2f} | {f / times["timm"][1]:7.2f}')
        if args.profile:
            _print_split(name, splits)


def _print_split(name: str, splits) -> None:
    """Self CPU ms of fwd+bwd per part, and each part's ratio to timm's."""
    print(f'{name} fwd+bwd self CPU ms: ' + ', '.join(splits['timm']) + ' (ratio to timm)')
    base = splits['timm']
    for key, split in splits.items():
        parts = ', '.join(f'{split[k]:.0f} ({split[k] / max(base[k], 1e-9):.2f})' for k in split)
        total = sum(split.values())
        print(f'  {key:>10}: {parts}; total {total:.0f} ({total / sum(base.values()):.2f})')


if __name__ == '__main__':
    main()

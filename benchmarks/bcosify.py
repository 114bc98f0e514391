"""Time to B-cosify a trained timm model (`timm_bcos.bcosify`), against the time to build it.

Prints, per model (1000 classes, random weights: the time does not depend on their values), the
median time of `timm.create_model` (the baseline), of `bcosify(calibrate=False)` (the rewrite:
rule table, copied weights, folded stem) and of `bcosify()` (plus the recalibration: one forward
pass over 16 noise images at the model's input size), and their ratios. 2 threads, flush-denormal on.

    python benchmarks/bcosify.py [--models resnet50 densenet121] [--reps 3]
"""
from __future__ import annotations

import warnings

import timm

from timm_bcos import bcosify

from _timing import benchmark_parser, median_time, set_up  # benchmarks/_timing.py


def main() -> None:
    args = benchmark_parser(__doc__, models=['resnet50', 'densenet121'], reps=3).parse_args()
    set_up(args.threads)
    warnings.simplefilter('ignore')
    print(f'{args.threads} threads, median of {args.reps}')
    print(f'{"model":>12} | {"build s":>7} | {"bcosify s":>9} | {"+ recalibration s":>17} | {"ratios to build":>15}')

    def median(fn):  # no warm-up call: every call builds and rewrites anew
        return median_time(fn, args.reps, warmup=0)

    for name in args.models:
        build = median(lambda: timm.create_model(name))
        rewrite = median(lambda: bcosify(timm.create_model(name).eval(), calibrate=False)) - build
        full = median(lambda: bcosify(timm.create_model(name).eval())) - build
        print(f'{name:>12} | {build:7.2f} | {rewrite:9.2f} | {full:17.2f} | {rewrite / build:6.2f} {full / build:7.2f}')


if __name__ == '__main__':
    main()

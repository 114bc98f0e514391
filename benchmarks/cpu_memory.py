"""`keep_freed_cpu_memory` against glibc's defaults: a no-grad forward and `explain` (1 and 5 targets).

The setting is process-wide and cannot be undone, so each side runs in its own process, in
alternating pairs (a shared machine's slow spells then hit both alike); each process times the
three calls round-robin and prints their median times, minor page faults per call and its peak
RSS. Prints both sides, explain / forward and top-5 / top-1 for each process, and the ratio kept /
default of the mean over the pairs. ``--compile``: the same for ``torch.compile(model,
fullgraph=True)`` (compile time excluded).

    python benchmarks/cpu_memory.py [--model bcos_resnet18] [--size 128] [--batch 32] [--pairs 2] [--reps 5] [--compile]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from _timing import benchmark_parser, set_up  # benchmarks/_timing.py

MODES = ('default', 'kept')
MEASURES = ('forward ms', 'explain ms', 'top-5 ms', 'faults/forward', 'faults/explain', 'faults/top-5',
            'peak RSS MiB')


def _child(args: argparse.Namespace) -> None:
    """One side, in this process: time and count page faults, print one JSON line."""
    import timm
    import torch

    import timm_bcos
    from timm_bcos import AddInverse
    from timm_bcos.explain import explain

    if args.child == 'kept' and not timm_bcos.keep_freed_cpu_memory():
        raise SystemExit('keep_freed_cpu_memory did not apply here (not glibc)')
    set_up(args.threads)
    model = timm.create_model(args.model).eval()
    if args.compile:
        model = torch.compile(model, fullgraph=True)
    x = AddInverse()(torch.rand(args.batch, 3, args.size, args.size))

    def forward():
        with torch.no_grad():
            model(x)

    fns = {'forward': forward, 'explain': lambda: explain(model, x), 'top-5': lambda: explain(model, x, k=5)}
    for fn in fns.values():
        fn()
        fn()  # compiled: the first call compiles
    times, faults = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(args.reps):  # round-robin: the ratios compare calls made side by side
        for name, fn in fns.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    result = {}
    for name in fns:
        result[f'{name} ms'] = statistics.median(times[name]) * 1e3
        result[f'faults/{name}'] = statistics.median(faults[name])
    result['peak RSS MiB'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__, model='bcos_resnet18', size=128, batch=32, reps=5, pairs=2)
    parser.add_argument('--compile', action='store_true', help='torch.compile(fullgraph=True) the model')
    parser.add_argument('--child', choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    runs = {mode: [] for mode in MODES}
    for _ in range(args.pairs):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, '--child', mode] + (argv or sys.argv[1:]),
                                 capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f'{args.model}{" compiled (fullgraph=True)" if args.compile else ""}, {args.size} px, N={args.batch}, '
          f'float32, {args.threads} threads, median of {args.reps} per process, {args.pairs} alternating pairs of '
          f'processes')
    print(f'{"malloc":>14s} |' + ''.join(f'{m:>15s} |' for m in MEASURES) + f'{"explain/forward":>16s} |'
          f'{"top-5/top-1":>12s}')
    mean = {mode: {m: statistics.mean(r[m] for r in runs[mode]) for m in MEASURES} for mode in MODES}
    for mode in MODES:
        for r in runs[mode]:
            print(f'{mode:>14s} |' + ''.join(f'{r[m]:15.0f} |' for m in MEASURES)
                  + f'{r["explain ms"] / r["forward ms"]:16.2f} |{r["top-5 ms"] / r["explain ms"]:12.2f}')
    print(f'{"kept / default":>14s} |' + ''.join(
        f'{mean["kept"][m] / mean["default"][m]:15.2f} |' if mean['default'][m] else f'{"-":>15s} |'
        for m in MEASURES))


if __name__ == '__main__':
    main()

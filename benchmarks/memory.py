"""Training memory of converted timm models against the original timm models.

For each model (default resnet50, batch 8 at 128 px, as `model.py`) and variant (timm's, converted
with MaxOut 2 and 1), one training step (forward + backward), measured two ways:

- saved for backward: the bytes of every distinct tensor storage autograd keeps between forward and
  backward (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded: the activation
  memory of training, exactly, independent of the allocator;
- peak RSS: the process's resident-set high-water mark during its first step above its size just
  before (``/proc/self/clear_refs`` resets the mark; Linux only), gradients included, each variant
  in a fresh subprocess.

    python benchmarks/memory.py [--models resnet50 densenet121] [--batch 8] [--size 128]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Dict

import torch

from _timing import VARIANTS, benchmark_parser, build_variant, set_up, variant_input  # benchmarks/_timing.py


def _rss_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def measure(name: str, variant: str, batch: int, size: int) -> Dict[str, float]:
    """One training step of `variant` of `name`: MiB saved for backward and peak RSS growth."""
    torch.manual_seed(0)
    model, _ = build_variant(name, variant)
    x = variant_input(variant, torch.rand(batch, 3, size, size))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    # The first step, from a process that has not trained yet: after one, the allocator keeps the
    # freed activations and the resident set no longer grows. The gradients are part of the peak.
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak resident set (VmHWM) to the current one
    before = _rss_kib('VmRSS')
    step()
    peak = _rss_kib('VmHWM') - before
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return {'saved_mib': sum(saved.values()) / 2 ** 20, 'peak_mib': peak / 1024}


def main() -> None:
    parser = benchmark_parser(__doc__, models=['resnet50'], batch=8, size=128)
    parser.add_argument('--one', nargs=2, metavar=('MODEL', 'VARIANT'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_up(args.threads)
    if args.one:
        print(json.dumps(measure(*args.one, args.batch, args.size)))
        return
    print(f'batch {args.batch}, {args.size} px, one training step (forward + backward), float32')
    print(f'{"model":>12} | {"variant":>10} | {"saved MiB":>9} | {"x timm":>6} | {"peak RSS MiB":>12} | {"x timm":>6}')
    for name in args.models:
        rows = {}
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, '--one', name, variant, '--batch', str(args.batch),
                   '--size', str(args.size), '--threads', str(args.threads)]
            rows[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        base = rows['timm']
        for variant, r in rows.items():
            print(f'{name:>12} | {variant:>10} | {r["saved_mib"]:9.1f} | {r["saved_mib"] / base["saved_mib"]:6.2f} | '
                  f'{r["peak_mib"]:12.1f} | {r["peak_mib"] / base["peak_mib"]:6.2f}')


if __name__ == '__main__':
    main()

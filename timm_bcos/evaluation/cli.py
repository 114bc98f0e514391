"""``timm-bcos evaluate``: the grid pointing game (paper §4, Fig. 5/6) or the B ablation (§5.1, Fig. 5).

    timm-bcos evaluate --model bcos_simple_cifar_tiny.fashion_mnist --baseline local-dir:runs/base \\
        --data fashion-mnist --grid 3 --n 500 --out out/pointing_3x3
    timm-bcos evaluate --ablation --data fashion-mnist --epochs 3 --n 250 \\
        --runs-dir runs/ablation --out out/ablation
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..weights.v1 import V1_CIFAR_BS
from .ablation import b_ablation
from .attribution import METHODS
from .report import run_evaluation

__all__ = ['build_parser', 'main']


def build_parser(prog: str = 'timm-bcos evaluate') -> argparse.ArgumentParser:
    """The options of `main`: `run_evaluation`'s, and `b_ablation`'s under ``--ablation``."""
    p = argparse.ArgumentParser(prog=prog, description='Grid pointing game of B-cos explanations vs post-hoc methods '
                                                       '(paper §4, Fig. 5/6), or the B ablation (--ablation).')
    p.add_argument('--model', default='bcos_simple_cifar_tiny.fashion_mnist',
                   help='the B-cos model: timm name, local-dir:PATH or hf-hub:ID')
    p.add_argument('--baseline', help='a conventional model to compare (e.g. local-dir:runs/baseline)')
    p.add_argument('--data', default='fashion-mnist', help="'digits', 'fashion-mnist' or an image folder")
    p.add_argument('--grid', type=int, default=3, choices=(2, 3), help='tiles per side')
    p.add_argument('--n', type=int, default=500, help='number of grids')
    p.add_argument('--methods', nargs='+', choices=METHODS, help=f'default: all ({" ".join(METHODS)})')
    p.add_argument('--smooth', type=int, help='smoothing kernel (odd) of the non-perturbation maps; default: '
                                              '2 * round(tile / 32) + 1 (3 at 32 px, 15 at 224 px)')
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch-size', type=int, default=64, help='images per forward/backward pass')
    p.add_argument('--img-size', type=int, help="default: the model's input size")
    p.add_argument('--ig-steps', type=int, default=20, help='IntegratedGradients steps')
    p.add_argument('--occlusion-window', type=int, help='px; default half a tile')
    p.add_argument('--occlusion-stride', type=int, help='px; default a quarter tile')
    p.add_argument('--min-confidence', type=float, default=0.0, help='only images with this probability (v1: 0.5)')
    p.add_argument('--limit', action='append', default=[], metavar='METHOD=N',
                   help='evaluate METHOD on the first N grids only (repeatable), e.g. --limit ig=100')
    p.add_argument('--examples', type=int, default=4, help='example grids to plot')
    p.add_argument('--device', help='default: cuda if available')
    p.add_argument('--threads', type=int, help='torch CPU threads')
    p.add_argument('--no-progress', action='store_true')
    a = p.add_argument_group('B ablation (--ablation): train per B, then accuracy and B-cos localisation')
    a.add_argument('--ablation', action='store_true')
    a.add_argument('--bs', type=float, nargs='+', default=list(V1_CIFAR_BS), help='B values (MaxOut 2)')
    a.add_argument('--no-plain', action='store_true', help='skip plain B=2 (MaxOut 1)')
    a.add_argument('--runs-dir', help='training runs (default: OUT/runs)')
    a.add_argument('--ablation-model', default='bcos_simple_cifar_tiny')
    a.add_argument('--epochs', type=int, default=3)
    a.add_argument('--train-batch-size', type=int, default=128)
    a.add_argument('--lr', type=float, default=1e-3)
    a.add_argument('--schedule', default='cosine', choices=('step', 'cosine', 'constant'))
    a.add_argument('--warmup-epochs', type=float, default=0.0)
    a.add_argument('--train-subset', type=int, help='train on a fixed random subset of this many images')
    a.add_argument('--max-steps', type=int, help='stop each training run after this many steps (smoke tests)')
    a.add_argument('--calibrate-temperature', action='store_true',
                   help="logit temperature for unit initial logit std instead of v1's per-B values")
    return p


def _parse_limits(items: Sequence[str], parser: argparse.ArgumentParser) -> Dict[str, int]:
    """``--limit METHOD=N`` options as ``{method: n}`` (a usage error otherwise)."""
    limits = {}
    for item in items:
        method, _, n = item.partition('=')
        if method not in METHODS or not n.isdigit() or int(n) < 1:
            parser.error(f'--limit wants METHOD=N with METHOD in {METHODS} and N >= 1, got {item!r}')
        limits[method] = int(n)
    return limits


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run `timm-bcos evaluate` with `argv` (default: the command line); returns the results."""
    parser = build_parser()
    args = parser.parse_args(argv)
    limits = _parse_limits(args.limit, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # untrained / small B-cos nets make denormals: much slower on CPU otherwise
    if args.ablation:
        if args.baseline:
            raise SystemExit('timm-bcos evaluate: --baseline does not apply to --ablation')
        return b_ablation(args.out, args.data, bs=args.bs, plain=not args.no_plain, runs_dir=args.runs_dir,
                          model=args.ablation_model, img_size=args.img_size, epochs=args.epochs,
                          batch_size=args.train_batch_size, lr=args.lr, schedule=args.schedule,
                          warmup_epochs=args.warmup_epochs, train_subset=args.train_subset, max_steps=args.max_steps,
                          seed=args.seed, grid=args.grid, n_grids=args.n, eval_batch_size=args.batch_size,
                          min_confidence=args.min_confidence, calibrate_temperature=args.calibrate_temperature,
                          progress=not args.no_progress)
    results = run_evaluation(args.model, args.baseline, args.data, grid=args.grid, n_grids=args.n, methods=args.methods,
                             smooth=args.smooth, out=args.out, seed=args.seed, batch_size=args.batch_size,
                             img_size=args.img_size, ig_steps=args.ig_steps, occlusion_window=args.occlusion_window,
                             occlusion_stride=args.occlusion_stride, min_confidence=args.min_confidence,
                             limits=limits, n_examples=args.examples, device=args.device, progress=not args.no_progress)
    print(f'results: {args.out}/results.md')
    return results


"""`timm-bcos coverage`: the converter's surveys.

    timm-bcos coverage [--models NAME ...] [--img-size PX] [--out out/coverage.md]      # default: required + extra
    timm-bcos coverage --families [FAMILY ...] [--img-size PX] [--out out/families.md]  # smallest of each family
    timm-bcos coverage --train [--models NAME ...] [--out out/trainability.md] [--steps N --lr LR --batch-size N]
    timm-bcos coverage --bcosify [--models NAME ...] [--img-size PX] [--out out/bcosify.md]

The coverage surveys write `coverage_report` (Eq. 13 error, logit spread, gates, refusals); ``--train``
trains each converted model briefly on digits and writes `trainability_report`; ``--bcosify`` checks
`timm_bcos.bcosify` both ways (`bcosify_survey`). Reports are written
atomically and replace only an earlier report of the same kind.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Dict, List, Optional, Sequence

import timm
import torch

from .bcosify_survey import REPORT_TITLE as BCOSIFY_TITLE
from .bcosify_survey import check_bcosify, write_bcosify_report
from .._utils import write_atomic
from .coverage import COVERAGE_MODELS, EXTRA_MODELS, CoverageResult, check_model
from .coverage_report import REPORT_TITLE, check_report_path, write_report
from .families import smallest_per_family
from .trainability import REPORT_TITLE as TRAIN_TITLE
from .trainability import Recipe, check_trainability, write_trainability_report

__all__ = ['build_coverage_parser', 'coverage_main']


def build_coverage_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-bcos coverage', description=__doc__.split('\n')[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument('--models', nargs='+', help='timm model names (default: COVERAGE_MODELS + EXTRA_MODELS; '
                                                   'with --train: COVERAGE_MODELS, the 25 required ones)')
    which.add_argument('--families', nargs='*', metavar='FAMILY',
                       help="the smallest model of each timm family (a module in timm.list_modules(); default: "
                            "all of timm's)")
    which.add_argument('--merge', nargs='+', metavar='JSON',
                       help='write one report from the results of earlier surveys (the REPORT.json each writes '
                            'next to its report), e.g. of runs over parts of the families in parallel')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--train', action='store_true', help='train each converted model briefly on digits')
    mode.add_argument('--bcosify', action='store_true', help='B-cosify each model: the B=1 form against the original, '
                                                             'the B-cos form by Eq. 13')
    parser.add_argument('--img-size', type=int, help="input size in px (default: each model's own); a model whose "
                        "constructor takes img_size (a ViT) is built for it. For models whose float64 check does "
                        "not fit in memory at their own size; the report gives each model's size")
    parser.add_argument('--out', help='the report (default: out/coverage.md, out/families.md with --families, '
                                      'out/trainability.md with --train)')
    default = Recipe()
    parser.add_argument('--steps', type=int, default=default.steps, help='--train: optimiser steps')
    parser.add_argument('--lr', type=float, default=default.lr, help='--train: Adam learning rate')
    parser.add_argument('--batch-size', type=int, default=default.batch_size, help='--train: batch size')
    return parser


def _default_out(args: argparse.Namespace) -> str:
    if args.train:
        return 'out/trainability.md'
    if args.bcosify:
        return 'out/bcosify.md'
    return 'out/families.md' if args.families is not None else 'out/coverage.md'


def _survey(names: Sequence[str], out: str, command: str, unit: str, skipped: Dict[str, str],
            img_size: Optional[int] = None) -> None:
    from tqdm import tqdm

    results = []
    for name in (bar := tqdm(names, unit='model')):
        bar.set_description(name)
        r = check_model(name, img_size)
        results.append(r)
        err = f'{r.error:.1e}' if r.error is not None else '-'
        spread = f'{r.spread:.3g}' if r.spread is not None else '-'
        tqdm.write(f'{name:28s} {r.group:9s} {r.outcome:24s} err={err} spread={spread} {r.seconds:.1f}s {r.reason}')
        write_atomic(f'{out}.json', json.dumps(dict(unit=unit, skipped=skipped, results=[
            dataclasses.asdict(x) for x in results]), indent=1))  # after every model: the results so far
    write_report(results, out, command, unit, skipped)
    print(f'{sum(r.ok for r in results)}/{len(results)} {unit} exact; report: {out}')


def _merge(paths: Sequence[str], out: str, command: str) -> None:
    """One report from the `_survey` results saved in `paths`."""
    results, skipped, unit = [], {}, 'models'
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        unit = saved['unit']
        skipped.update(saved['skipped'])
        results += [CoverageResult(**{**r, 'input_size': tuple(r['input_size']) if r['input_size'] else None,
                                      'gates': tuple(map(tuple, r['gates']))}) for r in saved['results']]
    write_report(results, out, command, unit, skipped)
    print(f'{sum(r.ok for r in results)}/{len(results)} {unit} exact; report: {out}')


def _train(names: Sequence[str], recipe: Recipe, out: str, command: str) -> None:
    from tqdm import tqdm

    results = []
    for name in (bar := tqdm(names, unit='model')):
        bar.set_description(name)
        r = check_trainability(name, recipe)
        results.append(r)
        acc = f'{r.accuracy:.3f}' if r.accuracy is not None else '-'
        tqdm.write(f'{name:28s} {r.outcome:24s} acc={acc} {r.seconds:.0f}s {r.reason}')
        write_trainability_report(results, recipe, out, command)  # after every model: a partial report
    print(f'{sum(r.reached for r in results)}/{len(results)} reach the target accuracy; report: {out}')


def _bcosify(names: Sequence[str], img_size: Optional[int], out: str, command: str) -> None:
    from tqdm import tqdm

    results = []
    for name in (bar := tqdm(names, unit='model')):
        bar.set_description(name)
        r = check_bcosify(name, img_size)
        results.append(r)
        tqdm.write(f'{name:28s} {r.outcome:10s} b1={r.b1_error} eq13={r.eq13_error} spread={r.spread} {r.reason}')
        write_bcosify_report(results, out, command)  # after every model: a partial report
    print(f'{sum(r.ok for r in results)}/{len(results)} models B-cosify exactly; report: {out}')


def coverage_main(argv: Optional[List[str]] = None) -> None:
    """Run `timm-bcos coverage` with `argv` (default: the command line)."""
    args = build_coverage_parser().parse_args(argv)
    if min(args.steps, args.batch_size) < 1 or args.lr <= 0:
        raise ValueError('--steps and --batch-size must be >= 1 and --lr positive')
    out = args.out or _default_out(args)
    check_report_path(out, TRAIN_TITLE if args.train else BCOSIFY_TITLE if args.bcosify else REPORT_TITLE)
    torch.set_flush_denormal(True)  # untrained B-cos nets make denormals: much slower on CPU otherwise
    command = ' '.join(['timm-bcos coverage', *(sys.argv[1:] if argv is None else argv)])
    skipped: Dict[str, str] = {}
    if args.merge:
        return _merge(args.merge, out, command)
    if args.families is not None:
        picks, skipped = smallest_per_family(args.families or None)
        names, unit = [p.model for p in picks], 'families'
    else:
        names, unit = args.models or (COVERAGE_MODELS if args.train else COVERAGE_MODELS + EXTRA_MODELS), 'models'
    unknown = [n for n in names if not timm.is_model(n)]
    if unknown:
        raise ValueError(f'not timm models: {", ".join(unknown)} (timm.list_models() lists them)')
    if args.bcosify:
        _bcosify(names, args.img_size, out, command)
    elif args.train:
        _train(names, Recipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr), out, command)
    else:
        _survey(names, out, command, unit, skipped, args.img_size)

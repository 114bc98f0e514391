"""Conversion coverage: convert timm architectures and check Eq. 13 on each.

    timm-bcos coverage [--models NAME ...] [--out out/coverage.md]

For every model (pretrained=False, 10 classes): build, `convert_to_bcos`, run a forward at a small
input (64 px, or the smallest of 96/128 px the architecture accepts) and the dynamic-linearity
check in float64. Writes a markdown report: model, params, converted?, max relative error of
``sum(W(x) * x) + b`` against the logits, seconds, and the reason of any failure.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .._utils import OutputFolderError, write_atomic
from ..layers import AddInverse
from .converter import convert_to_bcos, unconverted_modules
from .rules import TRUSTED_FORWARDS

__all__ = ['COVERAGE_MODELS', 'EXTRA_MODELS', 'CoverageResult', 'check_model', 'write_report']

# The list the converter must handle (issue "Graph-rewriting converter").
COVERAGE_MODELS = [
    'vgg11', 'resnet18', 'resnet34', 'resnet50', 'resnext50_32x4d', 'wide_resnet50_2', 'densenet121',
    'inception_v3', 'efficientnet_b0', 'mobilenetv2_100', 'mobilenetv3_large_100', 'regnetx_002', 'regnety_002',
    'seresnet50', 'legacy_seresnet18', 'cspresnet50', 'dla34', 'resnetv2_50', 'convnext_atto', 'ghostnet_100',
    'repvgg_a0', 'res2net50_14w_8s', 'xception41', 'mixnet_s', 'hrnet_w18_small',
]
# More architectures, to show where the rules stop (reported, not required).
EXTRA_MODELS = [
    'tf_efficientnet_b0', 'ecaresnet26t', 'skresnet18', 'rexnet_100', 'dpn68', 'lcnet_050', 'resnest14d',
    'nf_resnet26', 'selecsls42b', 'hardcorenas_a', 'cs3darknet_s', 'tinynet_e',
]
# What a failure needs, for the report (reasons themselves come from the run).
FAILURE_NOTES = {
    'selecsls42b': 'SelecSlsBlock.forward takes a list of tensors and indexes it; fx traces one placeholder. '
                   'Needs list-input tracing (concrete `fx.PH` lists sized from an example forward) or a '
                   'read-and-trusted entry in TRUSTED_FORWARDS.',
}
_SIZES = (64, 96, 128)
REPORT_TITLE = '# Conversion coverage'
TOLERANCE = 1e-4


@dataclass
class CoverageResult:
    model: str
    params: Optional[int]
    converted: bool
    error: Optional[float]
    seconds: float
    input_size: Optional[int]
    reason: str = ''
    leftovers: Sequence[str] = ()

    @property
    def ok(self) -> bool:
        return self.converted and not self.leftovers and self.error is not None and self.error <= TOLERANCE


def _first_line(e: BaseException) -> str:
    msg = str(e).split('. Supported:')[0].strip().splitlines()
    return f'{type(e).__name__}: {msg[0] if msg else ""}'


def check_model(name: str, batch: int = 2, **convert_kwargs) -> CoverageResult:
    """Convert one timm model and check dynamic linearity in float64 at the smallest working size."""
    import timm

    t0 = time.perf_counter()
    try:
        model = timm.create_model(name, pretrained=False, num_classes=10)
        model = convert_to_bcos(model, **convert_kwargs)
    except Exception as e:  # reported, not raised: this is a coverage survey
        return CoverageResult(name, None, False, None, time.perf_counter() - t0, None, _first_line(e))
    params = sum(p.numel() for p in model.parameters())
    leftovers = unconverted_modules(model)
    model = model.double().eval()
    generator = torch.Generator().manual_seed(0)
    reason = ''
    for size in _SIZES:
        x = AddInverse()(torch.rand(batch, 3, size, size, generator=generator, dtype=torch.float64))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                error = model.check_dynamic_linearity(x)
            reason = f'not converted: {", ".join(leftovers)}' if leftovers else ''
            return CoverageResult(name, params, True, error, time.perf_counter() - t0, size, reason, leftovers)
        except RuntimeError as e:  # too small an input for this architecture: try a larger one
            reason = _first_line(e)
    return CoverageResult(name, params, True, None, time.perf_counter() - t0, None, reason, leftovers)


def write_report(results: Sequence[CoverageResult], path: str, command: str = 'timm-bcos coverage') -> None:
    """Write the markdown table (atomically); `command` is the command line that produced it. An
    existing file at `path` is replaced only if it is an earlier coverage report."""
    import timm

    ok = sum(r.ok for r in results)
    lines = [
        REPORT_TITLE,
        '',
        f'`{command}` with timm {timm.__version__}, torch {torch.__version__}: '
        f'{ok}/{len(results)} architectures convert with a dynamic-linearity error <= {TOLERANCE:g}.',
        '',
        'Each model: `timm.create_model(name, pretrained=False, num_classes=10)`, `convert_to_bcos` '
        '(B=2, MaxOut 2, norms removed, 6-channel stem), float64, batch 2. *error* is the max over '
        'the batch and two classes (highest and lowest logit) of |sum(W(x)*x) + b - logit| / '
        'max|logit - b| (Eq. 13); *s* covers building, converting and checking.',
        '',
        '| model | params (M) | converted | input px | max rel. error | s | reason if not |',
        '|---|---:|:---:|---:|---:|---:|---|',
    ]
    for r in results:
        params = f'{r.params / 1e6:.1f}' if r.params else '-'
        err = f'{r.error:.1e}' if r.error is not None else '-'
        mark = 'yes' if r.ok else ('partial' if r.converted else 'no')
        reason = r.reason.replace('|', '\\|')
        lines.append(f'| {r.model} | {params} | {mark} | {r.input_size or "-"} | {err} | {r.seconds:.1f} | {reason} |')
    lines += ['', '## Notes', '',
              '- Gates (squeeze-excite, ECA, radix / selective-kernel attention) are kept as `DynamicGate`s: '
              'their value multiplies the features in the forward and is detached in explanation mode.',
              '- Forwards fx cannot trace, read and trusted (their own ops are linear): ' + ', '.join(
                  f'`{k}` ({v})' for k, v in TRUSTED_FORWARDS.items()) + '.']
    for r in results:
        if not r.ok and r.model in FAILURE_NOTES:
            lines.append(f'- **{r.model}**: {FAILURE_NOTES[r.model]}')
    _check_report_path(path)
    write_atomic(path, '\n'.join(lines) + '\n')


def _check_report_path(path: str) -> None:
    """Only an earlier coverage report may be replaced."""
    if os.path.exists(path):
        with open(path, errors='replace') as f:
            if not f.readline().startswith(REPORT_TITLE):
                raise OutputFolderError(f'{path} exists and is not a coverage report: not replacing it; choose '
                                        f'another --out')


def main(argv: Optional[List[str]] = None) -> None:
    from tqdm import tqdm

    parser = argparse.ArgumentParser(prog='timm-bcos coverage', description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=COVERAGE_MODELS + EXTRA_MODELS)
    parser.add_argument('--out', default='out/coverage.md')
    args = parser.parse_args(argv)
    _check_report_path(args.out)  # before the survey, not after it
    torch.set_flush_denormal(True)
    results = []
    for name in (bar := tqdm(args.models, unit='model')):
        bar.set_description(name)
        results.append(check_model(name))
        r = results[-1]
        tqdm.write(f'{name:22s} {"ok" if r.ok else "FAIL":4s} err={r.error if r.error is not None else "-"} '
                   f'{r.seconds:.1f}s {r.reason}')
    command = ' '.join(['timm-bcos coverage', *(sys.argv[1:] if argv is None else argv)])
    write_report(results, args.out, command)
    print(f'{sum(r.ok for r in results)}/{len(results)} converted; report: {args.out}')


if __name__ == '__main__':
    main()

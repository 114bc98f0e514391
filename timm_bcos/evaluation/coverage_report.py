"""The coverage report (markdown): a summary per group, a table per group, the gates of every model.

One format for both surveys: ``--families`` (one model per timm family) and ``--models`` (a list).
Reports are written atomically, and only over an earlier report of the same kind.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch

from .._utils import OutputFolderError, write_atomic
from ..convert import TRUSTED_FORWARDS
from .coverage import ALIVE_SPREAD, COVERAGE_MODELS, EXACT_TOLERANCE, OUTCOMES, CoverageResult
from .families import ATTENTION_CRITERION

__all__ = ['GROUP_TITLES', 'REPORT_TITLE', 'check_report_path', 'coverage_report', 'summary_lines', 'write_report']

REPORT_TITLE = '# Conversion coverage'
GROUP_TITLES = {'CNN': 'CNNs (no dot-product attention)', 'attention': 'Attention / transformer models',
                'unknown': 'Not classified (the original model does not run at its default size)'}
_METHOD = (
    'Each model: `timm.create_model(name, pretrained=False, num_classes=10)` (seed 0), `convert_to_bcos` with '
    'its defaults (B=2, MaxOut 2, norms removed, 6-channel stem, calibrated scales), then at the input size *px* '
    '(the default one, or `--img-size`, for which a ViT is built with `img_size=`): a train-mode forward + '
    'backward (float32, batch 2); the *logit spread*, std of logits - b '
    '(float32, eval mode, 8 seeded [x, 1-x] noise images); the *Eq. 13 error* in float64 by an independent '
    'autograd check: in explanation mode W = d logit / d x, max |sum(W*x) + sum(W_c*c) + b - logit| / max |logit - '
    "b| over 2 images x (highest, lowest logit), b = `bcos_cfg['logit_bias']`, c the explained constants "
    '(positional embeddings and tokens, W_c = d logit / d c; none in a CNN). *exact*: error <= {tol:g}; *refused*: '
    '`UnsupportedModuleError` (its first line: operation and module path); *crashed after conversion*: a '
    'check raised (the stage is named); *conversion error*: building or converting raised anything else. '
    '*gates*: the non-linear modules kept inside `DynamicGate`s (detached in explanation mode; listed under '
    '"Gates"). *params* after conversion (MaxOut doubles the units); *s*: building, converting and checking.')


def check_report_path(path: str, title: str = REPORT_TITLE) -> None:
    """Only an earlier report with the same `title` line may be replaced (checked before a survey runs)."""
    if os.path.exists(path):
        with open(path, errors='replace') as f:
            if not f.readline().startswith(title):
                raise OutputFolderError(f'{path} exists and is not a {title.split()[-1].lower()} report: not '
                                        f'replacing it; choose another --out')


def summary_lines(results: Sequence[CoverageResult], unit: str = 'models') -> List[str]:
    """One line per group: outcome counts, the share converting exactly, how many start alive."""
    lines = []
    for group, title in GROUP_TITLES.items():
        rows = [r for r in results if r.group == group]
        if not rows:
            continue
        counts = Counter(r.outcome for r in rows)
        exact = counts['exact']
        ran = [r for r in rows if r.spread is not None]
        lines.append(
            f'- **{title}** ({unit}: {len(rows)}): ' + ', '.join(f'{o} {counts[o]}' for o in OUTCOMES if counts[o])
            + f'. Exact (Eq. 13 error <= {EXACT_TOLERANCE:g}): {exact}/{len(rows)} ({100 * exact / len(rows):.0f}%).'
            f' Alive at start (logit spread in [{ALIVE_SPREAD[0]:g}, {ALIVE_SPREAD[1]:g}]): '
            f'{sum(r.alive for r in ran)}/{len(ran)} of those that ran.')
    return lines


def _gate_summary(r: CoverageResult) -> str:
    kinds = Counter(what for _, what in r.gates)
    return ', '.join(f'{what} x{n}' for what, n in kinds.items()) or '-'


def _cell(text: str) -> str:
    return text.replace('|', '\\|').replace('\n', ' ')


def _table(rows: Sequence[CoverageResult], attention: bool) -> List[str]:
    head = '| family | model | params (M) | outcome | Eq. 13 error | logit spread | px | gates | s | reason |'
    rule = '|---|---|---:|---|---:|---:|---:|---|---:|---|'
    if attention:
        head, rule = head + ' attention found |', rule + '---|'
    lines = [head, rule]
    for r in rows:
        params = f'{r.params / 1e6:.1f}' if r.params else '-'
        err = f'{r.error:.1e}' if r.error is not None else '-'
        spread = f'{r.spread:.3g}' if r.spread is not None else '-'
        px = 'x'.join(map(str, r.input_size)) if r.input_size else '-'
        line = (f'| {r.family} | {r.model} | {params} | {r.outcome} | {err} | {spread} | {px} | {_gate_summary(r)} '
                f'| {r.seconds:.1f} | {_cell(r.reason)} |')
        lines.append(line + (f' {_cell(r.attention)} |' if attention else ''))
    return lines


def _gate_lines(results: Sequence[CoverageResult]) -> List[str]:
    lines = ['## Gates', '', 'Non-linear modules each converted model keeps inside `DynamicGate`s (path: what it '
             'wraps). Their values multiply features in the forward and are constants of W(x) in explanations.', '']
    for r in results:
        if r.gates:
            lines.append(f'- **{r.model}**: ' + ', '.join(f'`{p}` ({what})' for p, what in r.gates))
    return lines if len(lines) > 4 else []


def coverage_report(results: Sequence[CoverageResult], command: str, unit: str = 'models',
                    skipped: Optional[Dict[str, str]] = None) -> str:
    """The markdown report; `unit` names the rows ('families' or 'models'), `skipped` the models that
    could not be built on the meta device (family survey)."""
    import timm

    required = [r for r in results if r.model in COVERAGE_MODELS]
    lines = [REPORT_TITLE, '', f'`{command}` with timm {timm.__version__}, torch {torch.__version__}.', '',
             '## Summary', '', *summary_lines(results, unit)]
    if required:
        lines.append(f'- Required list (`COVERAGE_MODELS`): {sum(r.ok for r in required)}/{len(required)} exact.')
    if skipped:
        lines.append(f'- Not built on the meta device (skipped): {len(skipped)}: '
                     + '; '.join(f'{k} ({_cell(v)})' for k, v in skipped.items()))
    lines += ['', _METHOD.format(tol=EXACT_TOLERANCE), '', f'Groups: {ATTENTION_CRITERION}.']
    for group, title in GROUP_TITLES.items():
        rows = [r for r in results if r.group == group]
        if rows:
            lines += ['', f'## {title}', '', *_table(rows, attention=group == 'attention')]
    gates = _gate_lines(results)
    lines += ['', *gates] if gates else []
    lines += ['', '## Notes', '', '- Forwards fx cannot trace, read and trusted (their own ops are linear): '
              + ', '.join(f'`{k}` ({v})' for k, v in TRUSTED_FORWARDS.items()) + '.']
    return '\n'.join(lines) + '\n'


def write_report(results: Sequence[CoverageResult], path: str, command: str = 'timm-bcos coverage',
                 unit: str = 'models', skipped: Optional[Dict[str, str]] = None) -> None:
    """Write `coverage_report` to `path` atomically; an existing file is replaced only if it is an
    earlier coverage report."""
    check_report_path(path)
    write_atomic(path, coverage_report(results, command, unit, skipped))

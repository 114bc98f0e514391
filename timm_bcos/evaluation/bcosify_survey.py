"""The B-cosification survey (`timm-bcos coverage --bcosify`): is `bcosify` exact, model by model?

Each model is built with ``num_classes=10`` and made "pretrained-like" without a download (random
weights, norm statistics from two train-mode passes over noise, norm scales and shifts drawn
around 1 and 0: every bias and statistic that the fold must carry over is non-trivial). Then:

- the *B=1 error*: ``bcosify(b=1.0, preserve_function=True)`` on [x, 1-x] against the original on
  the same images normalised with its ``pretrained_cfg`` mean/std (float32, eval mode), as
  ``max |difference| / max |original logit|`` over 4 seeded images; target <= 1e-4;
- the B-cos form (`bcosify` defaults: B=2, biases removed, BatchNorm uncentered, activations kept
  as gates, recalibrated on 16 noise images): its float64 Eq. 13 error (`eq13_autograd`) and initial
  logit spread (`logit_spread`: 8 other noise images).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import first_line, write_atomic
from ..convert import UnsupportedModuleError, bcosify
from ..layers import add_inverse
from .coverage import ALIVE_SPREAD, EXACT_TOLERANCE, eq13_autograd, logit_spread
from .coverage_report import check_report_path

__all__ = ['B1_TOLERANCE', 'REPORT_TITLE', 'BcosifyResult', 'b1_error', 'bcosify_report', 'check_bcosify',
           'pretrained_like', 'write_bcosify_report']

REPORT_TITLE = '# B-cosification exactness'
B1_TOLERANCE = 1e-4


@dataclass
class BcosifyResult:
    model: str
    outcome: str = 'error'  # 'exact', 'not exact', 'refused', 'error'
    input_size: Tuple[int, int] = (0, 0)
    b1_error: Optional[float] = None
    eq13_error: Optional[float] = None
    spread: Optional[float] = None
    seconds_b1: Optional[float] = None
    seconds: Optional[float] = None
    reason: str = ''

    @property
    def ok(self) -> bool:
        return self.outcome == 'exact'


def pretrained_like(model: nn.Module, size: Tuple[int, int], seed: int = 0) -> nn.Module:
    """Random weights with the state a trained model has and a fresh one lacks: norm running
    statistics (two train-mode passes over noise) and norm affine parameters away from (1, 0)."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, *size) * 0.5)
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.normal_(1, 0.2)
                if m.bias is not None:
                    m.bias.normal_(0, 0.2)
    return model.eval()


def b1_error(original: nn.Module, b1: nn.Module, images: Tensor) -> float:
    """``max |B=1 form - original| / max |original|`` (logits) on `images` in [0, 1]: the original sees
    them normalised with the bcosified mean/std, the B=1 form (`bcosify(b=1, preserve_function=True)`) as [x, 1-x]."""
    mean, std = (torch.tensor(b1.bcos_cfg['bcosified'][k]).view(1, -1, 1, 1) for k in ('mean', 'std'))
    with torch.no_grad():
        expected = original((images - mean) / std)
        got = b1.eval()(add_inverse(images))
    return ((got - expected).abs().max() / expected.abs().max()).item()


def check_bcosify(name: str, img_size: Optional[int] = None) -> BcosifyResult:
    """B-cosify one timm model both ways and check it (failures recorded, not raised)."""
    import timm

    result = BcosifyResult(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = timm.create_model(name, pretrained=False, num_classes=10)
            cfg = model.pretrained_cfg
            size = (img_size, img_size) if img_size else tuple(cfg['input_size'][1:])
            size = tuple(max(s, m) for s, m in zip(size, (cfg.get('min_input_size') or (3, 0, 0))[1:]))
            result.input_size = size
            model = pretrained_like(model, size)
            images = torch.rand(4, 3, *size, generator=torch.Generator().manual_seed(1))
            t0 = time.perf_counter()
            b1 = bcosify(copy.deepcopy(model), b=1.0, preserve_function=True)
            result.seconds_b1 = time.perf_counter() - t0
            result.b1_error = b1_error(model, b1, images)
            t0 = time.perf_counter()
            bcos = bcosify(model)
            result.seconds = time.perf_counter() - t0
            result.spread = logit_spread(bcos, size)
            result.eq13_error = eq13_autograd(bcos.double(), add_inverse(images[:2].double()))
    except UnsupportedModuleError as e:
        result.outcome, result.reason = 'refused', first_line(e)
        return result
    except Exception as e:  # reported, not raised: this is a survey
        result.reason = first_line(e)
        return result
    exact = result.b1_error <= B1_TOLERANCE and result.eq13_error <= EXACT_TOLERANCE
    result.outcome = 'exact' if exact and math.isfinite(result.spread) else 'not exact'
    return result


def _fmt(v: Optional[float], spec: str) -> str:
    return '-' if v is None else format(v, spec)


def bcosify_report(results: Sequence[BcosifyResult], command: str) -> str:
    import timm

    alive = [r for r in results if r.spread is not None and ALIVE_SPREAD[0] <= r.spread <= ALIVE_SPREAD[1]]
    ran = [r for r in results if r.spread is not None]
    lines = [
        REPORT_TITLE, '', f'`{command}` with timm {timm.__version__}, torch {torch.__version__}.', '',
        f'**{sum(r.ok for r in results)}/{len(results)}** models exact: the B=1 form equals the original to '
        f'<= {B1_TOLERANCE:g} relative and the B-cos form has float64 Eq. 13 error <= {EXACT_TOLERANCE:g}. '
        f'Alive at start (logit spread in [{ALIVE_SPREAD[0]:g}, {ALIVE_SPREAD[1]:g}]): {len(alive)}/{len(ran)}.', '',
        __doc__.split('\n\n', 1)[1].strip(), '',
        '*s (B=1)*, *s (B-cos)*: time of the `bcosify` call (the B-cos form includes its recalibration, one '
        'forward pass over 16 noise images at the model\'s `pretrained_cfg` input size).', '',
        '| model | px | outcome | B=1 error | Eq. 13 error | logit spread | s (B=1) | s (B-cos) | reason |',
        '|---|---:|---|---:|---:|---:|---:|---:|---|',
    ]
    for r in results:
        lines.append(f'| {r.model} | {r.input_size[0]} | {r.outcome} | {_fmt(r.b1_error, ".1e")} | '
                     f'{_fmt(r.eq13_error, ".1e")} | {_fmt(r.spread, ".3g")} | {_fmt(r.seconds_b1, ".2f")} | '
                     f'{_fmt(r.seconds, ".2f")} | {r.reason.replace("|", "/")} |')
    return '\n'.join(lines) + '\n'


def write_bcosify_report(results: Sequence[BcosifyResult], path: str, command: str) -> None:
    """Write `bcosify_report` atomically; an existing file is replaced only if it is an earlier one."""
    check_report_path(path, REPORT_TITLE)
    write_atomic(path, bcosify_report(results, command))

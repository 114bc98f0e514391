"""Trainability: does a converted network train? A short, fixed run per model on scikit-learn's digits.

Each model is built (10 classes, seed), converted with the default `convert_to_bcos` settings and
trained with one recipe for all (`Recipe`): the project's loss (BCE on one-hot targets, Eq. 16,
`timm_bcos.training.loss_function`; the logit bias is in the model), Adam at a constant lr,
seeded batches of the [x, 1-x] encoded digits (`timm_bcos.data.load_digits`: 1500 training
images, the last 297 held out). A model that cannot take 32 px takes the next of 64 / 96 / 128.
"""
from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import first_line, write_atomic
from ..convert import UnsupportedModuleError, convert_to_bcos
from ..data import load_digits
from ..layers import add_inverse
from ..training import TrainConfig, loss_function
from .coverage import CONVERSION_ERROR, CRASHED, REFUSED, logit_bias
from .coverage_report import check_report_path

__all__ = ['REPORT_TITLE', 'TARGET_ACCURACY', 'TRAINED', 'Recipe', 'TrainabilityResult', 'check_trainability',
           'digits', 'train_briefly', 'trainability_report', 'write_trainability_report']

REPORT_TITLE = '# Trainability'
TARGET_ACCURACY = 0.8
TRAINED = 'trained'
_SIZES = (32, 64, 96, 128)


@dataclass(frozen=True)
class Recipe:
    """The fixed budget every model gets (no per-model tuning)."""
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-4
    img_size: int = 32
    seed: int = 0

    def describe(self) -> str:
        return (f'sklearn digits at {self.img_size} px ([x, 1-x]), {self.steps} steps of batch {self.batch_size} '
                f'(seeded epochs of 1500 images), Adam lr {self.lr:g} constant, no weight decay, BCE on one-hot '
                f'targets (Eq. 16), seed {self.seed}; accuracy on the 297 held-out digits')


@dataclass
class TrainabilityResult:
    """One model's short run. `loss_start`: the first batch's loss; `loss_end`: the mean of the last
    10 steps; `spread`: std of the first batch's logits net of the logit bias."""
    model: str
    outcome: str
    params: Optional[int] = None
    img_size: Optional[int] = None
    spread: Optional[float] = None
    loss_start: Optional[float] = None
    loss_end: Optional[float] = None
    accuracy: Optional[float] = None
    seconds: float = 0.0
    reason: str = ''

    @property
    def reached(self) -> bool:
        return self.accuracy is not None and self.accuracy >= TARGET_ACCURACY


@functools.lru_cache(maxsize=4)
def digits(size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits at `size` px, encoded as [x, 1-x]: ``(x_train, y_train, x_test, y_test)``."""
    x_train, y_train, x_test, y_test = load_digits(size=size)
    return add_inverse(x_train), y_train, add_inverse(x_test), y_test


def _batches(n: int, recipe: Recipe) -> Iterator[Tensor]:
    """`recipe.steps` index batches: seeded permutations of the training set, epoch after epoch."""
    generator = torch.Generator().manual_seed(recipe.seed)
    done = 0
    while True:
        order = torch.randperm(n, generator=generator)
        for s in range(0, n - recipe.batch_size + 1, recipe.batch_size):
            if done == recipe.steps:
                return
            done += 1
            yield order[s:s + recipe.batch_size]


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[s:s + batch]).argmax(1) == y[s:s + batch]).sum().item() for s in range(0, len(x), batch))
    return correct / len(x)


def train_briefly(model: nn.Module, recipe: Recipe, data: Tuple[Tensor, Tensor, Tensor, Tensor]
                  ) -> Tuple[List[float], float, float]:
    """Train a converted `model` with `recipe` on encoded `data` (see `digits`). Returns the loss of
    every step (stopping at the first non-finite one), the initial logit spread and the held-out
    accuracy."""
    x_train, y_train, x_test, y_test = data
    loss_fn = loss_function(TrainConfig(loss='bce'))
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    losses: List[float] = []
    spread = math.nan
    model.train()
    for idx in _batches(len(x_train), recipe):
        logits = model(x_train[idx])
        if not losses:
            spread = (logits.detach().double() - logit_bias(model)).std().item()
        loss = loss_fn(logits, y_train[idx]).mean()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return losses, spread, _accuracy(model, x_test, y_test)


def _input_px(model: nn.Module, recipe: Recipe) -> int:
    """The smallest of `recipe.img_size`, 64, 96, 128 px the converted model runs at."""
    sizes = [recipe.img_size] + [s for s in _SIZES if s > recipe.img_size]
    for size in sizes:
        try:
            with torch.no_grad():
                model.eval()(digits(size)[2][:2])
            return size
        except RuntimeError as e:  # too small an input for this architecture: try a larger one
            error = e
    raise RuntimeError(f'runs at none of {sizes} px ({first_line(error)})')


def check_trainability(name: str, recipe: Recipe = Recipe()) -> TrainabilityResult:
    """Build timm model `name`, convert it (default settings) and train it with `recipe`; failures
    are recorded, not raised."""
    import timm

    t0 = time.perf_counter()
    result = TrainabilityResult(name, CONVERSION_ERROR)
    try:
        torch.manual_seed(recipe.seed)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = convert_to_bcos(timm.create_model(name, pretrained=False, num_classes=10))
    except UnsupportedModuleError as e:
        result.outcome, result.reason = REFUSED, first_line(e)
    except Exception as e:  # a converter bug: reported
        result.reason = first_line(e)
    else:
        result.params = sum(p.numel() for p in model.parameters())
        try:
            result.img_size = _input_px(model, recipe)
            losses, result.spread, result.accuracy = train_briefly(model, recipe, digits(result.img_size))
        except Exception as e:  # the converted model does not run or train: the outcome
            result.outcome, result.reason = CRASHED, first_line(e)
        else:
            result.outcome = TRAINED
            result.loss_start, result.loss_end = losses[0], sum(losses[-10:]) / len(losses[-10:])
            if len(losses) < recipe.steps:
                result.reason = f'loss not finite at step {len(losses)}'
    result.seconds = time.perf_counter() - t0
    return result


def _fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None else format(value, spec)


def trainability_report(results: Sequence[TrainabilityResult], recipe: Recipe, command: str) -> str:
    """The markdown report: how many reach `TARGET_ACCURACY`, the recipe, one row per model."""
    import timm

    reached = sum(r.reached for r in results)
    worst = sorted(results, key=lambda r: -1.0 if r.accuracy is None else r.accuracy)[:3]
    lines = [REPORT_TITLE, '', f'`{command}` with timm {timm.__version__}, torch {torch.__version__}.', '',
             f'**{reached}/{len(results)}** converted models reach >= {TARGET_ACCURACY:.0%} held-out accuracy. '
             f'Lowest: ' + ', '.join(f'{r.model} ({_fmt(r.accuracy, ".1%")})' for r in worst) + '.', '',
             f'Recipe (one for all models): `convert_to_bcos` defaults (calibrated scales), then {recipe.describe()}. '
             f'*spread*: std of the first batch\'s logits - b; *loss start*: first batch; *loss end*: mean of the '
             f'last 10 steps; *s*: building, converting and training (CPU threads: {torch.get_num_threads()}).', '',
             '| model | params (M) | px | outcome | spread | loss start | loss end | held-out acc | s | note |',
             '|---|---:|---:|---|---:|---:|---:|---:|---:|---|']
    for r in results:
        params = _fmt(r.params and r.params / 1e6, '.1f')
        lines.append(f'| {r.model} | {params} | {r.img_size or "-"} | {r.outcome} | {_fmt(r.spread, ".3g")} | '
                     f'{_fmt(r.loss_start, ".4f")} | {_fmt(r.loss_end, ".4f")} | {_fmt(r.accuracy, ".1%")} | '
                     f'{r.seconds:.0f} | {r.reason.replace("|", chr(92) + "|")} |')
    return '\n'.join(lines) + '\n'


def write_trainability_report(results: Sequence[TrainabilityResult], recipe: Recipe, path: str,
                              command: str = 'timm-bcos coverage --train') -> None:
    """Write `trainability_report` atomically; only an earlier trainability report is replaced."""
    check_report_path(path, REPORT_TITLE)
    write_atomic(path, trainability_report(results, recipe, command))

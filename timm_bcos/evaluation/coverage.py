"""Conversion coverage: convert a timm model and check what the converter promises, per model.

Each model is built (pretrained=False, 10 classes, seed 0), classified as a CNN or an attention
model (`timm_bcos.evaluation.families.ATTENTION_CRITERION`) and converted with the default
`convert_to_bcos` settings; then, at the model's default input size:

- a forward + backward in train mode (float32, batch 2): a crash is ``crashed after conversion``;
- the initial logit spread: std of ``logits - b`` (float32, eval mode) over a seeded batch of 8
  [x, 1-x] noise images; alive when in [0.1, 10];
- the Eq. 13 error in float64 by an autograd check of our own (not the model's
  ``check_dynamic_linearity``): in explanation mode ``W = d logit / d x``, and
  ``max |sum(W * x) + b - logit| / max |logit - b|`` over the batch (2 images) and two classes each
  (highest and lowest logit), with ``b = model.bcos_cfg['logit_bias']``.

Outcomes: ``exact`` (error <= `EXACT_TOLERANCE`), ``inexact``, ``refused`` (`UnsupportedModuleError`:
the converter names the op and module path it cannot keep exact), ``crashed after conversion``, and
``conversion error`` (building or converting raised anything else: a converter bug).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .._utils import first_line
from ..convert import UnsupportedModuleError, convert_to_bcos, gate_branches, unconverted_modules
from ..convert.rules import is_activation, is_norm
from ..layers import AddInverse, BcosConv2d, BcosLinear, DynamicGate, contribution, explained_constants
from .families import attention_evidence, family_of

__all__ = ['ALIVE_SPREAD', 'COVERAGE_MODELS', 'CRASHED', 'CONVERSION_ERROR', 'EXACT', 'EXACT_TOLERANCE',
           'EXTRA_MODELS', 'INEXACT', 'OUTCOMES', 'REFUSED', 'CoverageResult', 'check_model',
           'dynamic_gates', 'eq13_autograd', 'logit_bias', 'logit_spread']

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
EXACT, INEXACT, REFUSED = 'exact', 'inexact', 'refused'
CRASHED, CONVERSION_ERROR = 'crashed after conversion', 'conversion error'
OUTCOMES = (EXACT, INEXACT, REFUSED, CRASHED, CONVERSION_ERROR)
EXACT_TOLERANCE = 1e-6
ALIVE_SPREAD = (0.1, 10.0)


@dataclass
class CoverageResult:
    """One model of the survey. `group` is 'CNN', 'attention', or 'unknown' (the original model's
    forward failed); `gates` lists every `DynamicGate` as (path, what it wraps)."""
    model: str
    family: str
    group: str
    outcome: str
    params: Optional[int] = None
    input_size: Optional[Tuple[int, int]] = None
    error: Optional[float] = None
    spread: Optional[float] = None
    seconds: float = 0.0
    reason: str = ''
    attention: str = ''
    gates: Sequence[Tuple[str, str]] = ()

    @property
    def ok(self) -> bool:
        return self.outcome == EXACT

    @property
    def alive(self) -> bool:
        """The untrained logits have a usable spread (`ALIVE_SPREAD`): neither dead nor exploding."""
        return self.spread is not None and ALIVE_SPREAD[0] <= self.spread <= ALIVE_SPREAD[1]


def dynamic_gates(model: nn.Module) -> Tuple[Tuple[str, str], ...]:
    """Every `DynamicGate` of `model`: its path and the non-linearity it keeps (a module class, or a
    function as ``name()``), then every branch that only feeds a gate and was kept as it was
    (``bcos_cfg['gate_branches']``: ``branch ConvBN``). Their values multiply features and are detached in
    explanation mode."""
    gates = []
    for path, m in model.named_modules():
        if isinstance(m, DynamicGate):
            what = type(m.gate).__name__ if hasattr(m, 'gate') else f'{getattr(m.gate_fn, "__name__", m.gate_fn)}()'
            gates.append((path, what))
    gates += [(path, f'branch {type(b).__name__}') for path, b in gate_branches(model) if _keeps_nonlinear(b)]
    return tuple(gates)


def _keeps_nonlinear(branch: nn.Module) -> bool:
    """A gate branch kept as it was: it holds a plain conv / linear, a norm or an activation (a
    branch of B-cos layers or of removed activations, now identities, is linear: not listed)."""
    return any((isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not isinstance(m, (BcosConv2d, BcosLinear)))
               or is_norm(m) or is_activation(m) for m in branch.modules())


def _inputs(batch: int, size: Tuple[int, int], dtype: torch.dtype, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return AddInverse()(torch.rand(batch, 3, *size, generator=generator, dtype=dtype))


def logit_bias(model: nn.Module) -> float:
    """The logit bias b of Eq. 16 that the converter recorded (0 if none)."""
    return float(model.bcos_cfg.get('logit_bias') or 0.0)


def logit_spread(model: nn.Module, size: Tuple[int, int], batch: int = 8) -> float:
    """std of ``logits - b`` over a seeded batch of [x, 1-x] noise images (float32, eval mode)."""
    model.float().eval()
    with torch.no_grad():
        logits = model(_inputs(batch, size, torch.float32, seed=1))
    return (logits.double() - logit_bias(model)).std().item()


@torch.enable_grad()
def eq13_autograd(model: nn.Module, x: Tensor) -> float:
    """Eq. 13 error of `model` at `x`: in explanation mode, ``W = d logit / d x`` for each sample's
    highest and lowest logit; ``max |sum(W * x) + sum(W_c * c) + b - logit| / max |logit - b|``, the
    constants ``c`` being the explained constants (positional embeddings, tokens; none in a CNN).
    NaN if the logits equal b exactly (nothing to check), inf if any value is not finite. One sample
    at a time, to halve the memory of the float64 autograd graph (Gemma4-ViT and DeepSeek-ViT at
    546-768 px still need more than 22 GB for one image)."""
    model.eval()
    b = logit_bias(model)
    selected, linear = zip(*(_explained_logits(model, x[i:i + 1]) for i in range(len(x))))
    selected, linear = torch.cat(selected), torch.cat(linear)
    if not (torch.isfinite(selected).all() and torch.isfinite(linear).all()):
        return math.inf
    scale = (selected - b).abs().max().item()
    return (linear + b - selected).abs().max().item() / scale if scale > 0 else math.nan


def _explained_logits(model: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """Each sample's highest and lowest logit, and ``sum(W * x) + sum(W_c * c)`` of each (N, 2)."""
    x = x.detach().clone().requires_grad_(True)
    with model.explanation_mode(), explained_constants(model, len(x)) as constants:
        logits = model(x)
        inputs = [x] + [c for _, c in constants]
        columns = torch.stack([logits.argmax(1), logits.argmin(1)], 1)
        selected = logits[torch.arange(len(x))[:, None], columns]
        linear = torch.zeros_like(selected)
        for j in range(columns.shape[1]):
            grads = torch.autograd.grad(selected[:, j].sum(), inputs, retain_graph=j + 1 < columns.shape[1],
                                        allow_unused=True)
            for w, v in zip(grads, inputs):
                if w is not None:
                    linear[:, j] += contribution(w, v, len(x))
    return selected.detach(), linear.detach()


def _train_step(model: nn.Module, size: Tuple[int, int]) -> None:
    """One forward + backward in train mode (float32, batch 2), gradients dropped afterwards."""
    model.float().train()
    model(_inputs(2, size, torch.float32)).float().sum().backward()
    model.zero_grad(set_to_none=True)


def _outcome(error: Optional[float], leftovers: Sequence[str]) -> Tuple[str, str]:
    if leftovers:
        return INEXACT, f'not converted: {", ".join(leftovers)}'
    if error is None or math.isnan(error):
        return INEXACT, 'the logits equal the logit bias: Eq. 13 cannot be checked'
    return (EXACT, '') if error <= EXACT_TOLERANCE else (INEXACT, f'Eq. 13 error {error:.1e} > {EXACT_TOLERANCE:g}')


def _classify(model: nn.Module, input_size: Sequence[int]) -> Tuple[str, str]:
    try:
        evidence = attention_evidence(model, input_size)
    except Exception as e:  # the original model does not run at its default size: not classified
        return 'unknown', f'forward of the original model failed ({first_line(e)})'
    return ('attention', evidence) if evidence else ('CNN', '')


def check_model(name: str, img_size: Optional[int] = None, **convert_kwargs) -> CoverageResult:
    """Build, classify, convert (`convert_kwargs` go to `convert_to_bcos`) and check one timm model at
    its default input size (or `img_size` px). Failures are recorded, not raised: this is a survey."""
    t0 = time.perf_counter()
    result = CoverageResult(name, family_of(name), 'unknown', CONVERSION_ERROR)
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            model = _create(name, img_size)
        size = (img_size, img_size) if img_size else tuple(model.pretrained_cfg['input_size'][1:])
        result.input_size = size
        result.group, result.attention = _classify(model, (3, *size))
        model = convert_to_bcos(model, **convert_kwargs)
    except UnsupportedModuleError as e:
        result.outcome, result.reason = REFUSED, first_line(e)
    except Exception as e:  # anything else while building or converting is a converter bug: reported
        result.reason = first_line(e)
    else:
        _check_converted(model, result)
    result.seconds = time.perf_counter() - t0
    return result


def _create(name: str, img_size: Optional[int]) -> nn.Module:
    """timm's 10-class `name`, built for `img_size` px where its constructor takes ``img_size`` (a ViT
    sizes its positional embedding when built); a CNN takes any size as built."""
    import timm

    if img_size:
        try:
            return timm.create_model(name, pretrained=False, num_classes=10, img_size=img_size)
        except TypeError as e:
            if 'img_size' not in str(e):
                raise
    return timm.create_model(name, pretrained=False, num_classes=10)


def _check_converted(model: nn.Module, result: CoverageResult) -> None:
    """The checks after a conversion: train step, spread, float64 Eq. 13 (each stage named on a crash)."""
    result.params = sum(p.numel() for p in model.parameters())
    result.gates = dynamic_gates(model)
    stage = 'train-mode forward + backward'
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            _train_step(model, result.input_size)
            stage = 'eval-mode forward (float32)'
            result.spread = logit_spread(model, result.input_size)
            stage = 'Eq. 13 check (float64)'
            result.error = eq13_autograd(model.double(), _inputs(2, result.input_size, torch.float64))
    except Exception as e:  # the converted model does not run: the outcome, with the stage
        result.outcome, result.reason = CRASHED, f'{stage}: {first_line(e)}'
        return
    result.outcome, result.reason = _outcome(result.error, unconverted_modules(model))

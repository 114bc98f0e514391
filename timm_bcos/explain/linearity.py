"""The core invariant of B-cos networks: ``f(x) = W(x) x + b`` exactly (paper Eq. 13), and its error."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..layers import LogitLayer, contribution, explained_constants, explanation_mode

__all__ = ['check_dynamic_linearity', 'eq13_error']


def eq13_error(linear: Tensor, bias: Tensor, outputs: Tensor, what: str = 'eq13_error') -> float:
    """The Eq. 13 error: ``max |linear + bias - outputs| / max |outputs - bias|``.

    `linear` is ``sum(W(x) * x)`` per explained output, `bias` is ``b = f(0)`` (broadcast against
    `outputs`). Normalised by ``|f(x) - b|``, not ``|f(x)|``: untrained B-cos outputs are tiny next to
    a logit bias such as ``-log(999)``. Returns inf when any value is NaN or inf, and NaN with a
    warning when ``f(x) - b`` is too small to resolve in the dtype of `outputs` -- never a vacuous 0.
    This is the one definition behind `Explanation.check`, `check_dynamic_linearity` and every
    ``eq13_error`` in results files and model cards.
    """
    if not all(torch.isfinite(t).all() for t in (linear, bias, outputs)):
        return math.inf
    error = (linear + bias - outputs).abs().max()
    scale = (outputs - bias).abs().max()
    if not scale > 1e3 * torch.finfo(outputs.dtype).eps * outputs.abs().max():
        warnings.warn(f'{what}: the outputs differ from the bias b = f(0) by at most {scale.item():.3g}, too '
                      f'little to resolve in {outputs.dtype}; returning NaN. Check in float64 '
                      f'(model.double(), x.double()).', stacklevel=3)
        return float('nan')
    return (error / scale).item()


@torch.enable_grad()
def check_dynamic_linearity(
        model: nn.Module,
        x: Tensor,
        targets: Optional[Union[Sequence[int], Tensor]] = None,
) -> float:
    """`eq13_error` of ``sum(W(x) * x) + b`` against the model's outputs.

    ``W(x)`` is the input gradient of each explained output in explanation mode (§3.2.1) and
    ``b = f(0)``, the output at a zero input (every B-cos layer maps 0 to 0). Explained constants
    (positional embeddings, tokens) count as inputs: their terms ``W_c(x) c`` are in the sum, and
    they are 0 for ``b``. The logit bias of
    each `LogitLayer` is taken out during the check, because untrained B-cos outputs are tiny next
    to a bias such as ``-log(999)``.

    Args:
        model: a dynamic-linear model taking the encoded input (it is run in eval mode).
        x: a batch of encoded inputs; use float64 (model and input) for a ~1e-12 check.
        targets: output indices to check; default: each sample's highest and lowest output.
    """
    was_training = model.training
    model.eval()
    # The logit bias is removed for the check: f(x) - b of an untrained B-cos net can be far below
    # the resolution of b; any other constant term still shows up in b = f(0).
    logit_layers = [m for m in model.modules() if isinstance(m, LogitLayer)]
    biases = [m.bias for m in logit_layers]
    for m in logit_layers:
        m.bias = None
    try:
        with explanation_mode(model):
            x = x.detach().clone().requires_grad_(True)
            with explained_constants(model, len(x)) as constants:
                out = model(x)
            with explained_constants(model, zero=True):
                bias = model(torch.zeros_like(x[:1])).detach()
        if out.dim() != 2:
            raise ValueError(f'expected (N, classes) outputs, got shape {tuple(out.shape)}')
        if targets is None:
            columns = torch.stack([out.argmax(1), out.argmin(1)], 1)
        else:
            columns = torch.tensor([int(t) for t in targets], device=x.device).expand(len(x), -1)
        rows = torch.arange(len(x), device=x.device)[:, None]
        selected = out[rows, columns]
        linear = torch.zeros_like(selected)
        inputs = [x] + [c for _, c in constants]  # the explained constants (a ViT's positional embedding)
        for j in range(columns.shape[1]):
            # Samples are independent, so one backward of the batch sum gives every row of W(x).
            grads = torch.autograd.grad(selected[:, j].sum(), inputs, retain_graph=j + 1 < columns.shape[1],
                                        allow_unused=True)
            for grad, v in zip(grads, inputs):
                if grad is not None:
                    linear[:, j] += contribution(grad, v, len(x))
        return eq13_error(linear.detach(), bias[0, columns], selected.detach(), 'check_dynamic_linearity')
    finally:
        model.train(was_training)
        for m, bias in zip(logit_layers, biases):
            m.bias = bias

"""Explained constants: positional embeddings and learned tokens as inputs of the explanation.

A constant ``c`` added to or concatenated with the activations (a ViT's positional embedding,
its class, register or distillation tokens) makes a network affine, not linear, in ``x``. Treated
as a second input, the network is dynamic-linear in ``(x, c)`` jointly, so Eq. 13 becomes
``f(x) = W(x) x + W_c(x) c + b`` exactly; ``W_c(x) c`` is the constant's contribution, reported next
to the pixels' (`Explanation.constants`). The converter wraps each such constant in an
`ExplainedConstant`; `explained_constants` makes them per-sample leaves for autograd (their
gradient is ``W_c(x)``), and with ``zero=True`` switches them off to measure ``b = f(0)``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ['ExplainedConstant', 'contribution', 'explained_constants']


class ExplainedConstant(nn.Module):
    """The identity on a constant tensor of shape (1, ...) (a parameter or buffer of its parent);
    in `explained_constants` it returns a per-sample copy to differentiate, or zeros."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._batch: Optional[int] = None
        self._zero = False
        self._captured: Optional[List[Tuple[str, Tensor]]] = None

    def forward(self, value: Tensor, like: Optional[Tensor] = None) -> Tensor:
        """`value`, combined with the activations `like` (whose batch dimension it gets when explaining:
        a token model may fold the image's tokens into it, e.g. TNT's (N * patches, ...))."""
        if self._zero:
            return torch.zeros_like(value)
        if self._captured is None:
            return value
        batch = like.shape[0] if like is not None else self._batch
        leaf = value.detach().expand(batch, *value.shape[1:]).clone().requires_grad_(True)
        self._captured.append((self.name, leaf))
        return leaf

    def extra_repr(self) -> str:
        return repr(self.name)


def contribution(grad: Tensor, value: Tensor, n: int) -> Tensor:
    """``sum(W * v)`` per sample: (n,) from a gradient and an input of n samples (or of n * k rows,
    image-major, for a constant folded into a larger batch)."""
    return (grad * value).reshape(n, -1).sum(1)


@contextlib.contextmanager
def explained_constants(model: nn.Module, batch: int = 1, zero: bool = False) -> Iterator[List[Tuple[str, Tensor]]]:
    """Within the context, every forward of `model` records its explained constants as (name, leaf)
    in the yielded list, each leaf a copy per sample (`batch` samples) with ``requires_grad``; with
    `zero`, the constants are zeros instead (the network's output at ``x = 0`` is then its bias b)."""
    modules = [m for m in model.modules() if isinstance(m, ExplainedConstant)]
    captured: List[Tuple[str, Tensor]] = []
    for m in modules:
        m._batch, m._zero, m._captured = batch, zero, None if zero else captured
    try:
        yield captured
    finally:
        for m in modules:
            m._batch, m._zero, m._captured = None, False, None

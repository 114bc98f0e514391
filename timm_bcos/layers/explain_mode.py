"""Explanation mode (paper §3.2.1).

A B-cos layer computes ``y = W(x) x`` with an input-dependent matrix ``W(x)`` (Eq. 10-11).
Detaching the input-dependent factor (the dynamic scale ``|c|^(B-1)``, a norm's divisor, a
gate's value) from the autograd graph turns one backward pass from an output into exactly
the row of ``W_{1->L}(x)`` (Eq. 13-14), while the forward values stay the same.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ['DetachableModule', 'explanation_mode', 'is_explanation_mode']


class DetachableModule(nn.Module):
    """Base class of modules whose input-dependent factors are detached in explanation mode."""

    def __init__(self) -> None:
        super().__init__()
        self.detach_dynamic = False


@contextlib.contextmanager
def explanation_mode(model: nn.Module, active: bool = True) -> Iterator[nn.Module]:
    """Context manager: put every `DetachableModule` of `model` in (or out of) explanation mode.

    The previous state of each module is restored on exit, so the context nests.
    """
    modules = [m for m in model.modules() if isinstance(m, DetachableModule)]
    previous = [m.detach_dynamic for m in modules]
    for m in modules:
        m.detach_dynamic = active
    try:
        yield model
    finally:
        for m, state in zip(modules, previous):
            m.detach_dynamic = state


def is_explanation_mode(model: nn.Module) -> bool:
    """True if any `DetachableModule` of `model` is in explanation mode."""
    return any(m.detach_dynamic for m in model.modules() if isinstance(m, DetachableModule))

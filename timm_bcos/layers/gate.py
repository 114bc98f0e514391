"""Dynamic linear gates: ``x * g(x)`` with ``g(x)`` detached in explanation mode (paper §3.2.1)."""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor, nn

from .explain_mode import DetachableModule

__all__ = ['ActivationGate', 'DynamicGate']


class DynamicGate(DetachableModule):
    """Wrap the non-linearity that produces a gate (squeeze-excite's sigmoid, a hard-sigmoid).

    A gated product ``x * g(x)`` is not linear in ``x``, but it is an input-dependent linear map
    of ``x`` with weights ``g(x)`` -- like the B-cos scale ``|c|^(B-1)``. In explanation mode the
    gate's value is detached, so the product stays part of the exact ``W(x) x`` summary
    (Eq. 13); the forward values are unchanged.
    """

    def __init__(self, gate: Union[nn.Module, Callable[[Tensor], Tensor]]) -> None:
        super().__init__()
        if isinstance(gate, nn.Module):
            self.gate = gate
        else:
            self.gate_fn = gate

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """The gate's value; further arguments (a softmax's ``dim``) go to the gate as they were."""
        g = self.gate(x, *args, **kwargs) if hasattr(self, 'gate') else self.gate_fn(x, *args, **kwargs)
        return g.detach() if self.detach_dynamic else g

    def extra_repr(self) -> str:
        return '' if hasattr(self, 'gate') else f'gate_fn={getattr(self.gate_fn, "__name__", self.gate_fn)}'


class ActivationGate(DetachableModule):
    """A kept activation written as a gate: ``act(x) = x * g(x)`` with ``g(x) = act(x) / x``
    (ReLU: the mask ``x > 0``; GELU: Φ(x); SiLU: σ(x)), ``g`` detached in explanation mode.

    B-cosification keeps the pretrained network's activations; as gates they keep the network
    dynamic-linear (Eq. 13), with the same forward values. Only activations with ``act(0) = 0``
    have this form (checked by the converter).
    """

    def __init__(self, act: Union[nn.Module, Callable[..., Tensor]]) -> None:
        super().__init__()
        if isinstance(act, nn.Module):
            self.act = act
        else:
            self.act_fn = act

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if hasattr(self, 'act'):  # an in-place activation must not overwrite x
            y = self.act(x.clone() if getattr(self.act, 'inplace', False) else x, *args, **kwargs)
        else:
            y = self.act_fn(x.clone(), *args, **kwargs)
        zero = x == 0
        g = torch.where(zero, torch.zeros_like(y), y / torch.where(zero, torch.ones_like(x), x))
        return x * (g.detach() if self.detach_dynamic else g)

    def extra_repr(self) -> str:
        return '' if hasattr(self, 'act') else f'act_fn={getattr(self.act_fn, "__name__", self.act_fn)}'

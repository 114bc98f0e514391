"""Dynamic linear gates: ``x * g(x)`` with ``g(x)`` detached in explanation mode (paper §3.2.1)."""
from __future__ import annotations

from typing import Callable, Union

from torch import Tensor, nn

from .explain_mode import DetachableModule

__all__ = ['DynamicGate']


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

"""B-cos linear layer (paper Eq. 3, 9; MaxOut Eq. 17)."""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor, nn

from .bcos_function import bcos_apply
from .bcos_geometry import LinearGeometry
from .calibration import CalibratedConstant
from .explain_mode import DetachableModule
from .helpers import check_b_max_out, check_input, check_unnormalised, gain_and_bias, resolve_scale

__all__ = ['BcosLinear']


class BcosLinear(CalibratedConstant, DetachableModule):
    """B-cos linear layer on the last dimension of inputs of any leading shape.

    ``out = max_m(ŵ_m · x) * |cos(x, ŵ_m*)|^(B-1) / scale`` (Eq. 9, 17), no bias.
    `b`, `max_out`, `scale`, `scale_factor`, `normalized` and `bias` are as in `BcosConv2d`
    (``fan_in = in_features``).
    ``weight`` rows are ordered (MaxOut unit, output): row ``m * out_features + o``.
    """

    def __init__(
            self,
            in_features: int,
            out_features: int,
            b: float = 2.0,
            max_out: int = 2,
            scale: Union[float, str, None] = 'auto',
            scale_factor: float = 100.0,
            normalized: bool = True,
            bias: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        check_b_max_out(b, max_out)
        check_unnormalised(normalized, max_out)
        self.in_features = in_features
        self.out_features = out_features
        self.b = float(b)
        self.max_out = max_out
        self.normalized = normalized
        self.scale = resolve_scale(scale, in_features, scale_factor)
        self.weight = nn.Parameter(torch.empty((out_features * max_out, in_features), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._geometry = LinearGeometry()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self, -1, self.in_features, rank=None)
        lead = x.shape[:-1]
        out = bcos_apply(x.reshape(-1, self.in_features), self.weight, self._geometry, self.max_out,
                         self.b, self.scale, self.detach_dynamic)
        return gain_and_bias(out, self.weight, self.bias, self.normalized, -1).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f'in_features={self.in_features}, out_features={self.out_features}, '
                f'b={self.b:g}, max_out={self.max_out}, scale={self.scale:.4g}' +
                ('' if self.normalized else ', normalized=False') + ('' if self.bias is None else ', bias=True'))

"""B-cos 2-D convolution (paper Eq. 3, 9; MaxOut Eq. 17; Alg. 1 of the supplement)."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .bcos_function import bcos_apply
from .bcos_geometry import ConvGeometry
from .calibration import CalibratedConstant
from .explain_mode import DetachableModule
from .helpers import check_b_max_out, check_input, check_unnormalised, gain_and_bias, resolve_scale

__all__ = ['BcosConv2d', 'BcosConv2dSame']

_PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')
_IntOrPair = Union[int, Tuple[int, int]]


class BcosConv2d(CalibratedConstant, DetachableModule):
    """B-cos convolution: MaxOut over `max_out` unit-norm kernels, scaled by ``|cos|^(B-1)``.

    ``out = max_m(ŵ_m · p) * |cos(p, ŵ_m*)|^(B-1) / scale`` for every input patch ``p`` (Eq. 9,
    17), no bias. The patch norm is computed on the same padded input the convolution sees, for
    every padding mode, stride, dilation and group count.

    Args:
        b: the exponent B >= 1 (B=1 is a linear map with unit-norm weights).
        max_out: MaxOut units per output channel (the paper uses 2).
        scale: fixed output divisor. ``'auto'`` (default) is v1's ``sqrt(fan_in) / scale_factor``
            (``k * sqrt(C_in) / 100`` for a square kernel), which norm-free B-cos networks need to
            train at all; ``None`` means 1 (networks with norm layers, the v2 design).
        scale_factor: the divisor in the ``'auto'`` scale.
        normalized: unit-norm weights (the paper); False keeps their norm, ``(w·x) |cos|^(B-1)``
            (B-cosification: at B=1 the plain convolution; needs ``max_out=1``).
        bias: add a learned bias (B-cosification's function-preserving B=1 form only: a bias
            breaks dynamic linearity).

    `timm_bcos.calibrate_scales` (default in `convert_to_bcos`) may set ``scale`` from data; a
    calibrated scale is saved in the state dict (`CalibratedConstant`).

    ``weight`` has shape (out_channels * max_out, in_channels // groups, kh, kw); the MaxOut unit
    ``m`` of output ``o`` in group ``g`` is row ``g * M * Og + m * Og + (o - g * Og)`` (``Og`` outputs
    per group), so MaxOut partners are contiguous blocks of the convolution output. B-cos v1/v2
    checkpoints order units ``o * M + m``: convert with `from_reference_layout`.
    """

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: _IntOrPair,
            stride: _IntOrPair = 1,
            padding: Union[_IntOrPair, str] = 0,
            dilation: _IntOrPair = 1,
            groups: int = 1,
            padding_mode: str = 'zeros',
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
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'in_channels ({in_channels}) and out_channels ({out_channels}) '
                             f'must both be divisible by groups ({groups})')
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f'padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}')
        check_b_max_out(b, max_out)
        check_unnormalised(normalized, max_out)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.groups = groups
        self.padding_mode = padding_mode
        self.b = float(b)
        self.max_out = max_out
        self.normalized = normalized
        fan_in = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self.scale = resolve_scale(scale, fan_in, scale_factor)
        self.weight = nn.Parameter(torch.empty(
            (out_channels * max_out, in_channels // groups) + self.kernel_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        self._pad, conv_padding = self._resolve_padding()
        self._geometry = ConvGeometry(self.kernel_size, self.stride, conv_padding, self.dilation, groups)
        self.reset_parameters()

    def _resolve_padding(self) -> Tuple[Optional[Tuple[int, int, int, int]], Tuple[int, int]]:
        """Explicit (left, right, top, bottom) padding to apply before the conv, and the conv's own."""
        if self.padding == 'valid':
            return None, (0, 0)
        if self.padding == 'same':
            if self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            (top, left) = (t // 2 for t in totals)
            pad = (left, totals[1] - left, top, totals[0] - top)
        elif isinstance(self.padding, str):
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {self.padding!r}")
        else:
            ph, pw = self.padding
            pad = (pw, pw, ph, ph)
        if self.padding_mode == 'zeros' and pad[0] == pad[1] and pad[2] == pad[3]:
            return None, (pad[2], pad[0])
        return pad, (0, 0)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, self, 1, self.in_channels, rank=4)
        if self._pad is not None:
            mode = 'constant' if self.padding_mode == 'zeros' else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        out = bcos_apply(x, self.weight, self._geometry, self.max_out, self.b, self.scale, self.detach_dynamic)
        return gain_and_bias(out, self.weight, self.bias, self.normalized, 1)

    def extra_repr(self) -> str:
        s = f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}'
        if self.padding not in ((0, 0), 'valid'):
            s += f', padding={self.padding}'
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.padding_mode != 'zeros':
            s += f', padding_mode={self.padding_mode}'
        s += f', b={self.b:g}, max_out={self.max_out}, scale={self.scale:.4g}'
        return s + ('' if self.normalized else ', normalized=False') + ('' if self.bias is None else ', bias=True')


class BcosConv2dSame(BcosConv2d):
    """`BcosConv2d` with TensorFlow-style dynamic 'SAME' padding (timm's `Conv2dSame`).

    The zero padding depends on the input size and is applied before the patch norms, so they see
    the padded input exactly as the convolution does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntOrPair, stride: _IntOrPair = 1,
                 dilation: _IntOrPair = 1, groups: int = 1, **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, dilation=dilation,
                         groups=groups, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        from timm.layers.padding import pad_same

        check_input(x, self, 1, self.in_channels, rank=4)
        return super().forward(pad_same(x, self.kernel_size, self.stride, self.dilation))

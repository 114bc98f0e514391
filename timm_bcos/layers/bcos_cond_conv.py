"""B-cos conditionally parameterised convolution (CondConv, Yang et al. 2019, timm's `CondConv2d`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bcos_conv import BcosConv2d
from .bcos_function import bcos_apply
from .bcos_geometry import ConvGeometry
from .helpers import check_input

__all__ = ['BcosCondConv2d']


class BcosCondConv2d(BcosConv2d):
    """A `BcosConv2d` whose weight is mixed per sample from `num_experts` expert weights.

    ``forward(x, routing)``: sample ``n`` is transformed by the B-cos convolution (Eq. 3, 9, 17)
    with weight ``W_n = sum_e routing[n, e] * W_e``. The routing is computed from the input, so the
    mixed weight is a dynamic weight like the B-cos scale ``|c|^(B-1)``: in explanation mode both
    are detached, and ``y = W(x) x`` holds exactly (Eq. 10-13).

    ``weight`` has shape (num_experts, out_channels * max_out, in_channels // groups, kh, kw), each
    expert in `BcosConv2d`'s unit layout. ``same_padding`` pads like TensorFlow's 'SAME' (timm's
    dynamic padding), from the input size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_experts: int = 4,
                 same_padding: bool = False, **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self.num_experts = num_experts
        self.same_padding = same_padding
        self.weight = nn.Parameter(self.weight.new_empty((num_experts,) + tuple(self.weight.shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for expert in (self.weight if self.weight.dim() == 5 else [self.weight]):
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))

    def forward(self, x: Tensor, routing: Tensor) -> Tensor:
        check_input(x, self, 1, self.in_channels, rank=4)
        if self.detach_dynamic:
            routing = routing.detach()
        n = x.shape[0]
        weight = torch.matmul(routing, self.weight.flatten(1)).view((-1,) + tuple(self.weight.shape[2:]))
        if self.same_padding:
            from timm.layers.padding import pad_same
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        elif self._pad is not None:
            mode = 'constant' if self.padding_mode == 'zeros' else self.padding_mode
            x = F.pad(x, self._pad, mode=mode)
        # One grouped convolution over the batch: sample n's groups are groups n*G .. n*G + G-1.
        g = self._geometry
        geometry = ConvGeometry(g.kernel_size, g.stride, g.padding, g.dilation, g.groups * n)
        out = bcos_apply(x.reshape(1, -1, *x.shape[2:]), weight, geometry, self.max_out, self.b, self.scale,
                         self.detach_dynamic)
        return out.view(n, self.out_channels, *out.shape[2:])

    def extra_repr(self) -> str:
        return super().extra_repr() + f', num_experts={self.num_experts}'

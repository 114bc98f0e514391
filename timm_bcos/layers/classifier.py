"""Classifier heads of B-cos networks: a B-cos layer to the classes, then the logit map of Eq. 16."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .bcos_conv import BcosConv2d
from .bcos_linear import BcosLinear
from .logit import LogitLayer

__all__ = ['BcosClassifier', 'BcosConvClassifier']


class BcosClassifier(BcosLinear):
    """The classifier of a converted model: `BcosLinear` followed by the fixed logit map of Eq. 16."""

    def __init__(self, in_features: int, out_features: int, logit_bias: Optional[float] = None,
                 logit_temperature: Optional[float] = None, **kwargs) -> None:
        super().__init__(in_features, out_features, **kwargs)
        self.logit = LogitLayer(bias=logit_bias, temperature=logit_temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit(super().forward(x))


class BcosConvClassifier(nn.Module):
    """v1/v2 head: a 1x1 B-cos conv to the classes *before* global average pooling, then Eq. 16."""

    def __init__(self, in_features: int, out_features: int, logit_bias: Optional[float] = None,
                 logit_temperature: Optional[float] = None, **kwargs) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fc = BcosConv2d(in_features, out_features, 1, **kwargs)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.logit = LogitLayer(bias=logit_bias, temperature=logit_temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"head='conv' expects the unpooled (N, C, H, W) feature map, got {tuple(x.shape)}")
        return self.logit(self.pool(self.fc(x)).flatten(1))

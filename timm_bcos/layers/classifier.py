"""Classifier heads of B-cos networks: a B-cos layer to the classes, then the logit map of Eq. 16."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from .bcos_conv import BcosConv2d
from .bcos_linear import BcosLinear
from .logit import LogitLayer

__all__ = ['BcosClassifier', 'BcosConvClassifier']


def reset_uncalibrated_logit(logit: LogitLayer, state_dict: Dict[str, Any], prefix: str, weight_key: str) -> None:
    """A checkpoint that holds the classifier's weight but no temperature was not calibrated: its
    logit map has the constructed temperature."""
    if prefix + weight_key in state_dict and prefix + 'logit.temperature' not in state_dict:
        logit.reset_calibration()


class BcosClassifier(BcosLinear):
    """The classifier of a converted model: `BcosLinear` followed by the fixed logit map of Eq. 16."""

    def __init__(self, in_features: int, out_features: int, logit_bias: Optional[float] = None,
                 logit_temperature: Optional[float] = None, **kwargs) -> None:
        super().__init__(in_features, out_features, **kwargs)
        self.logit = LogitLayer(bias=logit_bias, temperature=logit_temperature)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        reset_uncalibrated_logit(self.logit, state_dict, prefix, 'weight')

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

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        reset_uncalibrated_logit(self.logit, state_dict, prefix, 'fc.weight')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"head='conv' expects the unpooled (N, C, H, W) feature map, got {tuple(x.shape)}")
        return self.logit(self.pool(self.fc(x)).flatten(1))

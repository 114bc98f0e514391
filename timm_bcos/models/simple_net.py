"""The paper's plain convolutional B-cos network for CIFAR-10 (§4 "Models", §5.1)."""
from __future__ import annotations

import math
from typing import Sequence, Union

from torch import Tensor, nn

from ..layers import BcosConv2d, LogitLayer

__all__ = ['BcosSimpleNet']


class BcosSimpleNet(nn.Module):
    """3x3 B-cos convolutions, a 1x1 B-cos convolution to the classes, global average pooling and
    the fixed logit map of Eq. 16. No norms, no activations: every output is ``W(x) x + b``.

    The defaults are the paper's 9-layer CIFAR-10 net (v1 widths 64-64-128-128-128-256-256-256,
    strides 2 at layers 3 and 6, MaxOut 2, logit bias ``log(0.1 / 0.9)``). Input: the 6-channel
    encoding [x, 1-x] of images in [0, 1].
    """

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 6,
            widths: Sequence[int] = (64, 64, 128, 128, 128, 256, 256, 256),
            strides: Sequence[int] = (1, 1, 2, 1, 1, 2, 1, 1),
            b: float = 2.0,
            max_out: int = 2,
            scale: Union[float, str, None] = 'auto',
            logit_bias: float = math.log(0.1 / 0.9),
            logit_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError(f'widths ({len(widths)}) and strides ({len(strides)}) must have the same length')
        self.num_classes = num_classes
        layers, c = [], in_chans
        for w, s in zip(widths, strides):
            layers.append(BcosConv2d(c, w, 3, stride=s, padding=1, b=b, max_out=max_out, scale=scale))
            c = w
        self.features = nn.Sequential(*layers)
        self.num_features = c
        self.classifier = BcosConv2d(c, num_classes, 1, b=b, max_out=max_out, scale=scale)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.logit = LogitLayer(bias=logit_bias, temperature=logit_temperature)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.logit(self.pool(self.classifier(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

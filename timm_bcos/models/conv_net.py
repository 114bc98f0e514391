"""The conventional counterpart of `BcosSimpleNet`, for baselines (training and evaluation)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .conv_head import ConvHeadNet

__all__ = ['SimpleConvNet']


class SimpleConvNet(ConvHeadNet):
    """`BcosSimpleNet`'s layout as a conventional CNN: 3x3 conv + BatchNorm + ReLU per width (same
    widths and strides), a 1x1 conv classifier with bias, global average pooling. RGB input in
    [0, 1]; trained with cross entropy. Post-hoc attribution methods are compared on it (§5.1)."""

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 3,
            widths: Sequence[int] = (64, 64, 128, 128, 128, 256, 256, 256),
            strides: Sequence[int] = (1, 1, 2, 1, 1, 2, 1, 1),
    ) -> None:
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError(f'widths ({len(widths)}) and strides ({len(strides)}) must have the same length')
        self.num_classes = num_classes
        self.in_chans = in_chans
        layers, c = [], in_chans
        for w, s in zip(widths, strides):
            layers += [nn.Conv2d(c, w, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.num_features = c
        self.classifier = self._make_classifier(num_classes)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()

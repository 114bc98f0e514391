"""The paper's plain convolutional B-cos network for CIFAR-10 (§4 "Models", §5.1)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from torch import Tensor, nn

from ..layers import BcosConv2d, LogitLayer
from ..convert.mixin import BcosModelMixin
from .conv_head import ConvHeadNet

__all__ = ['BcosSimpleNet']


class BcosSimpleNet(BcosModelMixin, ConvHeadNet):
    """3x3 B-cos convolutions, a 1x1 B-cos convolution to the classes, global average pooling and
    the fixed logit map of Eq. 16. No norms, no activations: every output is ``W(x) x + b``.

    The defaults are the paper's 9-layer CIFAR-10 net (v1: widths 64-64-128-128-128-256-256-256,
    strides 2 at layers 3 and 6, MaxOut 2, B=2, logit bias ``log(0.1 / 0.9)``); ``max_out=1`` is
    its "plain" variant. Input: the 6-channel encoding [x, 1-x] of images in [0, 1]. It follows
    timm's model API (forward_features, forward_head, get_classifier, reset_classifier).
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
            logit_bias: Optional[float] = math.log(0.1 / 0.9),
            logit_temperature: Optional[float] = None,
    ) -> None:
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError(f'widths ({len(widths)}) and strides ({len(strides)}) must have the same length')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self._layer_kwargs = dict(b=b, max_out=max_out, scale=scale)
        layers, c = [], in_chans
        for w, s in zip(widths, strides):
            layers.append(BcosConv2d(c, w, 3, stride=s, padding=1, **self._layer_kwargs))
            c = w
        self.features = nn.Sequential(*layers)
        self.num_features = c
        self.classifier = self._make_classifier(num_classes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.logit = LogitLayer(bias=logit_bias, temperature=logit_temperature)
        self.bcos_cfg = dict(b=b, max_out=max_out, norm='none', in_chans=in_chans, logit_bias=logit_bias,
                             logit_temperature=logit_temperature, head='conv')

    def _make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return BcosConv2d(self.num_features, num_classes, 1, **self._layer_kwargs)

    def _logits(self, scores: Tensor) -> Tensor:
        return self.logit(scores)  # Eq. 16: the fixed logit bias (and temperature)

    # _make_classifier already builds a B-cos layer: the plain reset, not the mixin's re-conversion
    reset_classifier = ConvHeadNet.reset_classifier

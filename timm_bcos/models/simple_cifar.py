"""The paper's plain 9-layer CIFAR-10 network (§4 "Models", §5.1), as a B-cos network and as its
conventional counterpart (the baseline of training and evaluation), with timm's model API."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..convert.mixin import BcosModelMixin
from ..layers import BcosConv2d, LogitLayer

__all__ = ['BcosSimpleNet', 'ConvHeadNet', 'SimpleConvNet']

WIDTHS = (64, 64, 128, 128, 128, 256, 256, 256)
STRIDES = (1, 1, 2, 1, 1, 2, 1, 1)


class ConvHeadNet(nn.Module):
    """`features` (3x3 layers of the given widths and strides), then a 1x1 conv classifier *before*
    global average pooling (as in v1). Subclasses say what a layer and the classifier are
    (`_make_layer`, `_make_classifier`); `_logits` maps the pooled class scores to the outputs."""

    def __init__(self, num_classes: int, in_chans: int, widths: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError(f'widths ({len(widths)}) and strides ({len(strides)}) must have the same length')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False
        layers, c, reduction, self.feature_info = [], in_chans, 1, []
        for i, (w, s) in enumerate(zip(widths, strides)):
            layer = self._make_layer(c, w, s)
            layers += layer
            self._layer_size = len(layer)  # modules per layer: checkpointed together
            c, reduction = w, reduction * s
            if i + 1 == len(widths) or strides[i + 1] != 1:  # the last layer at each resolution
                self.feature_info.append(dict(num_chs=w, reduction=reduction, module=f'features.{len(layers) - 1}'))
        self.features = nn.Sequential(*layers)
        self.num_features = c
        self.classifier = self._make_classifier(num_classes)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def _make_layer(self, in_chans: int, out_chans: int, stride: int) -> List[nn.Module]:
        raise NotImplementedError

    def _make_classifier(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def _logits(self, scores: Tensor) -> Tensor:
        return scores

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise lr decay): the first layer is the stem, each layer a block."""
        return dict(stem=r'^features\.0\.', blocks=r'^features\.(\d+)' if coarse else [(r'^features\.(\d+)', None)])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the features in the backward pass instead of storing them (timm's API)."""
        self.grad_checkpointing = enable

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, List[int]]] = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW', intermediates_only: bool = False
                              ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm's API: the outputs of the `feature_info` levels `indices` (default all; an int n: the
        last n), and the final features unless `intermediates_only`."""
        from timm.models._features import feature_take_indices

        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, _ = feature_take_indices(len(self.feature_info), indices)
        ends = [int(f['module'].split('.')[1]) for f in self.feature_info]
        last = ends[max(take)] if stop_early else len(self.features) - 1
        intermediates = []
        for i, layer in enumerate(self.features[:last + 1]):
            x = layer(x)
            if i in ends and ends.index(i) in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new 1x1 classifier (0: none, the pooled features are returned)."""
        self.num_classes = num_classes
        self.classifier = self._make_classifier(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq
            return checkpoint_seq(self.features, x, every=self._layer_size)
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``pre_logits`` (or no classifier): the pooled features."""
        if pre_logits or self.num_classes <= 0:
            return self.pool(x).flatten(1)
        return self._logits(self.pool(self.classifier(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


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
            widths: Sequence[int] = WIDTHS,
            strides: Sequence[int] = STRIDES,
            b: float = 2.0,
            max_out: int = 2,
            scale: Union[float, str, None] = 'auto',
            logit_bias: Optional[float] = math.log(0.1 / 0.9),
            logit_temperature: Optional[float] = None,
    ) -> None:
        self._layer_kwargs = dict(b=b, max_out=max_out, scale=scale)  # read while the layers are built
        super().__init__(num_classes, in_chans, widths, strides)
        self.logit = LogitLayer(bias=logit_bias, temperature=logit_temperature)
        self.bcos_cfg = dict(b=b, max_out=max_out, norm='none', in_chans=in_chans, logit_bias=logit_bias,
                             logit_temperature=logit_temperature, head='conv')

    def _make_layer(self, in_chans: int, out_chans: int, stride: int) -> List[nn.Module]:
        return [BcosConv2d(in_chans, out_chans, 3, stride=stride, padding=1, **self._layer_kwargs)]

    def _make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return BcosConv2d(self.num_features, num_classes, 1, **self._layer_kwargs)

    def _logits(self, scores: Tensor) -> Tensor:
        return self.logit(scores)  # Eq. 16: the fixed logit bias (and temperature)

    # _make_classifier already builds a B-cos layer: the plain reset, not the mixin's re-conversion
    reset_classifier = ConvHeadNet.reset_classifier


class SimpleConvNet(ConvHeadNet):
    """`BcosSimpleNet`'s layout as a conventional CNN: 3x3 conv + BatchNorm + ReLU per width (same
    widths and strides), a 1x1 conv classifier with bias, global average pooling. RGB input in
    [0, 1]; trained with cross entropy. Post-hoc attribution methods are compared on it (§5.1)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: Sequence[int] = WIDTHS,
                 strides: Sequence[int] = STRIDES) -> None:
        super().__init__(num_classes, in_chans, widths, strides)

    def _make_layer(self, in_chans: int, out_chans: int, stride: int) -> List[nn.Module]:
        return [nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out_chans),
                nn.ReLU(inplace=True)]

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()

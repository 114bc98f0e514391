"""timm's model API for the plain 9-layer nets (`BcosSimpleNet` and its conventional counterpart)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

__all__ = ['ConvHeadNet']


class ConvHeadNet(nn.Module):
    """`features`, then a 1x1 conv classifier *before* global average pooling (as in v1).

    Subclasses build ``features``, ``pool``, ``num_features``, ``num_classes`` and
    ``classifier = _make_classifier(num_classes)``; `_logits` maps the pooled class scores to the
    outputs (identity here).
    """

    def _make_classifier(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def _logits(self, scores: Tensor) -> Tensor:
        return scores

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new 1x1 classifier (0: none, the pooled features are returned)."""
        self.num_classes = num_classes
        self.classifier = self._make_classifier(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``pre_logits`` (or no classifier): the pooled features."""
        if pre_logits or self.num_classes <= 0:
            return self.pool(x).flatten(1)
        return self._logits(self.pool(self.classifier(x)).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

"""The fixed output map of B-cos classifiers: logits = x / temperature + bias (paper Eq. 16)."""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor

from .calibration import CalibratedConstant

__all__ = ['LogitLayer']


class LogitLayer(CalibratedConstant):
    """Divide by a fixed `temperature` and add a fixed `bias` (the ``b`` of Eq. 16).

    Both are constants, not parameters: the bias sets the prior of the BCE loss (v1 uses
    ``log(0.01 / 0.99)``, v2 ``-log(C - 1)``) and is the ``b`` of ``logit = W(x) x + b`` (Eq. 13).
    None means no temperature (1) or no bias (0). A calibrated temperature (`calibrate_scales`)
    is saved in the state dict.
    """

    calibrated_attr = 'temperature'

    def __init__(self, bias: Optional[float] = None, temperature: Optional[float] = None) -> None:
        super().__init__()
        if temperature is not None and not temperature > 0:
            raise ValueError(f'temperature must be positive, got {temperature!r}')
        self.bias = None if bias is None else float(bias)
        self.temperature = None if temperature is None else float(temperature)

    def _holds_layer(self, state_dict: Dict[str, Any], prefix: str) -> bool:
        """Never known here (a module sees only its own keys): the classifier that owns this map resets
        it when a checkpoint holds the classifier but no temperature (`reset_uncalibrated_logit`)."""
        return False

    def forward(self, x: Tensor) -> Tensor:
        if self.temperature is not None:
            x = x / self.temperature
        if self.bias is not None:
            x = x + self.bias
        return x

    def extra_repr(self) -> str:
        return f'bias={self.bias}, temperature={self.temperature}'

"""Calibrated constants of B-cos layers, saved in the state dict.

A B-cos layer's output divisor (``scale``) and the logit temperature (Eq. 16) are constants of the
forward, so they do not change dynamic linearity (Eq. 13), but they decide whether an untrained
norm-free network carries a signal at all. `timm_bcos.calibrate_scales` sets them from a batch;
once calibrated, a value travels in the state dict (``<layer>.scale``, ``<logit>.temperature``, a
float64 scalar), so a saved model reloads identically. A checkpoint that holds the layer but not
the value was made before calibration: loading it restores the constructed value.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Set

import torch
from torch import nn

__all__ = ['CalibratedConstant', 'calibration_keys']


class CalibratedConstant(nn.Module):
    """Mixin for a module with one float constant (`calibrated_attr`) that calibration may set.

    Only a calibrated value is written to the state dict, so checkpoints of uncalibrated models
    (every released v1 / v2 checkpoint) keep their keys. The value is a plain float in the
    forward: no device syncs, no extra tensors.
    """

    calibrated_attr: str = 'scale'
    calibrated: bool = False
    uncalibrated_value: Optional[float] = None

    def set_calibrated(self, value: float) -> None:
        """Set the constant to a calibrated positive finite `value` (saved in the state dict from now on)."""
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f'{type(self).__name__}.{self.calibrated_attr} must be positive and finite, got {value}')
        if not self.calibrated:
            self.uncalibrated_value = getattr(self, self.calibrated_attr)
        setattr(self, self.calibrated_attr, value)
        self.calibrated = True

    def reset_calibration(self) -> None:
        """Back to the constructed value (that of an uncalibrated checkpoint)."""
        if self.calibrated:
            setattr(self, self.calibrated_attr, self.uncalibrated_value)
            self.calibrated = False

    def _holds_layer(self, state_dict: Dict[str, Any], prefix: str) -> bool:
        """Whether a state dict being loaded holds this layer (then a missing value means uncalibrated)."""
        return prefix + 'weight' in state_dict

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        value = getattr(self, self.calibrated_attr)
        if self.calibrated and value is not None:
            destination[prefix + self.calibrated_attr] = torch.tensor(value, dtype=torch.float64)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, local_metadata: Dict[str, Any],
                              strict: bool, missing_keys: List[str], unexpected_keys: List[str],
                              error_msgs: List[str]) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + self.calibrated_attr
        if key not in state_dict:
            if self._holds_layer(state_dict, prefix):
                self.reset_calibration()
            return
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
            error_msgs.append(f'{key}: expected a float scalar (the calibrated {self.calibrated_attr}), got '
                              f'{type(value).__name__} {tuple(getattr(value, "shape", ()))}')
            return
        try:
            self.set_calibrated(value.item())
        except ValueError as e:
            error_msgs.append(f'{key}: {e}')


def calibration_keys(model: nn.Module) -> Set[str]:
    """The state-dict keys calibrated constants of `model` may have: optional in any checkpoint."""
    return {f'{path}.{m.calibrated_attr}' if path else m.calibrated_attr
            for path, m in model.named_modules() if isinstance(m, CalibratedConstant)}

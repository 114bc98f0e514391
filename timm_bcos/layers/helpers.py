"""Argument and input checks shared by the B-cos layers."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ['check_b_max_out', 'check_input', 'check_unnormalised', 'gain_and_bias', 'resolve_scale']


def check_input(x: Tensor, layer: nn.Module, channel_dim: int, expected: int, rank: Optional[int]) -> None:
    """Raise a clear error for inputs of the wrong type, rank or channel count."""
    name = type(layer).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f'{name} expects a torch.Tensor, got {type(x).__name__}')
    if not x.is_floating_point():
        raise TypeError(f'{name} expects a floating point tensor, got dtype {x.dtype}')
    if rank is not None and x.dim() != rank:
        raise ValueError(f'{name} expects a {rank}-D input (N, C, H, W), got shape {tuple(x.shape)}')
    if x.dim() == 0 or x.shape[channel_dim] != expected:
        got = 'a scalar' if x.dim() == 0 else f'{x.shape[channel_dim]} channels (shape {tuple(x.shape)})'
        hint = ''
        if x.dim() and x.shape[channel_dim] * 2 == expected:
            hint = (' B-cos models take the 6-channel encoding [x, 1-x] of images in [0, 1] (paper §4):'
                    ' apply timm_bcos.AddInverse() to the 3-channel image first.')
        raise ValueError(f'{name} expects {expected} input channels, got {got}.{hint}')


def check_b_max_out(b: float, max_out: int) -> None:
    """B must be a real number >= 1 (Eq. 3), max_out a positive int (Eq. 17)."""
    if not (isinstance(b, (int, float)) and math.isfinite(b) and b >= 1):
        raise ValueError(f'B must be a real number >= 1, got {b!r}')
    if not (isinstance(max_out, int) and max_out >= 1):
        raise ValueError(f'max_out must be a positive int, got {max_out!r}')


def check_unnormalised(normalized: bool, max_out: int) -> None:
    if not normalized and max_out != 1:
        raise ValueError(f'unnormalised weights (normalized=False) need max_out=1, got max_out={max_out}')


def gain_and_bias(out: Tensor, weight: Tensor, bias: Optional[Tensor], normalized: bool, channel_dim: int) -> Tensor:
    """B-cosification's layer from the unit-norm one: times ``||w||`` per output when the weights
    are not normalised (``(w·x) |cos(x, w)|^(B-1)``, the plain layer at B=1), plus the bias if any."""
    if normalized and bias is None:
        return out
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    if not normalized:
        out = out * torch.linalg.vector_norm(weight.flatten(1), dim=1).to(out.dtype).view(shape)
    return out if bias is None else out + bias.to(out.dtype).view(shape)


def default_scale(fan_in: int, scale_factor: float) -> float:
    """v1's output divisor ``k * sqrt(C_in) / scale_factor`` written as ``sqrt(fan_in) / scale_factor``."""
    return math.sqrt(fan_in) / scale_factor


def resolve_scale(scale: Union[float, str, None], fan_in: int, scale_factor: float) -> float:
    """The output divisor: 'auto' -> v1's sqrt(fan_in) / scale_factor, None -> 1."""
    if scale is None:
        return 1.0
    if scale == 'auto':
        return default_scale(fan_in, scale_factor)
    if isinstance(scale, str) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be 'auto', None or a positive number, got {scale!r}")
    return float(scale)

"""Bias-free uncentered normalisation layers of the B-cos v2 design.

Each layer computes ``y = x * weight / sqrt(var + eps)``: the variance is the usual (centered,
biased) one, but the mean is not subtracted from the output and there is no bias. Per sample the
layer is therefore a linear map ``W(x) x`` with a diagonal, input-dependent ``W(x)``, like the
B-cos scale (Eq. 10-11). In explanation mode (paper §3.2.1) the divisor is detached, so a
backward pass sees exactly ``W(x)`` and the B-cos network stays summarisable by Eq. 13.

Statistics are computed in (at least) float32 and eps is added there, so fp16/bf16 inputs under
autocast cannot overflow the variance or divide by a rounded-to-zero ``var + eps``. Under autocast
the output is float32 (autocast's policy for ``layer_norm``/``group_norm``); otherwise it has the
input's dtype.

Equivalents in the ``bcos`` package (B-cos v2): `BatchNormUncentered2d` is
``NoBias(BatchNormUncentered2d)``, `GroupNormUncentered` is ``NoBias(GroupNormUncentered2d)``,
`LayerNorm2dUncentered` is ``NoBias(PositionNormUncentered2d)``; their state dicts load strictly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .explain_mode import DetachableModule

__all__ = ['BatchNormUncentered2d', 'GroupNormUncentered', 'LayerNorm2dUncentered', 'LayerNormUncentered']


def _check_nchw(x: Tensor, layer: nn.Module, channels: int) -> None:
    """Raise a ValueError for anything but an (N, C, H, W) input with `channels` channels."""
    name = type(layer).__name__
    if x.dim() != 4:
        raise ValueError(f'{name} expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}')
    if x.shape[1] != channels:
        raise ValueError(f'{name} expects {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})')


def _stat_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _out_dtype(x: Tensor) -> torch.dtype:
    """float32 (or wider) under autocast, like autocast's norm ops; the input's dtype otherwise."""
    device = x.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return _stat_dtype(x) if autocast else x.dtype


class BatchNormUncentered2d(DetachableModule):
    """Uncentered batch norm without bias: ``y = x / sqrt(var + eps) * weight`` per channel.

    In training, ``var`` is the biased variance of the batch over (N, H, W) (centered: the
    batch mean is subtracted for the variance, not for the output), and the running variance is
    updated with that same biased variance: ``running_var = (1 - m) * running_var + m * var``
    (``m = momentum``, or ``1 / num_batches_tracked`` if `momentum` is None). In eval, the running
    variance is used, making the layer a fixed per-channel scale. Without
    `track_running_stats`, batch statistics are used in eval too.

    ``running_mean`` is never read or updated (it stays at zero, as in v2); it is kept so that
    v2 and ``nn.BatchNorm2d``-style state dicts load with the same keys. There is no ``bias``: a
    state dict with one belongs to a different (affine) layer and fails a strict load.
    """

    def __init__(
            self,
            num_features: int,
            eps: float = 1e-5,
            momentum: Optional[float] = 0.1,
            affine: bool = True,
            track_running_stats: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.empty(num_features, **dd)) if affine else None
        if track_running_stats:
            self.register_buffer('running_mean', torch.empty(num_features, **dd))
            self.register_buffer('running_var', torch.empty(num_features, **dd))
            self.register_buffer('num_batches_tracked', torch.empty((), dtype=torch.long, device=device))
        else:
            self.register_buffer('running_mean', None)
            self.register_buffer('running_var', None)
            self.register_buffer('num_batches_tracked', None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        _check_nchw(x, self, self.num_features)
        dt = _stat_dtype(x)
        if self.training or not self.track_running_stats:
            var = torch.var((x.detach() if self.detach_dynamic else x).to(dt), dim=(0, 2, 3), correction=0)
            if self.training and self.track_running_stats:
                self._update_running_var(var.detach())
        else:
            var = self.running_var.to(dt)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(dt)
        return (x.to(dt) * scale.view(1, -1, 1, 1)).to(_out_dtype(x))

    @torch.no_grad()
    def _update_running_var(self, var: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_var.copy_((1 - m) * self.running_var + m * var)

    def extra_repr(self) -> str:
        return (f'{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, '
                f'track_running_stats={self.track_running_stats}')


class _UncenteredNorm(DetachableModule):
    """What the per-sample uncentered norms share: `eps` and an optional per-channel scale (no bias)."""

    def __init__(self, num_channels: int, eps: float, affine: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype)) if affine else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)


class GroupNormUncentered(_UncenteredNorm):
    """Uncentered group norm without bias: ``y = x / sqrt(var_g + eps) * weight``.

    ``var_g`` is the biased variance of each sample's channel group over (C // G, H, W); there are
    no running statistics, so train and eval behave the same. ``num_groups=1`` normalises each
    sample over all of (C, H, W); ``num_groups=num_channels`` is an uncentered instance norm.
    """

    def __init__(
            self,
            num_groups: int,
            num_channels: int,
            eps: float = 1e-5,
            affine: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f'num_channels ({num_channels}) must be divisible by num_groups ({num_groups})')
        super().__init__(num_channels, eps, affine, device, dtype)
        self.num_groups = num_groups

    def forward(self, x: Tensor) -> Tensor:
        _check_nchw(x, self, self.num_channels)
        dt = _stat_dtype(x)
        n, c = x.shape[:2]
        groups = (x.detach() if self.detach_dynamic else x).to(dt).reshape(n, self.num_groups, -1)
        scale = torch.rsqrt(torch.var(groups, dim=2, correction=0) + self.eps)  # (N, G)
        scale = scale.repeat_interleave(c // self.num_groups, dim=1)  # (N, C)
        if self.weight is not None:
            scale = scale * self.weight.to(dt)
        return (x.to(dt) * scale.view(n, c, 1, 1)).to(_out_dtype(x))

    def extra_repr(self) -> str:
        return f'{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}'


class LayerNorm2dUncentered(_UncenteredNorm):
    """Uncentered layer norm over channels of NCHW (v2's position norm), without bias.

    ``y = x / sqrt(var_c + eps) * weight`` with ``var_c`` the biased variance over the channels
    at each spatial position of each sample (what timm's ``LayerNorm2d`` normalises over).
    """

    def __init__(
            self,
            num_channels: int,
            eps: float = 1e-6,
            affine: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(num_channels, eps, affine, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        _check_nchw(x, self, self.num_channels)
        return self._normalise(x, 1)

    def _normalise(self, x: Tensor, dim: int) -> Tensor:
        """``x / sqrt(var + eps) * weight`` with the variance (and the weight) along `dim`."""
        dt = _stat_dtype(x)
        var = torch.var((x.detach() if self.detach_dynamic else x).to(dt), dim=dim, correction=0, keepdim=True)
        y = x.to(dt) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(dt).view([-1 if d == dim % x.dim() else 1 for d in range(x.dim())])
        return y.to(_out_dtype(x))

    def extra_repr(self) -> str:
        return f'{self.num_channels}, eps={self.eps}, affine={self.affine}'


class LayerNormUncentered(LayerNorm2dUncentered):
    """Uncentered layer norm over the last dimension (channels-last features, tokens), without bias.

    ``y = x / sqrt(var + eps) * weight`` with ``var`` the biased variance over the last dimension:
    `LayerNorm2dUncentered` for channels-last inputs (timm's ``nn.LayerNorm`` blocks).
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.num_channels:
            raise ValueError(f'{type(self).__name__} expects {self.num_channels} features in the last dimension, '
                             f'got shape {tuple(x.shape)}')
        return self._normalise(x, -1)

"""The B-cos input encoding [r, g, b, 1-r, 1-g, 1-b] (paper §4, "Image encoding")."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ['AddInverse', 'add_inverse']


def add_inverse(x: Tensor, dim: int = 1) -> Tensor:
    """The encoding ``[x, 1 - x]`` along `dim` (§4), without `AddInverse`'s range check (for batches
    known to be images in [0, 1], e.g. from the package's datasets)."""
    return torch.cat([x, 1 - x], dim=dim)


class AddInverse(nn.Module):
    """Concatenate ``x`` and ``1 - x`` along `dim`.

    Colours with the same angle in RGB get distinct angles, and black pixels a non-zero norm, so
    every pixel can contribute to a B-cos network's output (§4). The encoding is defined on
    [0, 1]: values outside it by more than `atol`, NaN or inf raise a `ValueError` (an image
    normalised with a mean/std is the usual mistake).
    """

    def __init__(self, dim: int = 1, atol: float = 1e-3) -> None:
        super().__init__()
        self.dim = dim
        self.atol = atol

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f'AddInverse expects a floating point tensor in [0, 1], got '
                            f'{getattr(x, "dtype", type(x).__name__)}')
        if x.numel():
            lo, hi = torch.aminmax(x.detach())
            lo, hi = lo.item(), hi.item()
            if not (lo >= -self.atol and hi <= 1 + self.atol):
                finite = math.isfinite(lo) and math.isfinite(hi)
                what = f'values in [{lo:.4g}, {hi:.4g}]' if finite else 'NaN or inf values'
                raise ValueError(
                    f'AddInverse expects images with values in [0, 1] (the B-cos encoding [x, 1-x] of '
                    f'paper §4), got {what}. Do not normalise with a mean/std: B-cos models take '
                    f'unnormalised images.')
        return add_inverse(x, self.dim)

    def extra_repr(self) -> str:
        return f'dim={self.dim}'

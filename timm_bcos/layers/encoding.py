"""The B-cos input encoding [r, g, b, 1-r, 1-g, 1-b] (paper §4, "Image encoding")."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ['AddInverse', 'InputShift', 'add_inverse']


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


class InputShift(nn.Module):
    """``x - shift`` per channel: the image mean of a pretrained model, in the [x, 1-x] encoding.

    Used only by B-cosification's function-preserving B=1 form (`timm_bcos.bcosify`), in front of
    the stem: zero padding of the shifted input is then the original model's zero padding of its
    normalised input, so the form computes exactly the original logits. It is a constant offset,
    removed with the other biases in the B-cos form.
    """

    def __init__(self, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer('shift', shift.detach().clone().view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x - self.shift.to(x.dtype)

    def extra_repr(self) -> str:
        return f'channels={self.shift.shape[1]}'

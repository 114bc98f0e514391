"""The order of MaxOut units in a B-cos weight: ours (each unit a contiguous block of output
channels, `bcos_function`) and the reference implementations' (B-cos v1/v2: partners adjacent)."""
from __future__ import annotations

from torch import Tensor

__all__ = ['from_reference_layout', 'to_reference_layout']


def from_reference_layout(weight: Tensor, max_out: int, groups: int = 1) -> Tensor:
    """Reorder MaxOut units from the reference layout (row ``o * M + m``, B-cos v1/v2) to ours.

    Ours is (group, unit, output): row ``g * M * Og + m * Og + o'``, so the MaxOut partners are
    contiguous channel blocks of the convolution output. Identity for ``max_out == 1``.
    """
    if max_out == 1:
        return weight
    return weight.view(groups, -1, max_out, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def to_reference_layout(weight: Tensor, max_out: int, groups: int = 1) -> Tensor:
    """Inverse of `from_reference_layout`."""
    if max_out == 1:
        return weight
    return weight.view(groups, max_out, -1, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)

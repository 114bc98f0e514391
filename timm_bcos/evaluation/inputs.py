"""What the evaluation needs to know about a model's input: B-cos or not, its device, encoding and size."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..layers import add_inverse

__all__ = ['encode_input', 'input_size', 'is_bcos', 'model_device', 'stack_items']


def is_bcos(model: nn.Module) -> bool:
    """A B-cos network (it has a ``bcos_cfg``): its inputs are 6-channel [x, 1-x] encodings."""
    return getattr(model, 'bcos_cfg', None) is not None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device('cpu')


def encode_input(model: nn.Module, x: Tensor) -> Tensor:
    """The model's input: [x, 1-x] for B-cos models (6 input channels, paper §4), x otherwise."""
    return add_inverse(x) if is_bcos(model) else x


def input_size(model: nn.Module) -> Optional[int]:
    """The image size of the model's ``pretrained_cfg`` (None if it has none)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    size = cfg.get('input_size')
    return int(size[-1]) if size else None


def stack_items(dataset, idx: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Images (N, 3, H, W) and labels (N,) of the dataset items at `idx`."""
    items = [dataset[int(i)] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])

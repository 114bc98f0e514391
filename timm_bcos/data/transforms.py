"""Image pipeline for B-cos models: timm's transform to [0, 1] images, then the 6-channel encoding."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..layers import AddInverse

__all__ = ['create_transform', 'load_images']


def create_transform(model: nn.Module, is_training: bool = False, **overrides: Any):
    """timm's data config and transform for `model` (resize, crop, augmentation, to [0, 1] tensor),
    followed by the [x, 1-x] encoding (§4): PIL image -> (6, H, W) tensor the model takes."""
    import timm.data
    from torchvision import transforms

    # The encoding replaces any normalisation; timm's save_for_hf widens a one-value mean/std to the
    # model's 6 channels, which its Normalize cannot apply to 3-channel images.
    overrides = {'mean': (0.0,), 'std': (1.0,), **overrides}
    config = timm.data.resolve_data_config(overrides, model=model)
    return transforms.Compose([timm.data.create_transform(**config, is_training=is_training), AddInverse(dim=0)])


def load_images(model: nn.Module, paths: Sequence[str]) -> torch.Tensor:
    """Image files through `create_transform(model)`, stacked: (N, 6, H, W) for a B-cos model."""
    from PIL import Image

    transform = create_transform(model)
    batch = []
    for path in paths:
        with Image.open(path) as image:
            batch.append(transform(image.convert('RGB')))
    return torch.stack(batch)

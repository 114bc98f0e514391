"""Image pipeline for B-cos models: timm's transform to [0, 1] images, then the 6-channel encoding."""
from __future__ import annotations

import os
from typing import Any, Sequence, Union

import torch
from torch import nn

from ..layers import AddInverse

__all__ = ['create_transform', 'load_images', 'open_image']


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


def open_image(path: Union[str, os.PathLike]):
    """An image file as an 8-bit RGB PIL image, whatever its mode, or a `ValueError` naming the file.

    16-bit images (``I;16``, ``I``: PNG, TIFF) are scaled from their 0-65535 range, not clipped to
    white; float images (``F``) must hold values in [0, 1]; transparency (RGBA, LA, palette images
    with a transparent colour) is composited over black, the background of the shipped data; CMYK
    and the other modes are converted by PIL.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
                a = np.asarray(im, dtype=np.float64)
                top = 1.0 if im.mode == 'F' else 65535.0
                if a.min() < 0 or a.max() > top:
                    raise ValueError(f'{im.mode} pixel values in [{a.min():g}, {a.max():g}], expected [0, {top:g}]')
                return Image.fromarray(np.round(a / top * 255).astype(np.uint8)).convert('RGB')
            if im.mode == 'P' and 'transparency' in im.info:
                im = im.convert('RGBA')
            if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
                rgba = im.convert('RGBA')
                background = Image.new('RGBA', rgba.size, (0, 0, 0, 255))
                return Image.alpha_composite(background, rgba).convert('RGB')
            return im.convert('RGB')
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnidentifiedImageError) as e:
        raise ValueError(f'{path}: cannot read the image ({type(e).__name__}: {e})') from e


def load_images(model: nn.Module, paths: Sequence[Union[str, os.PathLike]]) -> torch.Tensor:
    """Image files (`open_image`) through `create_transform(model)`, stacked: (N, 6, H, W) for a B-cos model."""
    transform = create_transform(model)
    return torch.stack([transform(open_image(path)) for path in paths])

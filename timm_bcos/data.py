"""Small built-in image datasets as tensors of 3-channel images in [0, 1]."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ['demo_images', 'load_digits']


def load_digits(size: int = 16, test_size: int = 297) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), upsampled to `size` px.

    Grey values are repeated to 3 channels. Returns ``(x_train, y_train, x_test, y_test)``; the
    last `test_size` images are the test set (a fixed split, no download).
    """
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:
        raise ImportError("the 'digits' dataset ships with scikit-learn: pip install scikit-learn") from e

    digits = _load()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=size, mode='bilinear', align_corners=False).clamp_(0, 1).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target, dtype=torch.long)
    return x[:-test_size], y[:-test_size], x[-test_size:], y[-test_size:]


def demo_images() -> List[str]:
    """Paths of the example images shipped in the package (``timm_bcos/pretrained/images``)."""
    import glob
    import os

    folder = os.path.join(os.path.dirname(__file__), 'pretrained', 'images')
    return sorted(glob.glob(os.path.join(folder, '*.png')))

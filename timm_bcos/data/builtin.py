"""The data that ships with the package or the system: scikit-learn's digits, Fashion-MNIST (Debian's
``dataset-fashion-mnist``) and the example images of the shipped model. Images are in [0, 1]."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import ASSETS

__all__ = ['BUILTIN_CLASSES', 'DIGITS_CLASSES', 'FASHION_MNIST_CLASSES', 'FASHION_MNIST_DIR', 'demo_images',
           'example_images', 'load_digits', 'load_fashion_mnist']

#: Where Debian's ``dataset-fashion-mnist`` installs the gzip idx files; ``TIMM_BCOS_FASHION_MNIST``
#: overrides it (a folder with the same four files, e.g. downloaded from the Fashion-MNIST repository).
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                         'Bag', 'Ankle boot')
DIGITS_CLASSES = tuple(str(i) for i in range(10))
#: The built-in data sources by name (`timm_bcos.data.build_datasets`) and their class names.
BUILTIN_CLASSES = {'digits': DIGITS_CLASSES, 'fashion-mnist': FASHION_MNIST_CLASSES}
_FASHION_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz',
                  't10k-labels-idx1-ubyte.gz')


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


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format): magic 0x00000800 + dtype code (8: uint8) + ndim, then the dims."""
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise RuntimeError(f'{path}: cannot read ({e}); reinstall it: apt-get install --reinstall '
                           f'dataset-fashion-mnist') from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise RuntimeError(f'{path}: not a uint8 idx file')
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], 'big') for k in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise RuntimeError(f'{path}: truncated ({len(data) - offset} bytes for shape {dims})')
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims)


def _resize_uint8(x: np.ndarray, size: int, chunk: int = 10000) -> Tensor:
    """(N, H, W) uint8 -> (N, 1, size, size) uint8, bilinear (no resize when the size matches)."""
    t = torch.from_numpy(x.copy()).unsqueeze(1)
    if t.shape[-1] == size and t.shape[-2] == size:
        return t
    out = torch.empty((len(t), 1, size, size), dtype=torch.uint8)
    for s in range(0, len(t), chunk):
        r = F.interpolate(t[s:s + chunk].float(), size=(size, size), mode='bilinear', align_corners=False)
        out[s:s + chunk] = r.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_fashion_mnist(size: int = 32, root: Union[str, Path, None] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fashion-MNIST (60k train, 10k test, 10 classes) as ``(x_train, y_train, x_test, y_test)``.

    Images are (N, 1, size, size) uint8, bilinearly resized from 28x28 (grey: `TensorImageDataset`
    repeats them to 3 channels). Read from `root`, ``$TIMM_BCOS_FASHION_MNIST`` or
    `FASHION_MNIST_DIR` (Debian: ``apt-get install dataset-fashion-mnist``).
    """
    root = Path(root or os.environ.get('TIMM_BCOS_FASHION_MNIST') or FASHION_MNIST_DIR)
    missing = [f for f in _FASHION_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f'Fashion-MNIST not found: {root} lacks {", ".join(missing)}. Install it with '
            f'`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four files '
            f'{", ".join(_FASHION_FILES)} into a folder and set TIMM_BCOS_FASHION_MNIST to it.')
    xtr, ytr, xte, yte = (_read_idx(root / f) for f in _FASHION_FILES)
    if xtr.shape[1:] != (28, 28) or len(xtr) != len(ytr) or len(xte) != len(yte):
        raise RuntimeError(f'{root}: unexpected Fashion-MNIST shapes {xtr.shape}, {ytr.shape}, {xte.shape}, '
                           f'{yte.shape}')
    return (_resize_uint8(xtr, size), torch.from_numpy(ytr.astype(np.int64)),
            _resize_uint8(xte, size), torch.from_numpy(yte.astype(np.int64)))


def example_images(label_names: Optional[Sequence[str]], folder: Union[str, Path], n: int = 2) -> List[str]:
    """Example images for a model of these classes: the shipped Fashion-MNIST images, or the first
    `n` test digits written as PNGs into `folder`; none for other classes."""
    if label_names is not None and tuple(label_names) == FASHION_MNIST_CLASSES:
        return demo_images()[:n]
    if label_names is not None and tuple(label_names) == DIGITS_CLASSES:
        from PIL import Image

        x = load_digits(size=32)[2][:n]
        paths = [os.path.join(folder, f'digit_{i}.png') for i in range(len(x))]
        for image, path in zip(x, paths):
            Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        return paths
    return []


def demo_images() -> List[str]:
    """Paths of the example images shipped in the package (``timm_bcos/assets/images``): Fashion-MNIST
    test images named ``NN_<class>.png``."""
    return sorted(str(p) for p in (ASSETS / 'images').glob('*.png'))

"""Datasets for training and evaluation: digits, Fashion-MNIST and image folders, with a seeded sampler.

Every dataset yields ``(image, label)`` with a 3-channel float image in [0, 1]; the trainer adds the
B-cos encoding [x, 1-x] on the batch when the model takes 6 channels.

Determinism: `SeededSampler` draws the order of epoch ``e`` and one augmentation seed per sample
from ``(seed, e)`` alone, and the datasets augment sample ``i`` with its own seed. The batches of an
epoch therefore do not depend on the number of processes, data-loader workers or on whether the
run was resumed.
"""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from .builtin import BUILTIN_CLASSES, DIGITS_CLASSES, FASHION_MNIST_CLASSES, load_digits, load_fashion_mnist
from .transforms import open_image

__all__ = ['IMAGE_EXTENSIONS', 'DataSplits', 'ImageFolderDataset', 'KeyedSubset', 'SeededSampler', 'TensorImageDataset',
           'build_datasets', 'count_classes']

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')

Key = Union[int, Tuple[int, int]]  # a sample index, or (index, augmentation seed)


class SeededSampler(Sampler):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``; call `set_epoch` first.

    Yields ``(index, augmentation_seed)`` pairs. With ``shuffle=False`` it yields plain indices in
    order (evaluation). Under `accelerate` the batches built from it are split across processes
    (``split_batches=True``), so every process count sees the same global batches.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def keys(self, epoch: Optional[int] = None) -> List[Key]:
        """The keys of one epoch (default: the current one)."""
        if not self.shuffle:
            return list(range(self.n))
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed & (2 ** 63 - 1), epoch])
                                              .generate_state(1, np.uint64)[0] >> 2))
        order = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(0, 2 ** 62, (self.n,), generator=g).tolist()
        return list(zip(order, seeds))

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    def __len__(self) -> int:
        return self.n


def _split_key(key: Key) -> Tuple[int, Optional[int]]:
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), None


class KeyedSubset(Dataset):
    """The samples `indices` of `dataset`, passing augmentation seeds through (unlike torch's Subset)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.classes = getattr(dataset, 'classes', None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Key):
        i, seed = _split_key(key)
        j = self.indices[i]
        return self.dataset[j if seed is None else (j, seed)]


class TensorImageDataset(Dataset):
    """Images held in memory: (N, C, H, W) uint8 (0-255) or float (0-1) tensors, C = 1 or 3.

    Grey images are repeated to 3 channels when read. With a seed in the key (training), applies a
    random crop after zero padding by `pad` pixels and, with `flip`, a horizontal flip.
    """

    def __init__(self, images: Tensor, labels: Tensor, pad: int = 0, flip: bool = False,
                 classes: Optional[Sequence[str]] = None) -> None:
        if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) != len(labels):
            raise ValueError(f'expected (N, 1|3, H, W) images and N labels, got {tuple(images.shape)} and '
                             f'{tuple(labels.shape)}')
        self.images = images
        self.labels = labels.long()
        self.pad = pad
        self.flip = flip
        self.classes = list(classes) if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Key) -> Tuple[Tensor, int]:
        i, seed = _split_key(key)
        x = self.images[i]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if seed is not None and (self.pad or self.flip):
            rng = random.Random(seed)
            if self.pad:
                h, w = x.shape[-2:]
                dy, dx = rng.randint(0, 2 * self.pad), rng.randint(0, 2 * self.pad)
                x = F.pad(x, (self.pad,) * 4)[:, dy:dy + h, dx:dx + w]
            if self.flip and rng.random() < 0.5:
                x = x.flip(-1)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return x.contiguous(), int(self.labels[i])


def _find_images(folder: Path) -> Tuple[List[str], List[Tuple[str, int]]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith('.'))
    if not classes:
        raise FileNotFoundError(f'{folder}: no class subfolders (expected {folder}/<class>/<image>)')
    samples = []
    for c, name in enumerate(classes):
        found = [(os.path.join(root, f), c) for root, _, files in sorted(os.walk(folder / name, followlinks=True))
                 for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise ValueError(f'{folder / name}: a class folder without images (extensions '
                             f'{", ".join(IMAGE_EXTENSIONS)}): remove it or add its images')
        samples += found
    return classes, samples


class ImageFolderDataset(Dataset):
    """``root/<class>/**/<image>`` read with `open_image` (RGB) and a torchvision-style `transform`.

    A key with a seed (training) runs the transform under ``random``/``numpy``/``torch`` seeded by
    it, restoring the global random states afterwards, so augmentations are reproducible. A file
    that cannot be read (corrupt, truncated) is skipped with a warning naming it: its sample is the
    next readable image, and training goes on.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str],
                 transform: Optional[Callable] = None) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform

    @classmethod
    def from_folder(cls, folder: Union[str, Path], transform: Optional[Callable] = None) -> 'ImageFolderDataset':
        classes, samples = _find_images(Path(folder))
        return cls(samples, classes, transform)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, i: int):
        for j in range(len(self.samples)):
            path, label = self.samples[(i + j) % len(self.samples)]
            try:
                return open_image(path), label
            except ValueError as e:  # unreadable (a missing file is an error)
                warnings.warn(f'{e}: skipped; sample {i} is the next readable image', stacklevel=3)
        raise ValueError(f'none of the {len(self.samples)} images of this dataset can be read')

    def __getitem__(self, key: Key) -> Tuple[Tensor, int]:
        i, seed = _split_key(key)
        img, label = self._read(i)
        if self.transform is None:
            return img, label
        if seed is None:
            return self.transform(img), label
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed % 2 ** 32)
                torch.manual_seed(seed)
                return self.transform(img), label
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class DataSplits:
    """The train and test datasets, the class names and what was used (for the results file)."""

    def __init__(self, train: Dataset, test: Dataset, classes: Sequence[str], description: str) -> None:
        self.train, self.test, self.classes, self.description = train, test, list(classes), description

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def limit_train(self, n: int, seed: int = 0) -> None:
        """Keep a fixed random subset of `n` training images (smoke tests, quick recipes)."""
        if n < len(self.train):
            keep = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:n]
            self.train = KeyedSubset(self.train, sorted(keep.tolist()))
            self.description += f' (training on a fixed random subset of {n})'


def _image_folder_splits(path: Path, img_size: int, augment: bool, auto_augment: Optional[str],
                         interpolation: str, crop_pct: float, seed: int, val_fraction: float) -> DataSplits:
    import timm.data

    common = dict(input_size=(3, img_size, img_size), interpolation=interpolation, mean=(0.0,) * 3, std=(1.0,) * 3)
    if augment:
        train_tf = timm.data.create_transform(**common, is_training=True, auto_augment=auto_augment)
    else:
        train_tf = timm.data.create_transform(**common, is_training=False, crop_pct=crop_pct)
    test_tf = timm.data.create_transform(**common, is_training=False, crop_pct=crop_pct)
    train_dir = path / 'train'
    test_dir = next((path / d for d in ('val', 'validation', 'test') if (path / d).is_dir()), None)
    if train_dir.is_dir() and test_dir is not None:
        classes, train_samples = _find_images(train_dir)
        test_classes, test_samples = _find_images(test_dir)
        if test_classes != classes:
            raise ValueError(f'{test_dir} has classes {test_classes[:10]}, {train_dir} has {classes[:10]}: '
                             f'they must be the same folder names')
        how = f'{train_dir} / {test_dir}'
    else:
        # One folder: hold out `val_fraction` of each class (a fixed, seeded choice).
        classes, samples = _find_images(path)
        rng = random.Random(seed)
        train_samples, test_samples = [], []
        for c in range(len(classes)):
            items = [s for s in samples if s[1] == c]
            rng.shuffle(items)
            k = int(round(len(items) * val_fraction)) if len(items) > 1 else 0
            test_samples += items[:k]
            train_samples += items[k:]
        if not test_samples:
            raise ValueError(f'{path}: too few images to hold out a test split')
        how = f'{path} (held out {val_fraction:.0%} per class as the test split, seed {seed})'
    return DataSplits(ImageFolderDataset(train_samples, classes, train_tf),
                      ImageFolderDataset(test_samples, classes, test_tf), classes,
                      f'image folder {how}: {len(train_samples)} train / {len(test_samples)} test images')


def count_classes(data: str) -> int:
    """The class count of a data source, without reading its images."""
    if data in BUILTIN_CLASSES:
        return len(BUILTIN_CLASSES[data])
    path = Path(data).expanduser()
    if not path.is_dir():
        raise ValueError(f"data must be 'digits', 'fashion-mnist' or a folder of class subfolders; {data!r} is "
                         f"none of these")
    folder = path / 'train' if (path / 'train').is_dir() and any(
        (path / d).is_dir() for d in ('val', 'validation', 'test')) else path
    return sum(1 for d in folder.iterdir() if d.is_dir() and not d.name.startswith('.'))


def build_datasets(data: str, img_size: int, augment: bool = True, auto_augment: Optional[str] = None,
                   interpolation: str = 'bilinear', crop_pct: float = 1.0, seed: int = 0,
                   val_fraction: float = 0.1) -> DataSplits:
    """The train/test datasets for `data`: ``'digits'``, ``'fashion-mnist'`` or an image folder path.

    - ``digits``: scikit-learn's 8x8 digits upsampled to `img_size`; augmentation: random crop
      after padding by img_size/8 (no flip: digits are not mirror-symmetric).
    - ``fashion-mnist``: 28x28 grey resized to `img_size`; random crop (padding img_size/8) + flip.
    - a folder: ``train/`` and ``val/`` (or ``validation/``, ``test/``) with class subfolders, or
      just class subfolders (a seeded `val_fraction` per class becomes the test split); timm's
      training transform (RandomResizedCrop, flip, colour jitter; `auto_augment` such as
      ``'rand-m9-mstd0.5'``) and its eval transform (resize + centre crop by `crop_pct`).
    """
    pad = max(1, img_size // 8) if augment else 0
    if data == 'digits':
        xtr, ytr, xte, yte = load_digits(size=img_size)
        return DataSplits(TensorImageDataset(xtr, ytr, pad=pad, classes=DIGITS_CLASSES),
                          TensorImageDataset(xte, yte, classes=DIGITS_CLASSES), DIGITS_CLASSES,
                          f'scikit-learn digits at {img_size} px: {len(xtr)} train / {len(xte)} test images')
    if data == 'fashion-mnist':
        xtr, ytr, xte, yte = load_fashion_mnist(img_size)
        return DataSplits(TensorImageDataset(xtr, ytr, pad=pad, flip=augment, classes=FASHION_MNIST_CLASSES),
                          TensorImageDataset(xte, yte, classes=FASHION_MNIST_CLASSES), FASHION_MNIST_CLASSES,
                          f'Fashion-MNIST at {img_size} px: {len(xtr)} train / {len(xte)} test images')
    path = Path(data).expanduser()
    if path.is_dir():
        return _image_folder_splits(path, img_size, augment, auto_augment, interpolation, crop_pct, seed,
                                    val_fraction)
    raise ValueError(f"data must be 'digits', 'fashion-mnist' or a folder of class subfolders; {data!r} is none "
                     f"of these")

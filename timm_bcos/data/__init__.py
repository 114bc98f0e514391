"""Data: built-in datasets (digits, Fashion-MNIST, the shipped example images), image folders with a
seeded sampler, and the image pipeline to the B-cos input encoding."""
from .builtin import (BUILTIN_CLASSES, DIGITS_CLASSES, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, demo_images,
                      example_images, load_digits, load_fashion_mnist)
from .datasets import (IMAGE_EXTENSIONS, DataSplits, ImageFolderDataset, KeyedSubset, SeededSampler,
                       TensorImageDataset, build_datasets, count_classes)
from .transforms import create_transform, load_images, open_image

__all__ = [
    'BUILTIN_CLASSES', 'DIGITS_CLASSES', 'FASHION_MNIST_CLASSES', 'FASHION_MNIST_DIR', 'IMAGE_EXTENSIONS', 'DataSplits',
    'ImageFolderDataset', 'KeyedSubset', 'SeededSampler', 'TensorImageDataset', 'build_datasets', 'count_classes',
    'create_transform', 'demo_images', 'example_images', 'load_digits', 'load_fashion_mnist', 'load_images',
    'open_image',
]

"""Offline datasets with one class-discriminative patch per image (nothing is ever downloaded).

    train, test = pmoe.data.make_dataset("digits-patch", n_train=500, n_test=1000, seed=0)
    train.x (N, 1, 32, 32), train.y (N,) in {0, 1}, train.signal_index (N,), train.patches() (N, 16, 64)

Names: synthetic (the paper's data model), digits-patch (sklearn's 8x8 digits), mnist-patch,
cifar10, cifar10-patch (from local files, see `pmoe.data.files`).
"""
from .base import PatchDataset, Spurious, TileHook, box_marker, compose_tiles, image_to_patches, tiles_to_images
from .digits import digits_pool_split, load_sklearn_digits, make_digits_patch
from .files import FileFormatError, load_cifar10, load_mnist, read_cifar_batch, read_idx
from .registry import DATASETS, make_dataset
from .synthetic import make_synthetic
from .vision import make_cifar10, make_cifar10_patch, make_mnist_patch

__all__ = [
    "DATASETS", "FileFormatError", "PatchDataset", "Spurious", "TileHook", "box_marker", "compose_tiles",
    "digits_pool_split", "image_to_patches", "load_cifar10", "load_mnist", "load_sklearn_digits", "make_cifar10",
    "make_cifar10_patch", "make_dataset", "make_digits_patch", "make_mnist_patch", "make_synthetic",
    "read_cifar_batch", "read_idx", "tiles_to_images",
]

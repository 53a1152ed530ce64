"""MNIST and CIFAR-10 datasets read from a local directory (see `pmoe.data.files` for the paths).

mnist-patch: the authors' binary MNIST construction -- 112x112 images, a 4x4 grid of 28x28 digit
tiles (n = 16, p = 28); train tiles come from MNIST's training files, test tiles from its test
files, so the two splits never share a digit image.
cifar10: plain CIFAR-10 (10 classes, 3x32x32, per-channel standardised), the data of the
authors' Wide-ResNet experiment; no discriminative patch (signal_index = -1).
cifar10-patch: the digit-tile construction with CIFAR-10 objects as tiles (4x4 grid of 32x32
tiles, 3x128x128 images, p = 32).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .base import PatchDataset, Spurious, TileHook, box_marker, check_count, compose_tiles
from .digits import _check_digits, compose_digit_tiles
from .files import PathLike, load_cifar10, load_mnist

# the usual CIFAR-10 training-set channel statistics (of pixel / 255)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _need_dir(data_dir: Optional[PathLike], name: str) -> PathLike:
    if data_dir is None:
        raise ValueError(f"{name} is read from local files: pass data_dir (the CLI's --data-dir)")
    return data_dir


def make_mnist_patch(
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    data_dir: Optional[PathLike] = None,
    classes: Sequence[int] = (0, 1),
    distractors: Optional[Sequence[int]] = None,
    grid: tuple[int, int] = (4, 4),
    spurious: Optional[Spurious] = None,
    test_spurious: Optional[Spurious] = None,
    hook: Optional[TileHook] = None,
) -> tuple[PatchDataset, PatchDataset]:
    """Binary MNIST digit-tile task: (N, 1, 112, 112) images for the default grid, p = 28.
    Arguments as `pmoe.data.digits.make_digits_patch`."""
    n_train, n_test = check_count("n_train", n_train), check_count("n_test", n_test)
    classes, distractors = _check_digits(classes, distractors)
    data_dir = _need_dir(data_dir, "mnist-patch")
    _, train_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
    out = []
    for train, ss, n_samples, spur in ((True, train_ss, n_train, spurious), (False, test_ss, n_test, test_spurious)):
        images, labels = load_mnist(data_dir, train)
        out.append(compose_digit_tiles((images / 255.0).astype(np.float32), labels, n_samples,
                                       np.random.default_rng(ss), classes, distractors, grid, spur, hook))
    return out[0], out[1]


def _subset(images: np.ndarray, labels: np.ndarray, count: Optional[int], rng: np.random.Generator):
    if count is None:
        return images, labels
    if count > len(images):
        raise ValueError(f"asked for {count} samples, the files hold {len(images)}")
    idx = np.sort(rng.choice(len(images), count, replace=False))
    return images[idx], labels[idx]


def make_cifar10(
    n_train: Optional[int],
    n_test: Optional[int],
    seed: int = 0,
    *,
    data_dir: Optional[PathLike] = None,
) -> tuple[PatchDataset, PatchDataset]:
    """Plain 10-class CIFAR-10, (N, 3, 32, 32) float32 standardised per channel; a random subset
    of n_train / n_test images (None: all 50000 / 10000).  signal_index is -1 (no planted patch)."""
    data_dir = _need_dir(data_dir, "cifar10")
    _, train_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
    mean = np.array(CIFAR10_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(CIFAR10_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    out = []
    for train, ss, count in ((True, train_ss, n_train), (False, test_ss, n_test)):
        if count is not None:
            count = check_count("n_train" if train else "n_test", count)
        images, labels = _subset(*load_cifar10(data_dir, train), count, np.random.default_rng(ss))
        x = (images.astype(np.float32) / 255.0 - mean) / std
        out.append(PatchDataset(torch.from_numpy(x), torch.from_numpy(labels),
                                torch.full((len(labels),), -1, dtype=torch.int64), patch_size=1, num_classes=10))
    return out[0], out[1]


def make_cifar10_patch(
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    data_dir: Optional[PathLike] = None,
    classes: Sequence[int] = (0, 1),
    distractors: Optional[Sequence[int]] = None,
    grid: tuple[int, int] = (4, 4),
    spurious: Optional[Spurious] = None,
    test_spurious: Optional[Spurious] = None,
    hook: Optional[TileHook] = None,
) -> tuple[PatchDataset, PatchDataset]:
    """Binary CIFAR-10 object-tile task: (N, 3, 128, 128) images in [0, 1], p = 32; classes and
    distractors are CIFAR-10 class ids (default airplane vs automobile, the other 8 as
    distractors).  Train tiles from the training batches, test tiles from the test batch.
    A Spurious marker and a hook see uint8 tiles (pixel units 0..255): the images are scaled
    to [0, 1] after composition."""
    n_train, n_test = check_count("n_train", n_train), check_count("n_test", n_test)
    classes, distractors = _check_digits(classes, distractors)  # also ids in 0..9
    data_dir = _need_dir(data_dir, "cifar10-patch")
    _, train_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
    out = []
    for train, ss, n_samples, spur in ((True, train_ss, n_train, spurious), (False, test_ss, n_test, test_spurious)):
        # compose in uint8 (the float32 copy of all 50000 images would be 600 MB), scale after
        tiles, labels = load_cifar10(data_dir, train)
        class_tiles = [tiles[labels == c] for c in classes]
        distractor_tiles = tiles[np.isin(labels, distractors)]
        ds = compose_tiles(class_tiles, distractor_tiles, n_samples, grid, np.random.default_rng(ss),
                           spur, box_marker(3, tiles.shape[-1], 255.0), hook)
        ds.x /= 255.0
        out.append(ds)
    return out[0], out[1]

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

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .base import PatchDataset, Spurious, TileHook, box_marker, check_count, compose_tiles
from .digits import _check_digits
from .files import PathLike, load_cifar10, load_mnist

# the usual CIFAR-10 training-set channel statistics (of pixel / 255)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _need_dir(data_dir: Optional[PathLike], name: str) -> PathLike:
    if data_dir is None:
        raise ValueError(f"{name} is read from local files: pass data_dir (the CLI's --data-dir)")
    return data_dir


def _split_pools(load: Callable, data_dir: PathLike, seed: int):
    """For the train files, then the test files: (images, labels, rng), each split with its own
    generator derived from `seed` (the same streams for every file dataset)."""
    _, train_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
    for train, ss in ((True, train_ss), (False, test_ss)):
        yield (*load(data_dir, train), np.random.default_rng(ss))


def _tile_task(name: str, load: Callable, n_train: int, n_test: int, seed: int, data_dir: Optional[PathLike],
               classes: Sequence[int], distractors: Optional[Sequence[int]], grid: tuple[int, int],
               spurious: Optional[Spurious], test_spurious: Optional[Spurious],
               hook: Optional[TileHook]) -> tuple[PatchDataset, PatchDataset]:
    """The digit-tile construction on uint8 tiles read by `load(data_dir, train)` ((M, p, p) or
    (M, C, p, p) images and their 0..9 labels): composed in pixel units 0..255 (a float32 copy of
    the pool would be 190 MB for MNIST, 600 MB for CIFAR-10), scaled to [0, 1] after."""
    n_train, n_test = check_count("n_train", n_train), check_count("n_test", n_test)
    classes, distractors = _check_digits(classes, distractors)  # also ids in 0..9
    data_dir = _need_dir(data_dir, name)
    out = []
    for (tiles, labels, rng), n_samples, spur in zip(_split_pools(load, data_dir, seed), (n_train, n_test),
                                                     (spurious, test_spurious)):
        tiles = tiles[:, None] if tiles.ndim == 3 else tiles
        ds = compose_tiles([tiles[labels == c] for c in classes], tiles[np.isin(labels, distractors)], n_samples,
                           grid, rng, spur, box_marker(tiles.shape[1], tiles.shape[-1], 255.0), hook)
        ds.x /= 255.0
        out.append(ds)
    return out[0], out[1]


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
    """Binary MNIST digit-tile task: (N, 1, 112, 112) images in [0, 1] for the default grid, p = 28.
    Arguments as `pmoe.data.digits.make_digits_patch`, except that a Spurious marker and a hook
    see uint8 tiles (pixel units 0..255): the images are scaled to [0, 1] after composition."""
    return _tile_task("mnist-patch", load_mnist, n_train, n_test, seed, data_dir, classes, distractors, grid,
                      spurious, test_spurious, hook)


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
    counts = [None if c is None else check_count(name, c) for c, name in ((n_train, "n_train"), (n_test, "n_test"))]
    data_dir = _need_dir(data_dir, "cifar10")
    mean = np.array(CIFAR10_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(CIFAR10_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    out = []
    for (images, labels, rng), count in zip(_split_pools(load_cifar10, data_dir, seed), counts):
        images, labels = _subset(images, labels, count, rng)
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
    return _tile_task("cifar10-patch", load_cifar10, n_train, n_test, seed, data_dir, classes, distractors, grid,
                      spurious, test_spurious, hook)

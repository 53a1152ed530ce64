"""Digit-tile images (the paper's MNIST construction) from any pool of labelled digit images.

An image is a grid of digit tiles: one shows one of two class digits at a uniformly random cell,
the others show distractor digits.  The train and test splits draw their tiles from disjoint
sets of digit images.  `make_digits_patch` uses scikit-learn's bundled 8x8 digits (offline);
`pmoe.data.vision.make_mnist_patch` feeds MNIST to the same construction.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np

from .base import PatchDataset, Spurious, TileHook, box_marker, check_count, compose_tiles


def _check_digits(classes: Sequence[int], distractors: Optional[Sequence[int]]) -> tuple[list[int], list[int]]:
    classes = [int(c) for c in classes]
    if len(classes) != 2 or len(set(classes)) != 2 or not all(0 <= c <= 9 for c in classes):
        raise ValueError(f"classes must be two different digits in 0..9, got {classes}")
    if distractors is None:
        distractors = [c for c in range(10) if c not in classes]
    distractors = [int(c) for c in distractors]
    if not distractors or not all(0 <= c <= 9 for c in distractors):
        raise ValueError(f"distractors must be a non-empty list of digits in 0..9, got {distractors}")
    if set(distractors) & set(classes):
        raise ValueError(f"distractor digits {distractors} overlap the class digits {classes}: "
                         f"the discriminative tile would not be unique")
    return classes, distractors


def compose_digit_tiles(
    images: np.ndarray,
    labels: np.ndarray,
    n_samples: int,
    rng: np.random.Generator,
    classes: Sequence[int],
    distractors: Sequence[int],
    grid: tuple[int, int] = (4, 4),
    spurious: Optional[Spurious] = None,
    hook: Optional[TileHook] = None,
) -> PatchDataset:
    """images: (M, p, p) float32 in [0, 1]; labels: (M,) digit labels.  Label y = i means the
    class tile shows digit classes[i]."""
    tiles = images[:, None]  # (M, 1, p, p)
    class_tiles = [tiles[labels == c] for c in classes]
    distractor_tiles = tiles[np.isin(labels, distractors)]
    p = images.shape[-1]
    return compose_tiles(class_tiles, distractor_tiles, n_samples, grid, rng, spurious, box_marker(1, p), hook)


def split_pool(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train_idx, test_idx) over the pool, stratified by label."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cut = int(round(len(idx) * test_fraction))
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@functools.lru_cache(maxsize=1)
def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 bundled 8x8 digits: images (1797, 8, 8) float32 in [0, 1] (pixel
    values 0..16 divided by 16), labels (1797,) int64.  Cached (many small runs load it), so
    the arrays are read-only."""
    from sklearn.datasets import load_digits  # ships with scikit-learn, no download

    digits = load_digits()
    images, labels = (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def digits_pool_split(seed: int = 0, test_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The disjoint (train, test) indices into `load_sklearn_digits()` that `make_digits_patch`
    draws its tiles from for this seed."""
    split_ss = np.random.SeedSequence(seed).spawn(3)[0]
    return split_pool(load_sklearn_digits()[1], test_fraction, np.random.default_rng(split_ss))


def make_digits_patch(
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    classes: Sequence[int] = (0, 1),
    distractors: Optional[Sequence[int]] = None,
    grid: tuple[int, int] = (4, 4),
    test_fraction: float = 0.5,
    spurious: Optional[Spurious] = None,
    test_spurious: Optional[Spurious] = None,
    hook: Optional[TileHook] = None,
) -> tuple[PatchDataset, PatchDataset]:
    """Binary digit-tile task on sklearn's 8x8 digits: (N, 1, 32, 32) images for the default 4x4
    grid, patch size 8, n = 16.

    The 1797 digit images are first split (stratified, by `seed`) into disjoint train and test
    pools (`test_fraction` to test); each split's tiles come only from its pool.  classes: the
    two class digits (label 0 <-> classes[0], label 1 <-> classes[1]); distractors: digits for
    the other tiles (default: all digits but the two classes).  spurious / test_spurious: an
    optional label-correlated marker (a box outline by default) per split; hook: see `TileHook`.
    """
    n_train, n_test = check_count("n_train", n_train), check_count("n_test", n_test)
    classes, distractors = _check_digits(classes, distractors)
    images, labels = load_sklearn_digits()
    _, train_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
    tr, te = digits_pool_split(seed, test_fraction)
    train = compose_digit_tiles(images[tr], labels[tr], n_train, np.random.default_rng(train_ss), classes,
                                distractors, grid, spurious, hook)
    test = compose_digit_tiles(images[te], labels[te], n_test, np.random.default_rng(test_ss), classes,
                               distractors, grid, test_spurious, hook)
    return train, test

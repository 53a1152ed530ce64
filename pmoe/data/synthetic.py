"""The paper's data model (Chowdhury et al. 2023, §3): n patches of dimension d per sample.

One patch carries the class pattern o_y (one unit vector per class); each of the other n-1
carries a class-irrelevant pattern q drawn from a small set shared by both classes, plus
Gaussian noise.  All patterns are orthonormal.

Image form: a patch vector of length d = C*p*p is laid out as a (C, p, p) tile and the n tiles
are tiled on a (grid_h, grid_w) grid, so `PMoEConv2d(C, ..., patch_size=p)` (or
`PatchDataset.patches()`) sees exactly the patch vectors.  By default C=1, p=sqrt(d) when d is
a perfect square, else C=d, p=1 (1x1 patches with d channels).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .base import PatchDataset, Spurious, TileHook, check_count, compose_tiles


def grid_for(n: int) -> tuple[int, int]:
    """The most square (rows, cols) grid with rows*cols = n, rows <= cols."""
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def tile_layout(d: int, patch_size: Optional[int]) -> tuple[int, int]:
    """(C, p) with C*p*p = d."""
    if patch_size is None:
        r = math.isqrt(d)
        return (1, r) if r * r == d else (d, 1)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if d % (patch_size * patch_size):
        raise ValueError(f"d={d} is not a multiple of patch_size^2={patch_size * patch_size}")
    return d // (patch_size * patch_size), patch_size


def orthonormal_patterns(count: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """(count, d) random orthonormal rows (count <= d)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, count)))
    return q.T.astype(np.float32)


def make_synthetic(
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    n: int = 16,
    d: int = 64,
    num_distractors: int = 4,
    noise: float = 0.1,
    signal_strength: float = 1.0,
    patch_size: Optional[int] = None,
    spurious: Optional[Spurious] = None,
    test_spurious: Optional[Spurious] = None,
    hook: Optional[TileHook] = None,
) -> tuple[PatchDataset, PatchDataset]:
    """Train and test splits of the paper's synthetic model.

    n: patches per sample; d: patch dimension; num_distractors: size of the shared set of
    class-irrelevant patterns; noise: per-coordinate std of the Gaussian noise added to the
    distractor patches (the class patch is noise-free, as in the paper's model); signal_strength:
    norm of the class patterns (distractors have norm 1).  Patterns are drawn from the seed and
    shared by both splits.  spurious / test_spurious: an optional label-correlated marker (an
    extra orthonormal pattern by default) for the train / test split; hook: see `TileHook`.
    Returns (train, test) with x of shape (N, C, H, W) -- see the module docstring.
    """
    n_train, n_test = check_count("n_train", n_train), check_count("n_test", n_test)
    for name, v in (("n", n), ("d", d), ("num_distractors", num_distractors)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if n < 2:
        raise ValueError(f"need n >= 2 patches (one signal, at least one distractor), got {n}")
    if noise < 0 or signal_strength <= 0:
        raise ValueError(f"need noise >= 0 and signal_strength > 0, got {noise} and {signal_strength}")
    if d < num_distractors + 3:
        raise ValueError(f"d={d} must be at least num_distractors + 3 = {num_distractors + 3} "
                         f"(two class patterns, the distractors and a marker, all orthonormal)")
    C, p = tile_layout(d, patch_size)
    grid = grid_for(n)
    pattern_ss, train_ss, test_ss = np.random.SeedSequence(seed).spawn(3)
    pats = orthonormal_patterns(num_distractors + 3, d, np.random.default_rng(pattern_ss)).reshape(-1, C, p, p)
    class_tiles = [signal_strength * pats[0:1], signal_strength * pats[1:2]]
    distractors, marker = pats[2:2 + num_distractors], pats[-1]

    def split(count: int, ss, spur: Optional[Spurious]) -> PatchDataset:
        rng = np.random.default_rng(ss)

        def add_noise(tiles, y, signal_index, rng_):
            noisy = np.ones(tiles.shape[:2], dtype=bool)
            noisy[np.arange(len(tiles)), signal_index] = False
            tiles += noisy[:, :, None, None, None] * rng_.normal(0.0, noise, tiles.shape).astype(np.float32)
            if hook is not None:
                hook(tiles, y, signal_index, rng_)

        return compose_tiles(class_tiles, distractors, count, grid, rng, spur, marker, add_noise)

    return split(n_train, train_ss, spurious), split(n_test, test_ss, test_spurious)

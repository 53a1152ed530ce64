"""The dataset container and the tile composer shared by every patch-structured dataset.

A sample is an image made of a grid of ``p x p`` tiles (patches, numbered row-major, the order
`pmoe.PMoEConv2d` uses); exactly one tile carries the class-discriminative pattern and the
others are class-irrelevant distractors (Chowdhury et al. 2023, §3's data model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

# Called as hook(tiles, y, signal_index, rng) on the composed tiles (N, n, C, p, p) before they
# are assembled into images; it may edit `tiles` in place (e.g. plant a marker, corrupt tiles).
TileHook = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], None]


@dataclass
class PatchDataset:
    """Tensors of one split.

    x: (N, C, H, W) float32 images, H = grid_h * p, W = grid_w * p.
    y: (N,) int64 class labels in [0, num_classes); for binary tasks {0, 1}, see `y_pm` for +-1.
    signal_index: (N,) int64 row-major number of the class-discriminative patch (-1: none, e.g.
        plain CIFAR-10 images).
    patch_size: p, the tile size the data was built for.
    extras: further per-sample (N, ...) tensors, e.g. "spurious" (bool) when a marker was planted.
    """

    x: torch.Tensor
    y: torch.Tensor
    signal_index: torch.Tensor
    patch_size: int
    num_classes: int = 2
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        N = self.x.shape[0]
        if self.x.dim() != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y.shape != (N,) or self.signal_index.shape != (N,):
            raise ValueError(f"y and signal_index must be ({N},), got {tuple(self.y.shape)} and "
                             f"{tuple(self.signal_index.shape)}")
        if self.x.shape[2] % self.patch_size or self.x.shape[3] % self.patch_size:
            raise ValueError(f"image size {tuple(self.x.shape[2:])} is not a multiple of patch_size={self.patch_size}")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.x.shape[2] // self.patch_size, self.x.shape[3] // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def in_channels(self) -> int:
        return self.x.shape[1]

    @property
    def y_pm(self) -> torch.Tensor:
        """(N,) float32 labels in {-1, +1} (binary tasks only): label 1 -> +1, label 0 -> -1."""
        if self.num_classes != 2:
            raise ValueError(f"+-1 labels need a binary task, this one has {self.num_classes} classes")
        return self.y.float() * 2 - 1

    def patches(self) -> torch.Tensor:
        """(N, n, d) view of the images as patch vectors, d = C*p*p, in unfold order."""
        return image_to_patches(self.x, self.patch_size)

    def tensor_dataset(self) -> TensorDataset:
        """A `TensorDataset` of (x, y, signal_index)."""
        return TensorDataset(self.x, self.y, self.signal_index)

    def subset(self, index) -> "PatchDataset":
        """The samples at `index` (a slice, a list or a tensor of indices)."""
        return PatchDataset(self.x[index], self.y[index], self.signal_index[index], self.patch_size,
                            self.num_classes, {k: v[index] for k, v in self.extras.items()})


def image_to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, n, C*p*p): non-overlapping p x p windows, row-major, each flattened in
    (C, p, p) order (that of F.unfold and of a conv weight)."""
    N, C, H, W = x.shape
    gh, gw = H // p, W // p
    return x.reshape(N, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(N, gh * gw, C * p * p)


def tiles_to_images(tiles: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(N, n, C, p, p) -> (N, C, gh*p, gw*p), tile j at grid cell (j // gw, j % gw)."""
    N, n, C, p, _ = tiles.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"grid {grid} holds {gh * gw} tiles, got {n}")
    return tiles.reshape(N, gh, gw, C, p, p).transpose(0, 3, 1, 4, 2, 5).reshape(N, C, gh * p, gw * p)


@dataclass
class Spurious:
    """A fixed marker tile planted at a fixed patch position, correlated with the label.

    P(marker | label 1) = rate and P(marker | label 0) = 1 - rate: rate 0.5 is no correlation,
    1 a perfect shortcut, 0 the reversed shortcut (for a shifted test set).  The discriminative
    tile is never placed at `position`.  marker: (C, p, p); None takes the dataset's default.
    Binary tasks only.
    """

    rate: float
    position: int = 0
    marker: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.rate) <= 1.0:
            raise ValueError(f"Spurious.rate must lie in [0, 1], got {self.rate}")
        if isinstance(self.position, bool) or not isinstance(self.position, (int, np.integer)) or self.position < 0:
            raise ValueError(f"Spurious.position must be a non-negative int, got {self.position!r}")


def check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def compose_tiles(
    class_tiles: Sequence[np.ndarray],
    distractor_tiles: np.ndarray,
    n_samples: int,
    grid: tuple[int, int],
    rng: np.random.Generator,
    spurious: Optional[Spurious] = None,
    default_marker: Optional[np.ndarray] = None,
    hook: Optional[TileHook] = None,
) -> PatchDataset:
    """Draw `n_samples` images: a balanced random label, its class tile at a uniformly random grid
    cell, a uniformly drawn distractor tile in every other cell.

    class_tiles[c]: (M_c, C, p, p) pool of tiles showing class c; distractor_tiles: (M, C, p, p).
    Tiles are drawn with replacement.  Returns a PatchDataset with `signal_index`, plus
    extras["spurious"] when `spurious` is given.
    """
    n_samples = check_count("n_samples", n_samples)
    num_classes = len(class_tiles)
    if num_classes < 2:
        raise ValueError("need tiles of at least two classes")
    if any(len(t) == 0 for t in class_tiles) or len(distractor_tiles) == 0:
        raise ValueError("every class and the distractors need at least one tile")
    shape = distractor_tiles.shape[1:]
    if any(t.shape[1:] != shape for t in class_tiles) or len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"all tiles must share one (C, p, p) shape, got {[t.shape[1:] for t in class_tiles]} and {shape}")
    gh, gw = grid
    n = gh * gw
    p = shape[1]

    # exactly balanced labels in random order
    y = rng.permutation(np.arange(n_samples) % num_classes)
    allowed = np.arange(n)
    if spurious is not None:
        if num_classes != 2:
            raise ValueError("a spurious marker needs a binary task")
        if spurious.position >= n:
            raise ValueError(f"Spurious.position {spurious.position} is outside the {n} patches")
        allowed = allowed[allowed != spurious.position]
    signal_index = allowed[rng.integers(0, len(allowed), n_samples)]

    tiles = distractor_tiles[rng.integers(0, len(distractor_tiles), (n_samples, n))]  # (N, n, C, p, p)
    rows = np.arange(n_samples)
    for c in range(num_classes):
        sel = rows[y == c]
        tiles[sel, signal_index[sel]] = class_tiles[c][rng.integers(0, len(class_tiles[c]), len(sel))]

    extras = {}
    if spurious is not None:
        marker = spurious.marker if spurious.marker is not None else default_marker
        if marker is None:
            raise ValueError("this dataset has no default marker: give Spurious(marker=...)")
        marker = np.asarray(marker, dtype=tiles.dtype)
        if marker.shape != shape:
            raise ValueError(f"marker must have shape {shape}, got {marker.shape}")
        p_marker = np.where(y == 1, spurious.rate, 1.0 - spurious.rate)
        present = rng.random(n_samples) < p_marker
        tiles[present, spurious.position] = marker
        extras["spurious"] = torch.from_numpy(present)
    if hook is not None:
        hook(tiles, y, signal_index, rng)

    return PatchDataset(
        x=torch.from_numpy(np.ascontiguousarray(tiles_to_images(tiles, grid), dtype=np.float32)),
        y=torch.from_numpy(y.astype(np.int64)),
        signal_index=torch.from_numpy(signal_index.astype(np.int64)),
        patch_size=p,
        num_classes=num_classes,
        extras=extras,
    )


def box_marker(channels: int, p: int, value: float = 1.0) -> np.ndarray:
    """(C, p, p) tile with a one-pixel border at `value`: a marker unlike any digit or object."""
    m = np.zeros((channels, p, p), dtype=np.float32)
    m[:, 0, :] = m[:, -1, :] = m[:, :, 0] = m[:, :, -1] = value
    return m

"""Readers for the files torchvision leaves on disk, with numpy only (no torchvision, no download).

MNIST: IDX files `<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`
(torchvision's layout; the same names directly in `<data_dir>` are accepted too).
CIFAR-10: the python pickles `<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}`.
"""
from __future__ import annotations

import gzip
import os
import pickle
from typing import Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

# IDX type codes -> numpy dtypes (big-endian on disk)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0x0000 <type> <ndim>, ndim big-endian
    uint32 sizes, then the data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
                         f"{len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(data_dir: PathLike, candidates: list[str], what: str) -> str:
    paths = [os.path.join(data_dir, c) for c in candidates]
    for p in paths:
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{what} not found; expected one of: " + ", ".join(paths))


def load_mnist(data_dir: PathLike, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from IDX files: images (N, 28, 28) uint8, labels (N,) int64."""
    stem = "train" if train else "t10k"
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{stem}-{kind}-ubyte"
        cands = [f"MNIST/raw/{name}", f"MNIST/raw/{name}.gz", name, f"{name}.gz"]
        arrays.append(read_idx(_find(data_dir, cands, f"MNIST {'train' if train else 'test'} {kind[:-5]}")))
    images, labels = arrays
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST files disagree: images {images.shape}, labels {labels.shape}")
    return images.astype(np.uint8), labels.astype(np.int64)


def load_cifar10(data_dir: PathLike, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the python pickles: images (N, 3, 32, 32) uint8, labels (N,) int64.

    The files are pickles (the format CIFAR-10 ships in): only read ones you trust."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    paths = [os.path.join(data_dir, "cifar-10-batches-py", name) for name in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 {'train' if train else 'test'} files not found; expected: "
                                + ", ".join(paths) + f" (missing: {', '.join(missing)})")
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)

"""Readers for the files torchvision leaves on disk, with numpy only (no torchvision, no download).

MNIST: IDX files `<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`
(torchvision's layout; the same names directly in `<data_dir>` are accepted too).
CIFAR-10: the python batches `<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}`.

The CIFAR-10 batches are pickles, and a plain `pickle.load` runs whatever code a pickle names.
They are read with a restricted unpickler instead: it builds only what a CIFAR-10 batch holds
(dicts, lists, bytes, str, int and numpy arrays of plain numeric dtypes) and refuses any other
global before anything is called, so a tampered file raises `FileFormatError` and runs nothing.

Every reader checks what it read: a damaged gzip stream, a truncated file, the wrong number of
dimensions, image and label counts that disagree, labels outside 0..9 and non-integer pixels
(a float file's scale, 0..1 or 0..255, cannot be told from the data, and casting it to uint8
would zero it) raise `FileFormatError`, naming the file.
"""
from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
import zlib
from typing import Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

# IDX type codes -> numpy dtypes (big-endian on disk)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FileFormatError(ValueError):
    """A file exists but does not hold what it should: damaged, truncated, of another format, or
    refused (a pickle asking for code).  The message names the file.  A ValueError, so callers
    that catch ValueError keep working; the CLI exits with status 1 on it."""


def _read_bytes(path: PathLike) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz."""
    if str(path).endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise FileFormatError(f"{path}: not a readable gzip file ({e})") from e
    with open(path, "rb") as f:
        return f.read()


def read_idx(path: PathLike) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): magic 0x0000 <type> <ndim>, ndim big-endian
    uint32 sizes, then the data.  Any dtype the format has is returned as stored."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise FileFormatError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FileFormatError(f"{path}: truncated header ({ndim} dimensions need {header} bytes, "
                              f"the file holds {len(raw)})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around for huge sizes
    if len(raw) - header != expected:
        raise FileFormatError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
                              f"{len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def as_pixels(path: PathLike, array: np.ndarray) -> np.ndarray:
    """uint8 pixels from an integer array with values in 0..255; anything else is refused."""
    if array.dtype.kind not in "iu":
        raise FileFormatError(f"{path}: pixels are {array.dtype}, expected integers 0..255 (uint8); a float "
                              f"file's scale is ambiguous: convert it with (x * 255).round().astype(np.uint8) "
                              f"if its values lie in [0, 1]")
    if array.size and (int(array.min()) < 0 or int(array.max()) > 255):
        raise FileFormatError(f"{path}: pixel values lie in [{int(array.min())}, {int(array.max())}], "
                              f"expected 0..255")
    return array.astype(np.uint8, copy=False)


def as_labels(path: PathLike, labels, count: int) -> np.ndarray:
    """(count,) int64 class ids in 0..9 from a list or an integer array; anything else is refused."""
    labels = np.asarray(labels)
    if labels.size == 0:
        labels = labels.astype(np.int64).reshape(-1)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise FileFormatError(f"{path}: labels must be a 1-D list of integers, got {labels.dtype} of shape "
                              f"{labels.shape}")
    if len(labels) != count:
        raise FileFormatError(f"{path}: {count} images but {len(labels)} labels")
    if count and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise FileFormatError(f"{path}: labels lie in [{int(labels.min())}, {int(labels.max())}], expected 0..9")
    return labels.astype(np.int64)


def _find(data_dir: PathLike, candidates: list[str], what: str) -> str:
    paths = [os.path.join(data_dir, c) for c in candidates]
    for p in paths:
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"{what} not found; expected one of: " + ", ".join(paths))


def load_mnist(data_dir: PathLike, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from IDX files: images (N, 28, 28) uint8, labels (N,) int64."""
    stem = "train" if train else "t10k"
    split = "train" if train else "test"
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{stem}-{kind}-ubyte"
        paths.append(_find(data_dir, [f"MNIST/raw/{name}", f"MNIST/raw/{name}.gz", name, f"{name}.gz"],
                           f"MNIST {split} {kind[:-5]}"))
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise FileFormatError(f"{paths[0]}: expected square images (N, H, H), got shape {images.shape}")
    if labels.ndim != 1:
        raise FileFormatError(f"{paths[1]}: expected labels of shape (N,), got {labels.shape}")
    return as_pixels(paths[0], images), as_labels(paths[1], labels, len(images))


# ----------------------------------------------------------------------------- CIFAR-10 batches

def _plain_dtype(*args) -> np.dtype:
    """np.dtype(*args) when it is a plain numeric dtype (bool, int, uint, float), else refused."""
    dtype = np.dtype(*args)
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"refused dtype {dtype}: only plain numeric arrays are allowed")
    return dtype


def _reconstruct(subtype, shape, dtype) -> np.ndarray:
    """numpy's `_reconstruct` (pickle protocols 0-4) for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refused array subtype {subtype!r}")
    return np.ndarray(shape, _plain_dtype(dtype))


def _frombuffer(buffer, dtype, shape, order) -> np.ndarray:
    """numpy's `_frombuffer` (pickle protocol 5) for plain numeric dtypes only."""
    array = np.frombuffer(buffer, dtype=_plain_dtype(dtype))
    return array.reshape(shape, order="F" if order == "F" else "C")


_CIFAR_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,  # only ever passed to _reconstruct, which checks it
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in a protocol-2 pickle written by Python 3
    **{(module, "_reconstruct"): _reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
}


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, str, int and plain numeric numpy arrays; refuses every other
    global (so nothing a pickle names is ever called) and every persistent id."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR-10 batch never holds "
                                         f"(refused: nothing was run)") from None


def _unpickle_cifar(path: str) -> dict:
    """The batch dict of one CIFAR-10 python batch, read with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError) as e:
        raise FileFormatError(f"{path}: not a CIFAR-10 python batch: {e or type(e).__name__}") from e
    if not isinstance(batch, dict):
        raise FileFormatError(f"{path}: not a CIFAR-10 python batch (it holds a {type(batch).__name__}, not a dict)")
    return batch


def _field(batch: dict, path: str, key: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise FileFormatError(f"{path}: not a CIFAR-10 python batch (no {key!r} entry)")


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images (N, 3, 32, 32) uint8, labels (N,) int64, checked."""
    batch = _unpickle_cifar(path)
    data = _field(batch, path, "data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = data.shape if isinstance(data, np.ndarray) else type(data).__name__
        raise FileFormatError(f"{path}: expected data of shape (N, 3072), got {shape}")
    images = as_pixels(path, data).reshape(-1, 3, 32, 32)
    return images, as_labels(path, _field(batch, path, "labels"), len(images))


def load_cifar10(data_dir: PathLike, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the python batches: images (N, 3, 32, 32) uint8, labels (N,) int64."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    paths = [os.path.join(data_dir, "cifar-10-batches-py", name) for name in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 {'train' if train else 'test'} files not found; expected: "
                                + ", ".join(paths) + f" (missing: {', '.join(missing)})")
    images, labels = zip(*(read_cifar_batch(p) for p in paths))
    return np.concatenate(images), np.concatenate(labels)

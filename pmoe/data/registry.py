"""`make_dataset(name, ...)`: every dataset by name, for the CLI and the experiments."""
from __future__ import annotations

from typing import Callable

from .base import PatchDataset
from .digits import make_digits_patch
from .synthetic import make_synthetic
from .vision import make_cifar10, make_cifar10_patch, make_mnist_patch

DATASETS: dict[str, Callable[..., tuple[PatchDataset, PatchDataset]]] = {
    "synthetic": make_synthetic,
    "digits-patch": make_digits_patch,
    "mnist-patch": make_mnist_patch,
    "cifar10": make_cifar10,
    "cifar10-patch": make_cifar10_patch,
}


def make_dataset(name: str, n_train: int, n_test: int, seed: int = 0, **kw) -> tuple[PatchDataset, PatchDataset]:
    """(train, test) PatchDatasets of dataset `name` (one of DATASETS), deterministic given the
    seed.  Keyword arguments go to the dataset's builder (e.g. data_dir=, spurious=, n=, d=)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {tuple(DATASETS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return DATASETS[name](n_train, n_test, seed, **kw)

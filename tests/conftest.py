"""Kernels run in Triton's interpreter on CPU tensors: the variable must be set before triton
is imported anywhere, so it is set here, first."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

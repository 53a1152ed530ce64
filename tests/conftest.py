"""Kernels run in Triton's interpreter on CPU tensors: the variable must be set before triton
is imported anywhere, so it is set here, first."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _kernel_bounds():
    """Every interpreted kernel launch is bounds-checked (tests/kernel_bounds.py): an access
    outside the launch's tensors fails the test instead of corrupting memory."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        try:
            import triton  # noqa: F401
        except ImportError:
            pass
        else:
            from kernel_bounds import install

            install()
    yield

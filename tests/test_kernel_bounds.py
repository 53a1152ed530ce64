"""tests/kernel_bounds.py, the interpreter's bounds check every kernel test runs under (conftest):
an access one element past a tensor fails, an access inside it does not."""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _shift_copy(x_ptr, y_ptr, n, read_past: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n + read_past), mask=i < n)


def test_in_bounds_passes_and_one_past_the_end_fails():
    x, y = torch.arange(8.0), torch.zeros(8)
    _shift_copy[(1,)](x, y, 8, read_past=0, BLOCK=16)
    assert torch.equal(x, y)
    with pytest.raises(Exception, match="load out of bounds in _shift_copy"):
        _shift_copy[(1,)](x, y, 8, read_past=1, BLOCK=16)

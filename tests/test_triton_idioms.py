"""Every Triton idiom the pMoE kernels rely on, one tiny kernel each, run on the installed Triton.

The interpreter changes between releases (Triton 3.8 stopped unwrapping a constexpr's result
in `CONST - tensor`; 3.9 refuses a mask built from `tensor & (scalar == 0)`), and a change that
breaks one idiom breaks every kernel that uses it.  Here it breaks one named test instead.
Kernel code follows these forms; an idiom not covered here is added here first.
"""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import pmoe.kernels.utils  # noqa: E402,F401  (applies the interpreter fixes the kernels run with)

if not pmoe.kernels.utils.INTERPRET:  # pragma: no cover
    pytest.skip("run under TRITON_INTERPRET=1 (tests/conftest.py sets it)", allow_module_level=True)

_MASK = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _global_constexpr_kernel(x_ptr, out_ptr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    tl.store(out_ptr + tl.arange(0, N), (x & _MASK) ^ _MASK)  # tensor first, global constexpr second


def test_global_constexpr_with_tensor_on_the_left():
    x = torch.tensor([0, 1, 5, 2**31 - 1, 2**40 + 3, -1, 7 << 32, 2**31], dtype=torch.int64)
    out = torch.empty_like(x)
    _global_constexpr_kernel[(1,)](x, out, N=8)
    assert torch.equal(out, 0x7FFFFFFF - (x & 0x7FFFFFFF))


@triton.jit
def _scalar_guard_kernel(out_ptr, N: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.arange(0, N)
    if pid == 0:  # a scalar condition guards the store; it is never and-ed into a tensor mask
        tl.store(out_ptr + i, i + 1, mask=i < N - 1)


def test_scalar_condition_guards_a_masked_store():
    out = torch.zeros(8, dtype=torch.int32)
    _scalar_guard_kernel[(3,)](out, N=8)
    assert out.tolist() == [1, 2, 3, 4, 5, 6, 7, 0]


@triton.jit
def _runtime_loop_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, n, BLOCK):  # runtime bound (NumPy >= 2.4 needs utils' scalar fix on 3.6)
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr + tl.arange(0, 1), tl.sum(acc, axis=0, keep_dims=True))


def test_loop_with_a_runtime_bound():
    x = torch.arange(37, dtype=torch.float32)
    out = torch.empty(1)
    _runtime_loop_kernel[(1,)](x, out, 37, BLOCK=16)
    assert out.item() == x.sum().item()


@triton.jit
def _sort_keys_kernel(x_ptr, out_ptr, R: tl.constexpr, N: tl.constexpr):
    off = tl.arange(0, R)[:, None] * N + tl.arange(0, N)[None, :]
    keys = tl.load(x_ptr + off)
    tl.store(out_ptr + off, tl.sort(keys, descending=True))  # int64, along the last axis of a 2-D block


def test_int64_sort_descending_along_rows():
    x = torch.randint(-2**62, 2**62, (4, 16), dtype=torch.int64)
    out = torch.empty_like(x)
    _sort_keys_kernel[(1,)](x, out, R=4, N=16)
    assert torch.equal(out, torch.sort(x, dim=1, descending=True).values)


@triton.jit
def _bitcast_kernel(x_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    u = tl.load(x_ptr + i).to(tl.int32, bitcast=True)
    u = tl.where(u < 0, u ^ 0x7FFFFFFF, u)  # python-int scalar operands, tensor first
    tl.store(out_ptr + i, u)


def test_float_bitcast_and_scalar_xor():
    x = torch.tensor([1.5, -1.5, 0.0, -2.0, float("inf"), -float("inf"), 3.0, -0.25])
    out = torch.empty(8, dtype=torch.int32)
    _bitcast_kernel[(1,)](x, out, N=8)
    u = x.view(torch.int32)
    assert torch.equal(out, torch.where(u < 0, u ^ 0x7FFFFFFF, u))
    assert torch.equal(torch.argsort(out), torch.argsort(x))  # order-preserving image


@triton.jit
def _dot_bf16_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    a = tl.load(a_ptr + tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :])
    b = tl.load(b_ptr + tl.arange(0, K)[:, None] * N + tl.arange(0, N)[None, :])
    acc = tl.dot(a, b, tl.zeros((M, N), dtype=tl.float32))
    c = acc.to(c_ptr.dtype.element_ty)  # fp32 -> bf16, round to nearest even like the GPU's cvt.rn
    tl.store(c_ptr + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], c)


def test_bf16_dot_accumulates_in_fp32_and_rounds_to_nearest_even():
    a = torch.randn(16, 32).bfloat16()
    b = torch.randn(32, 16).bfloat16()
    c = torch.empty(16, 16, dtype=torch.bfloat16)
    _dot_bf16_kernel[(1,)](a, b, c, M=16, N=16, K=32)
    ref = (a.double() @ b.double()).float().bfloat16()  # exact products, one rounding
    assert (c.float() - ref.float()).abs().max().item() <= 2 * 2**-8 * ref.float().abs().max().item()


@pytest.mark.parametrize("value", [1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-12, -(1.0 + 2**-8), 3.0e38])
def test_fp32_to_bf16_cast_rounds_to_nearest_even(value):
    """Ties go to the even neighbour, as the GPU's cvt.rn.bf16.f32 does (3.6's interpreter
    truncates without utils' fix; selections depend on these bits)."""
    t = torch.tensor([value], dtype=torch.float32)
    out = torch.empty(1, dtype=torch.bfloat16)
    _cast_kernel[(1,)](t, out)
    assert out.view(torch.int16).item() == t.bfloat16().view(torch.int16).item()


@triton.jit
def _cast_kernel(x_ptr, y_ptr):
    tl.store(y_ptr + tl.arange(0, 1), tl.load(x_ptr + tl.arange(0, 1)).to(y_ptr.dtype.element_ty))


@triton.jit
def _reduce_keep_dims_kernel(x_ptr, out_ptr, R: tl.constexpr, N: tl.constexpr):
    off = tl.arange(0, R)[:, None] * N + tl.arange(0, N)[None, :]
    x = tl.load(x_ptr + off)
    mx = tl.max(x, axis=1, keep_dims=True)  # (R, 1), broadcasts back
    tl.store(out_ptr + off, tl.exp(x - mx) / tl.sum(tl.exp(x - mx), axis=1, keep_dims=True))


def test_keep_dims_reductions_broadcast():
    x = torch.randn(4, 16)
    out = torch.empty_like(x)
    _reduce_keep_dims_kernel[(1,)](x, out, R=4, N=16)
    torch.testing.assert_close(out, torch.softmax(x, 1))


@triton.jit
def _atomic_kernel(out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.atomic_add(out_ptr + i % 4, tl.full((N,), 1.0, tl.float32), mask=i < N, sem="relaxed")


def test_relaxed_atomic_add_with_repeated_addresses():
    out = torch.zeros(4)
    _atomic_kernel[(3,)](out, N=16)
    assert out.tolist() == [12.0] * 4


@triton.jit
def _int64_offsets_kernel(x_ptr, out_ptr, stride, N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, N)
    tl.store(out_ptr + b * N + i, tl.load(x_ptr + b * stride + i.to(tl.int64)))


def test_int64_offsets_from_program_ids():
    x = torch.arange(64, dtype=torch.float32)
    out = torch.empty(4 * 4)
    _int64_offsets_kernel[(4,)](x, out, 16, N=4)
    assert out.view(4, 4).tolist() == x.view(4, 16)[:, :4].tolist()

"""kernels/launch.py, the launchers: GPU-only hazards of the Triton kernels, checked without a GPU
(interpreter on CPU tensors):

- top-l rows longer than routing.SELECT_MAX_N (the on-chip sort's shared-memory/register cap) take
  a torch fallback that must pick exactly what the kernel picks (the cap is lowered here);
- configs are a function of the shape alone, so every call of a shape launches the same code
  (deterministic mode needs nothing else), and the launchers go through one recordable place;
- the ticket counters of the single-launch kernels are zero again after every launch;
- the launches run with x's CUDA device current (custom ops add no DeviceGuard);
- softmax_all's dense router backward handles any k (experts in blocks of <= 64);
- dot_precision reads torch's new fp32_precision API as well as the legacy flags;
- the registry specialises launches as the launcher does (ints == 1 constexpr, multiples of 16).
"""
import contextlib
import os
import types
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from pmoe.kernels import launch  # noqa: E402
from pmoe.kernels import op as kop  # noqa: E402
from pmoe.kernels import registry  # noqa: E402
from pmoe.kernels import routing as kroute  # noqa: E402
from pmoe.kernels.utils import key_patch_torch, key_score_torch, selection_keys, selection_keys_torch  # noqa: E402
from pmoe.reference import reference_conv2d  # noqa: E402
from pmoe.routing import select_top_l  # noqa: E402
from helpers import params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAN_NEG = torch.tensor([0xFFC00001], dtype=torch.int64).to(torch.int32).view(torch.float32).item()  # -NaN payload


def _rows_with_ties():
    """(B=2, k=3, n=24) fp32 scores: exact ties, +-0, +-inf, NaNs of both signs and payloads."""
    g = torch.Generator().manual_seed(3)
    s = torch.randint(-3, 4, (2, 3, 24), generator=g).float()  # many exact ties
    s[0, 0, [1, 5]] = -0.0
    s[0, 0, [2, 7]] = 0.0
    s[0, 1, [0, 9, 17]] = float("inf")
    s[0, 1, [3, 11]] = float("-inf")
    s[0, 2, [4, 8]] = float("nan")
    s[0, 2, 6] = NAN_NEG
    s[0, 2, 13] = float("inf")
    s[1, 0] = float("-inf")  # a whole row of -inf
    s[1, 1, ::2] = float("nan")
    s[1, 2, 10] = 1e-45  # denormal vs zeros
    s[1, 2, 11] = -1e-45
    s[1, 2, [12, 13]] = 0.0
    return s


# ------------------------------------------------------------------ 1. top-l beyond the cap


@triton.jit
def _keys_kernel(s_ptr, keys_ptr, n, N_POW2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * n
    j = tl.arange(0, N_POW2)
    ok = j < n
    tl.store(keys_ptr + row + j, selection_keys(tl.load(s_ptr + row + j, mask=ok, other=0.0), j, ok), mask=ok)


def test_selection_keys_torch_twin_matches_jit_keys_and_torch_sort():
    s = _rows_with_ties()
    keys = torch.empty(s.shape, dtype=torch.int64)
    _keys_kernel[(s.shape[0] * s.shape[1],)](s, keys, s.shape[-1], N_POW2=32)
    tk = selection_keys_torch(s)
    assert torch.equal(tk, keys)  # one definition of the order, twice
    order = torch.sort(tk, dim=-1, descending=True).indices
    assert torch.equal(key_patch_torch(torch.sort(tk, dim=-1, descending=True).values), order)
    assert torch.equal(order, select_top_l(s, s.shape[-1]))  # == the torch path's stable sort
    dec = key_score_torch(tk)
    same = (dec == s) | (dec.isnan() & s.isnan())
    assert same.all()
    assert not torch.signbit(dec[s == 0]).any()  # -0.0 decodes as +0.0
    assert (dec[s.isnan()].view(torch.int32) == 0x7FC00000).all()  # the canonical NaN


@pytest.mark.parametrize("gate,data", [("softmax", "ties"), ("indicator", "ties"), ("softmax_all", "ties"),
                                       ("softmax", "randn"), ("softmax_all", "randn")])
def test_select_fallback_matches_select_kernel(gate, data):
    s = _rows_with_ties() if data == "ties" else torch.randn(2, 3, 24) * 4
    B, k, n = s.shape
    l, m = 7, 3
    idx, gates, gates_x = torch.empty(B, k, l, dtype=torch.int64), torch.empty(B, k, l), torch.empty(B, k, l)
    inv, lse = torch.empty(B, k, n, dtype=torch.int32), torch.empty(B, k)
    y = torch.full((B, n, k * m), 7.0)
    kroute._select_kernel[(B, k)](s, idx, gates, gates_x, inv, lse, y, n, k, l, m, k * m,
                                  GATE=["softmax", "indicator", "softmax_all"].index(gate), ZERO_FILL=True, N_POW2=32,
                                  BLOCK_N=8, BLOCK_M=2)
    lse2, inv2 = torch.empty(B, k), torch.empty(B, k, n, dtype=torch.int32)
    y2 = torch.full((B, n, k * m), 7.0)
    idx2, gates2 = launch.select_torch(s.clone(), l, gate, lse2, inv2, y2)
    assert torch.equal(idx2, idx)
    assert torch.equal(idx, select_top_l(s, l))
    assert torch.equal(inv2, inv)
    torch.testing.assert_close(gates_x, gates, rtol=0, atol=0, equal_nan=True)  # the x-dtype copy (fp32 here)
    assert torch.equal(gates2.isnan(), gates.isnan())
    # gates/lse: the kernel's formulas, but torch's summation order and exp: fp32 rounding apart
    torch.testing.assert_close(gates2, gates, rtol=1e-5, atol=0, equal_nan=True)
    if gate == "softmax_all":
        torch.testing.assert_close(lse2, lse, rtol=1e-6, atol=0, equal_nan=True)
    else:
        assert gate != "indicator" or torch.equal(gates2, torch.ones_like(gates2))
    # the kernel zero-fills exactly the unselected blocks; the fallback zeroes everything (the
    # expert tiles then write the selected ones)
    taken = torch.zeros(B, k, n, dtype=torch.bool).scatter_(2, idx, True)
    zeroed = (y == 0).view(B, n, k, m)
    assert torch.equal(zeroed, (~taken).transpose(1, 2)[..., None].expand(B, n, k, m))
    assert (y2 == 0).all()
    assert torch.equal(inv >= 0, taken)


def _run_layer(x, router, weight, bias, p, l, combine, gate, det, pooled=False):
    y, idx, gates, _, _, _, lse, _ = kop.fused_fwd(x, router, weight, bias, p, l, combine, gate, "gelu", det, pooled,
                                                   True)
    params = [t for t in (x, router, weight, bias) if t is not None]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((y * g).sum(), params, allow_unused=True)
    return y, idx, gates, lse, grads


@pytest.mark.parametrize("combine,gate,pooled", [("concat", "indicator", False), ("concat", "softmax_all", False),
                                                 ("sum", "softmax", True)])
def test_layer_with_torch_selection_matches_kernel_selection(monkeypatch, combine, gate, pooled):
    """The whole layer, forward and backward, with the cap lowered below n: the same patches and
    output (bit-exact where the gates are 1: the zero-fill and the expert kernel's blocks), the
    same values to fp32 rounding elsewhere; the gate backward's chunk loop runs several chunks."""
    torch.manual_seed(0)
    x = torch.randint(-2, 3, (2, 3, 10, 10)).float()  # integer data: exact score ties (p=2: n=25)
    x[0, :, 4:6, 4:6] = float("nan") if gate == "indicator" else 0.0  # a NaN patch ranks first
    x.requires_grad_()
    router, weight, bias = params(3, 2, 3, 4, bias=True, flat=True)
    router = router.detach().round().requires_grad_()
    args = (x, router, weight, bias, 2, 17, combine, gate, True, pooled)  # l, n > GATE_BWD_BLOCK: 2 chunks
    ref = _run_layer(*args)
    calls = []
    monkeypatch.setattr(launch, "ROUTE", "split")  # the fallback is the split route's (ref: the fused route)
    monkeypatch.setattr(launch, "SELECT_MAX_N", 16)
    monkeypatch.setattr(kroute, "GATE_BWD_BLOCK", 16)
    monkeypatch.setattr(launch, "select_torch", lambda *a: calls.append(1) or _select_torch(*a))
    got = _run_layer(*args)
    assert calls, "the fallback did not run"
    y, idx, gates, lse, grads = got
    assert torch.equal(idx, ref[1])
    if gate == "indicator":
        assert torch.equal(y.isnan(), ref[0].isnan()) and torch.equal(y.nan_to_num(), ref[0].nan_to_num())
        assert torch.equal(gates, ref[2])
    else:
        torch.testing.assert_close(y, ref[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gates, ref[2], rtol=1e-5, atol=0)
        if gate == "softmax_all":
            torch.testing.assert_close(lse, ref[3], rtol=1e-6, atol=0)
        for a, b in zip(grads, ref[4]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


_select_torch = launch.select_torch


@pytest.mark.parametrize("combine,gate,pooled,channels_last,m,l,side", [
    ("concat", "softmax", False, False, 4, 8, 8),      # NCHW rows, dS fused, dX in the first launch
    ("concat", "softmax_all", False, True, 4, 8, 8),   # channels-last map, dense score gradient
    ("sum", "softmax", True, False, 4, 8, 8),          # pooled sum (deterministic: experts in order)
    ("concat", "indicator", False, False, 80, 4, 8),   # m beyond one column pass: dPre read back
    ("concat", "softmax", False, False, 4, 40, 16),    # l beyond a tile: chunks, dS by the gate kernel
])
def test_saved_pre_activations_match_recompute(combine, gate, pooled, channels_last, m, l, side):
    """save_pre: the forward's tiles store the pre-activations they hold and the backward reads
    them; without it the backward re-gathers the rows and re-runs the GEMM.  Both give the same
    gradients (fp32: the same dot products, so to rounding), and the same outputs and routing."""
    torch.manual_seed(0)
    x = torch.randn(3, 3, side, side)  # p = 2: n = 16 or 64, d = 12
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    router, weight, bias = params(3, 2, 2, m, bias=True, flat=True)
    runs = []
    for save_pre in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, router, weight, bias)]
        out = kop.fused_fwd(*leaves, 2, l, combine, gate, "gelu", True, pooled, save_pre)
        assert out[7].shape == ((3, 2, l, m) if save_pre else (0,))
        g = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(1))
        runs.append((out[:3], torch.autograd.grad((out[0] * g).sum(), leaves, allow_unused=True)))
    (fwd_a, grads_a), (fwd_b, grads_b) = runs
    for a, b in zip(fwd_a, fwd_b):
        assert torch.equal(a, b)
    assert (grads_a[1] is None) == (grads_b[1] is None) == (gate == "indicator")  # its router has no gradient
    for a, b in zip(grads_a, grads_b):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_backward_rejects_pre_activations_of_another_call():
    """A saved pre that is not this call's (B, k, l, m) in x's dtype is a ValueError naming it, not
    a kernel reading out of bounds."""
    x = torch.randn(2, 3, 8, 8)
    router, weight, bias = (t.detach() for t in params(3, 2, 2, 4, bias=True, flat=True))
    y, idx, _, gates, inv, scores, lse, pre = kop.fused_fwd(x, router, weight, bias, 2, 4, "concat", "softmax",
                                                            "gelu", False, False, True)
    dy = torch.ones_like(y)
    for bad in (pre[:1], pre.transpose(0, 1), pre.double()):
        with pytest.raises(ValueError, match="pre must be"):
            kop.fused_bwd(dy, x, router, weight, bias, idx, gates, inv, scores, lse, bad, 2, 4, "concat", "softmax",
                          "gelu")


@pytest.mark.parametrize("grad,keep", [(False, True), (True, True), (True, False)])
def test_layer_saves_pre_activations_only_for_a_backward(monkeypatch, grad, keep):
    """pmoe.functional asks the op for the pre-activations only where autograd records the call
    (grad mode on and an input that requires grad): inference writes no (B, k, l, m) buffer.
    configs.SAVE_PRE = False (bench/gpu_check.py's pre section) makes the backward recompute them."""
    import pmoe

    monkeypatch.setattr(launch.configs, "SAVE_PRE", keep)
    seen = []
    monkeypatch.setattr(launch, "run", lambda kernel, grid, *a, **kw: (
        kernel is launch._forward_kernel and seen.append(kw["SAVE_PRE"])) or _RUN(kernel, grid, *a, **kw))
    layer = pmoe.PMoEConv2d(3, 8, patch_size=2, num_experts=2, top_l=4, backend="triton")
    x = torch.randn(2, 3, 8, 8)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert seen == [grad and keep]
    if grad:
        y.sum().backward()
        assert layer.weight.grad is not None


# ------------------------------------------------------------------ 2. configs are a function of the shape


_RUN = launch.run


def _record(monkeypatch, *args, pooled=False):
    launches = []
    monkeypatch.setattr(launch, "run", lambda kernel, grid, *a, **kw: launches.append((kernel, grid, kw))
                        or _RUN(kernel, grid, *a, **kw))
    _run_layer(*args, pooled=pooled)
    return launches


@pytest.mark.parametrize("combine,pooled", [("concat", False), ("sum", False), ("concat", True)])
def test_every_call_of_a_shape_launches_the_same_code(monkeypatch, combine, pooled):
    """Same kernels, grids and constexprs on every call (deterministic runs need exactly that);
    deterministic=True changes only the sum combine's expert loop (no atomics)."""
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    router, weight, bias = params(3, 2, 3, 4, bias=True, flat=True)
    args = (x, router, weight, bias, 2, 3, combine, "softmax_all", True)
    first, second = _record(monkeypatch, *args, pooled=pooled), _record(monkeypatch, *args, pooled=pooled)
    assert [(id(k), g, kw) for k, g, kw in first] == [(id(k), g, kw) for k, g, kw in second]
    loose = _record(monkeypatch, x, router, weight, bias, 2, 3, combine, "softmax_all", False, pooled=pooled)
    expert_loop = {kw.get("EXPERT_LOOP") for _, _, kw in first if "EXPERT_LOOP" in kw}
    assert expert_loop == {combine == "sum"}
    assert {kw.get("EXPERT_LOOP") for _, _, kw in loose if "EXPERT_LOOP" in kw} == {False}


def test_ticket_counters_are_zero_after_every_launch():
    """The cached sync buffer starts every launch at zero: the last program of each ticketed
    launch resets it (a stale count would let an expert tile start before its routing)."""
    x = torch.randn(5, 3, 4, 6, requires_grad=True)  # NCHW: the backward's copy programs take tickets too
    router, weight, bias = params(3, 2, 3, 4, bias=True, flat=True)
    for combine, gate in (("concat", "softmax"), ("sum", "softmax_all")):
        _run_layer(x, router, weight, bias, 2, 3, combine, gate, False)
        for buf in launch._SYNC.values():
            assert buf.device.type == "meta" or not buf.any()  # (meta: the compile registry's dry runs)


@pytest.mark.parametrize("combine,det,pooled", [("concat", False, False), ("sum", True, False), ("sum", False, True)])
def test_forward_row_ring_wraps_bit_identical(monkeypatch, combine, det, pooled):
    """NCHW input: the fused forward copies patch rows into a ring of image groups, and the
    backward's T, read by dX programs of the same launch, is one too (configs.ring_images).  With
    the rings cut to their minimum (one SM: 2 groups of 4 images, 13 images: slots reused twice, a
    partial last group), every output and gradient is the bits of the unwrapped run, and the
    buffers hold only the rings."""
    torch.manual_seed(0)
    x = torch.randn(13, 3, 8, 8, requires_grad=True)  # p=2: n=16, d=12; fp32 tiles of 32 rows, l=8: 4 images
    router, weight, bias = params(3, 2, 2, 4, bias=True, flat=True)
    args = (x, router, weight, bias, 2, 8, combine, "softmax", det)
    ref = _run_layer(*args, pooled=pooled)
    ring = launch.configs.ring_images  # one SM: one group in flight, a ring of 2 groups
    monkeypatch.setattr(launch.configs, "ring_images", lambda B, group, period, nbytes, sms: ring(B, group, period,
                                                                                                 nbytes, 1))
    from pmoe.kernels.backward import _rows_bwd_kernel
    rows = []
    monkeypatch.setattr(launch, "run", lambda kernel, grid, *a, **kw: (
        kernel is launch._forward_kernel and rows.append((a[1].shape, kw["MODE"]))
        or kernel is _rows_bwd_kernel and rows.append(a[11].shape)) or _RUN(kernel, grid, *a, **kw))
    got = _run_layer(*args, pooled=pooled)
    tiles = 1 if det else 2
    assert ring(13, 4, 4 + tiles, 16 * 12 * 4, sms=1) == 8
    assert rows == [((8 * 16, 12), launch.FWD_FUSED), (2, 8 * 8, 12)]  # T: (k, ring * l, d)
    for a, b in zip(got[:3], ref[:3]):  # y, idx, gates (lse: softmax_all's)
        assert torch.equal(a, b)
    for a, b in zip(got[4], ref[4]):
        assert torch.equal(a, b)


def test_ring_spans_the_groups_in_flight(monkeypatch):
    """A ring: the groups whose programs fit on the SMs at once and one more; B when that covers
    every group or would not stay in L2 (configs.RING_BYTES_DEFAULT)."""
    monkeypatch.delenv("PMOE_RING_BYTES", raising=False)
    assert launch.configs.RING_BYTES is None and launch.configs.ring_bytes() == 24 << 20
    ring = launch.configs.ring_images
    assert ring(256, 8, 12, 640 * 64 * 2) == (11 + 1) * 8  # WRN, 16-bit: 12 tickets a group, 132 SMs
    assert ring(64, 4, 12, 1024 * 256 * 2) == 48           # large: 12 of its 16 groups, 24 MB
    assert ring(32, 4, 12, 1024 * 256 * 2) == 32           # ... at B = 32 every group fits
    assert ring(4096, 4, 12, 4096 * 256 * 2) == 4096       # 4x the image: 96 MB would not stay in L2
    assert ring(256, 4, 48, 64 * 640 * 2) == 16            # WRN backward's T: 3 groups in flight
    assert ring(13, 4, 2, 1, sms=1) == 8                   # at least 2 groups


def test_ring_bytes_knob(monkeypatch):
    """The rings' cap: configs.RING_BYTES when set (0: no ring, B images), else PMOE_RING_BYTES,
    read at each launch, else the default; anything but a whole number of bytes >= 0 in the
    variable is a ValueError naming it, when a ring is sized (not at import)."""
    configs = launch.configs
    monkeypatch.delenv("PMOE_RING_BYTES", raising=False)
    assert configs.ring_images(4096, 4, 12, 3 << 18) == 4096  # 48 images of 768 KB: over the default 24 MB
    monkeypatch.setenv("PMOE_RING_BYTES", str(48 << 20))
    assert configs.ring_bytes() == 48 << 20
    assert configs.ring_images(4096, 4, 12, 3 << 18) == 48    # ... within 48 MB
    monkeypatch.setenv("PMOE_RING_BYTES", "0")
    assert configs.ring_images(256, 8, 12, 640 * 64 * 2) == 256
    monkeypatch.setattr(configs, "RING_BYTES", 24 << 20)     # set: over the variable
    assert configs.ring_images(256, 8, 12, 640 * 64 * 2) == 96
    monkeypatch.setattr(configs, "RING_BYTES", 0)
    assert configs.ring_images(64, 4, 12, 1024 * 256 * 2) == 64
    monkeypatch.setattr(configs, "RING_BYTES", None)
    for bad in ("24MB", "-1", "1.5"):
        monkeypatch.setenv("PMOE_RING_BYTES", bad)
        with pytest.raises(ValueError, match="PMOE_RING_BYTES"):
            configs.ring_images(256, 8, 12, 640 * 64 * 2)
    monkeypatch.setenv("PMOE_RING_BYTES", " ")
    assert configs.ring_bytes() == configs.RING_BYTES_DEFAULT


# ------------------------------------------------------------------ 3. device guard


def test_device_guard():
    assert isinstance(launch.device_guard(torch.zeros(1)), contextlib.nullcontext)
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    guard = launch.device_guard(fake)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built, not entered: no CUDA needed


def test_every_op_runs_under_the_device_guard(monkeypatch):
    seen = []
    orig = launch.device_guard
    monkeypatch.setattr(launch, "device_guard", lambda t: seen.append(t) or orig(t))
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    router, weight, _ = params(2, 2, 2, 3, bias=False, flat=True)
    _run_layer(x, router, weight, None, 2, 2, "concat", "softmax", False)
    _run_layer(x, router, weight, None, 2, 2, "sum", "softmax", False, pooled=True)
    assert len(seen) == 4 and seen[0] is x and seen[2] is x  # fwd, bwd, pooled fwd, bwd
    assert all(t.device == x.device for t in seen)  # the backward's: dy, on x's device


# ------------------------------------------------------------------ 4. dense router backward, any k


def test_softmax_all_router_backward_many_experts():
    """k = 70 experts (the split route: one program cannot hold 70 score rows): the dense router
    kernel's two expert blocks (64 + 6) and the dX combine's dense term; against the float64
    reference."""
    x = torch.randn(1, 2, 4, 4, requires_grad=True)  # n = 4, d = 8
    router, weight, _ = params(2, 2, 70, 1, bias=False, flat=True)
    y, idx, gates, _, grads = _run_layer(x, router, weight, None, 2, 2, "concat", "softmax_all", False)
    d64 = [t.detach().double().requires_grad_() for t in (x, router, weight.view(70, 1, 2, 2, 2))]
    y_ref, idx_ref, g_ref = reference_conv2d(*d64, None, 2, 2, "concat", "softmax_all", "gelu")
    y_ref = y_ref.flatten(2).transpose(1, 2)  # (B, out, Hp, Wp) -> (B, n, out)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(gates.double(), g_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-6)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).double()
    ref_grads = torch.autograd.grad((y_ref * g).sum(), d64)
    for a, b in zip(grads, ref_grads):
        err = ((a.double() - b.reshape(a.shape)).abs().max() / b.abs().max()).item()
        assert err < 1e-4


# ------------------------------------------------------------------ 5. dot_precision, both APIs


@pytest.fixture
def restore_matmul_precision():
    m = torch.backends.cuda.matmul
    saved = (m.fp32_precision, torch.backends.fp32_precision, m.allow_tf32)
    yield m
    m.allow_tf32 = saved[2]  # the legacy setter resets the legacy and new flags together
    torch.backends.fp32_precision = saved[1]
    m.fp32_precision = saved[0]
    assert m.allow_tf32 == saved[2] and torch.get_float32_matmul_precision()  # no mixed-API error left


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_dot_precision_new_api(restore_matmul_precision):
    m = restore_matmul_precision
    m.fp32_precision = "tf32"  # after this, reading allow_tf32 raises (mixed APIs)
    assert launch.dot_precision(torch.float32) == "tf32"
    m.fp32_precision = "ieee"
    assert launch.dot_precision(torch.float32) == "tf32x3"
    m.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"  # "none" inherits the global setting
    assert launch.dot_precision(torch.float32) == "tf32"
    torch.backends.fp32_precision = "ieee"
    assert launch.dot_precision(torch.float32) == "tf32x3"
    m.allow_tf32 = True  # the legacy setter on a new torch
    assert launch.dot_precision(torch.float32) == "tf32"
    m.allow_tf32 = False
    assert launch.dot_precision(torch.float32) == "tf32x3"
    assert launch.dot_precision(torch.bfloat16) == "tf32"


def test_dot_precision_legacy_api(monkeypatch):
    """A torch without fp32_precision: allow_tf32, else get_float32_matmul_precision()."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=True))
    assert launch.dot_precision(torch.float32) == "tf32"
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=False))
    assert launch.dot_precision(torch.float32) == "tf32x3"
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace())
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert launch.dot_precision(torch.float32) == "tf32"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert launch.dot_precision(torch.float32) == "tf32x3"


# ------------------------------------------------------------------ 6. the registry's specialisation


@triton.jit
def _spec_kernel(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i * stride, mask=i < n), mask=i < n)


def test_registry_specialises_like_the_launcher():
    x = torch.empty(64, device="meta", dtype=torch.bfloat16)
    rec = registry._specialise(_spec_kernel, (x, x, 48, 1), {"BLOCK": 64, "num_warps": 2}, "p")
    assert rec.signature == {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32", "stride": "constexpr", "BLOCK": "constexpr"}
    assert rec.constexprs == {"stride": 1, "BLOCK": 64} and rec.num_warps == 2
    assert rec.attrs == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}


def test_registry_records_every_kernel_of_the_launchers():
    """Every kernel launch.py can launch shows up in the compile report's problem set, with the
    constexpr branches (modes) it has."""
    recs = registry.launches("bf16", 90)
    names = {r.name for r in recs}
    assert names == {"forward", "scores", "select", "rows_bwd", "gate_bwd", "dx_dw", "route_dense_dr"}, names
    fwd = [r.constexprs for r in recs if r.name == "forward"]
    assert {c["MODE"] for c in fwd} == {0, 2} and {c["SOURCE"] for c in fwd} == {0, 1}
    assert {c["GATE"] for c in fwd} == {0, 1, 2} and {c["ACT"] for c in fwd} == {0, 1, 2, 3}
    assert {(c["COMBINE"], c["POOLED"], c["EXPERT_LOOP"]) for c in fwd} >= {(0, False, False), (1, False, True),
                                                                          (1, False, False), (0, True, False),
                                                                          (1, True, True)}
    bwd = [r.constexprs for r in recs if r.name == "rows_bwd"]
    assert {c["ONE_PASS"] for c in bwd} == {True, False} and {c["DX_HERE"] for c in bwd} == {True, False}

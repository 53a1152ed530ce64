"""GPU-only hazards of the Triton kernels, checked without a GPU (interpreter on CPU tensors):

- top-l rows longer than routing.SELECT_MAX_N (the on-chip sort's shared-memory/register cap) take
  a torch fallback that must pick exactly what the kernel picks (the cap is lowered here);
- deterministic mode launches every autotuned kernel with one fixed config (never through
  Autotuner.run, whose timing-chosen winner can change the rounding between processes);
- the launches run with x's CUDA device current (custom ops add no DeviceGuard);
- softmax_all's dense router backward handles any k (experts in blocks of <= 64);
- dot_precision reads torch's new fp32_precision API as well as the legacy flags;
- the registry compiles a realistic launcher specialisation (ints == 1 constexpr, multiples of 16).
"""
import contextlib
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from pmoe.kernels import backward as kbwd  # noqa: E402
from pmoe.kernels import forward as kfwd  # noqa: E402
from pmoe.kernels import op as kop  # noqa: E402
from pmoe.kernels import registry  # noqa: E402
from pmoe.kernels import routing as kroute  # noqa: E402
from pmoe.kernels.utils import (key_patch_torch, key_score_torch, selection_keys, selection_keys_torch,  # noqa: E402
                                fixed_config)
from pmoe.reference import reference_conv2d  # noqa: E402
from pmoe.routing import select_top_l  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAN_NEG = torch.tensor([0xFFC00001], dtype=torch.int64).to(torch.int32).view(torch.float32).item()  # -NaN payload


def _params(C, p, k, m, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = C * p * p
    router = torch.randn(k, d, generator=g).requires_grad_()
    weight = (torch.randn(k, m, d, generator=g) / math.sqrt(d)).requires_grad_()
    b = (torch.randn(k, m, generator=g) * 0.1).requires_grad_() if bias else None
    return router, weight, b


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
    idx, gates, lse = torch.empty(B, k, l, dtype=torch.int64), torch.empty(B, k, l), torch.empty(B, k)
    y = torch.full((B, n, k * m), 7.0)
    kop._select_kernel[(B, k)](s, idx, gates, lse, y, n, k, l, m, k * m, N_POW2=32, GATE=kop.GATE_CODES[gate],
                               ZERO_FILL=True, BLOCK_N=8, BLOCK_M=2)
    lse2 = torch.empty(B, k)
    y2 = torch.full((B, n, k * m), 7.0)
    idx2, gates2 = kop._select_torch(s.clone(), l, gate, lse2, y2)
    assert torch.equal(idx2, idx)
    assert torch.equal(idx, select_top_l(s, l))
    assert torch.equal(gates2.isnan(), gates.isnan())
    # gates/lse: the kernel's formulas, but torch's summation order and exp: fp32 rounding apart
    torch.testing.assert_close(gates2, gates, rtol=1e-5, atol=0, equal_nan=True)
    if gate == "softmax_all":
        torch.testing.assert_close(lse2, lse, rtol=1e-6, atol=0, equal_nan=True)
    else:
        assert gate != "indicator" or torch.equal(gates2, torch.ones_like(gates2))
    # the kernel zero-fills exactly the unselected blocks; the fallback zeroes everything (the
    # expert kernel then writes the selected ones)
    taken = torch.zeros(B, k, n, dtype=torch.bool).scatter_(2, idx, True)
    zeroed = (y == 0).view(B, n, k, m)
    assert torch.equal(zeroed, (~taken).transpose(1, 2)[..., None].expand(B, n, k, m))
    assert (y2 == 0).all()


def _run_layer(x, router, weight, bias, p, l, combine, gate, det, pooled=False):
    fn = kop.pooled_fwd if pooled else kop.fused_fwd
    y, idx, gates, scores, lse = fn(x, router, weight, bias, p, l, combine, gate, "gelu", det)
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
    router, weight, bias = _params(3, 2, 3, 4, bias=True)
    router = router.detach().round().requires_grad_()
    args = (x, router, weight, bias, 2, 17, combine, gate, True, pooled)  # l, n > GATE_BWD_BLOCK: 2 chunks
    ref = _run_layer(*args)
    calls = []
    monkeypatch.setattr(kop, "ROUTE", "split")  # the fallback is the split route's (ref: the fused route)
    monkeypatch.setattr(kroute, "SELECT_MAX_N", 16)
    monkeypatch.setattr(kop, "GATE_BWD_BLOCK", 16)
    monkeypatch.setattr(kop, "_select_torch", lambda *a: calls.append(1) or _select_torch(*a))
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


_select_torch = kop._select_torch


# ------------------------------------------------------------------ 2. deterministic: fixed configs

_FULL_CONFIGS = {  # every autotuned kernel: its full config list (pick_configs trims it here)
    "_scores_kernel": kroute.SCORES_CONFIGS, "_route_dense_dr_kernel": kroute.ROUTE_BWD_CONFIGS,
    "_route_dense_dx_kernel": kroute.ROUTE_DX_CONFIGS, "_expert_fwd_kernel": kfwd.EXPERT_FWD_CONFIGS,
    "_expert_fwd_sum_det_kernel": kfwd.EXPERT_FWD_DET_CONFIGS, "_expert_pool_kernel": kfwd.EXPERT_FWD_CONFIGS,
    "_expert_pool_det_kernel": kfwd.EXPERT_FWD_DET_CONFIGS, "_dpre_kernel": kbwd.DPRE_CONFIGS,
    "_dx_kernel": kbwd.DX_CONFIGS, "_dx_det_kernel": kbwd.DX_DET_CONFIGS, "_dw_kernel": kbwd.DW_CONFIGS,
}


def _spy_launches(monkeypatch):
    tuner_runs, launches = [], []
    orig_tuner_run = Autotuner.run

    def tuner_run(self, *args, **kwargs):
        tuner_runs.append(self.base_fn.__name__)
        return orig_tuner_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", tuner_run)
    fn_cls = type(kop._dpre_kernel.fn)  # InterpretedFunction here, JITFunction when compiled
    orig_fn_run = fn_cls.run

    def fn_run(self, *args, **kwargs):
        launches.append((self.__name__, kwargs))
        return orig_fn_run(self, *args, **kwargs)

    monkeypatch.setattr(fn_cls, "run", fn_run)
    return tuner_runs, launches


def test_fixed_config_is_each_lists_first():
    for spec in registry.KERNELS:
        if isinstance(spec.kernel, Autotuner):
            assert fixed_config(spec.kernel).all_kwargs() == _FULL_CONFIGS[spec.fn.__name__][0].all_kwargs()
    assert {s.fn.__name__ for s in registry.KERNELS if isinstance(s.kernel, Autotuner)} == set(_FULL_CONFIGS)


@pytest.mark.parametrize("route", ["split", "fused"])  # the fused route is not autotuned
@pytest.mark.parametrize("combine,pooled", [("concat", False), ("sum", False), ("concat", True)])
def test_deterministic_launches_bypass_the_autotuner(monkeypatch, combine, pooled, route):
    monkeypatch.setattr(kop, "ROUTE", route)
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    router, weight, bias = _params(3, 2, 3, 4, bias=True)
    tuner_runs, launches = _spy_launches(monkeypatch)
    _run_layer(x, router, weight, bias, 2, 3, combine, "softmax_all", True, pooled)
    assert tuner_runs == []
    launched = {name for name, _ in launches}
    expect = {"_scores_kernel" if route == "split" else "_route_kernel", "_dpre_kernel", "_dx_det_kernel", "_dw_kernel", "_route_dense_dr_kernel",
              "_route_dense_dx_kernel",
              "_expert_pool_det_kernel" if pooled else
              ("_expert_fwd_kernel" if combine == "concat" else "_expert_fwd_sum_det_kernel")}
    assert expect <= launched
    for name, kwargs in launches:
        if name in _FULL_CONFIGS:
            cfg = _FULL_CONFIGS[name][0]
            assert {key: kwargs[key] for key in cfg.all_kwargs()} == cfg.all_kwargs(), name
    # the spy sees the autotuned path too
    tuner_runs.clear()
    _run_layer(x, router, weight, bias, 2, 3, combine, "softmax_all", False, pooled)
    assert "_dpre_kernel" in tuner_runs and ("_scores_kernel" in tuner_runs) == (route == "split")


# ------------------------------------------------------------------ 3. device guard


def test_device_guard():
    assert isinstance(kop._device_guard(torch.zeros(1)), contextlib.nullcontext)
    fake = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    guard = kop._device_guard(fake)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1  # built, not entered: no CUDA needed


def test_every_op_runs_under_the_device_guard(monkeypatch):
    seen = []
    orig = kop._device_guard
    monkeypatch.setattr(kop, "_device_guard", lambda t: seen.append(t) or orig(t))
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    router, weight, _ = _params(2, 2, 2, 3, bias=False)
    _run_layer(x, router, weight, None, 2, 2, "concat", "softmax", False)
    _run_layer(x, router, weight, None, 2, 2, "sum", "softmax", False, pooled=True)
    assert len(seen) == 4 and all(t is x for t in seen)  # fwd, bwd, pooled fwd, bwd


# ------------------------------------------------------------------ 4. dense router backward, any k


def test_softmax_all_router_backward_many_experts():
    """k = 70 experts: two expert blocks (64 + a partial 6) in both dense kernels and the scores
    kernel; against the float64 reference.  (deterministic mode runs the same kernel code.)"""
    x = torch.randn(1, 2, 4, 4, requires_grad=True)  # n = 4, d = 8
    router, weight, _ = _params(2, 2, 70, 1, bias=False)
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
    assert kop.dot_precision(torch.float32) == "tf32"
    m.fp32_precision = "ieee"
    assert kop.dot_precision(torch.float32) == "tf32x3"
    m.fp32_precision = "none"
    torch.backends.fp32_precision = "tf32"  # "none" inherits the global setting
    assert kop.dot_precision(torch.float32) == "tf32"
    torch.backends.fp32_precision = "ieee"
    assert kop.dot_precision(torch.float32) == "tf32x3"
    m.allow_tf32 = True  # the legacy setter on a new torch
    assert kop.dot_precision(torch.float32) == "tf32"
    m.allow_tf32 = False
    assert kop.dot_precision(torch.float32) == "tf32x3"
    assert kop.dot_precision(torch.bfloat16) == "tf32"


def test_dot_precision_legacy_api(monkeypatch):
    """A torch without fp32_precision: allow_tf32, else get_float32_matmul_precision()."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=True))
    assert kop.dot_precision(torch.float32) == "tf32"
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=False))
    assert kop.dot_precision(torch.float32) == "tf32x3"
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace())
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert kop.dot_precision(torch.float32) == "tf32"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert kop.dot_precision(torch.float32) == "tf32x3"


# ------------------------------------------------------------------ 6. realistic specialisation


_CONTIG_CHECK = """
import sys
sys.path.insert(0, "bench")
from compile_report import compile_one
from pmoe.kernels.registry import KERNELS, by_name
assert all(s.variants[-1][0].startswith("contig,") for s in KERNELS)
spec = by_name("expert_fwd")
variant = spec.variants[-1]
label, consts, over = variant
sig = spec.signature("bf16", over)
assert sig["sxw"] == sig["swd"] == sig["sbm"] == "constexpr" and consts["sxw"] == 1, sig
names = list(sig)
hinted = {names[i[0]] for i in spec.int_attrs(sig, over)}
assert hinted >= {"sxh", "sxc", "sxb", "swm", "d", "m", "out_cols"}, hinted
assert all(sig[name] == "i32" for name in hinted)
r = compile_one(spec, variant, spec.launch_configs("bf16", 90)[0], "bf16", 90)
print(r["regs"], r["spill"])
"""


def test_registry_contig_specialisation_compiles():
    """The "contig" variant: unit strides become constexprs, sizes/strides get divisibility
    hints (as the launcher specialises them), and it compiles (sm_90, no spills)."""
    proc = subprocess.run([sys.executable, "-c", _CONTIG_CHECK], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    regs, spill = map(int, proc.stdout.split()[-2:])
    assert regs > 0 and spill == 0

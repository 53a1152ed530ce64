"""Launch glue, the custom ops `pmoe::fused_fwd` / `pmoe::pooled_fwd` / `pmoe::fused_bwd`, their
autograd and FLOPs.

Launch sequence (forward):  route (+ concat zero-fill) -> experts, two launches, where one program
can hold an image's scores and the batch fills the GPU (route_fused); else scores -> select ->
experts.
Pooled forward (the layer summed over patches, (B, out)): the same routing, then the experts with
the pooling epilogue; no (B, n, out) map, no zero-fill.
Launch sequence (backward): dpre (+ dG) -> gate bwd (dS) -> dX -> dW/db/d router -> [dense router
part, softmax_all only].  The pooled op's backward is the same launches: its (B, out) gradient
reaches dpre as a stride-0 (B, n, out) view (no B·n·out tensor is made).
Each launch runs inside a pmoe.profiling.nvtx_range (a shared no-op unless profiling is on), and
all of them with x's CUDA device current (_device_guard).  deterministic=True launches every
autotuned kernel with one fixed config (utils.tuned / fixed_config), never the timing-chosen
one, so its results are bit-identical across processes and call histories.  Score rows longer
than routing.SELECT_MAX_N are selected with torch ops on the kernel's scores (_select_torch).

Saved for backward (beyond the inputs x, router, weight, bias, which autograd keeps anyway):
  idx   (B, k, l) int64   8·B·k·l bytes  (it is also the returned Routing.indices: no extra copy)
  gates (B, k, l) fp32    4·B·k·l bytes
  softmax_all only: scores (B, k, n) fp32 + lse (B, k) fp32, 4·B·k·(n+1) bytes
Pre-activations are recomputed in backward instead of saved: storing them would cost
B·k·l·m·elt bytes (e.g. B=128, k=4, l=16, m=160, fp32: 5.2 MB per layer) for one extra pass of
the expert GEMM (the same FLOPs as the forward's expert part, a third of the backward's).
Backward scratch: dPre (k, B·l, m) in x's dtype and an fp32 dX map, freed on return.
The pooled op saves exactly the same tensors (its output is not needed by the backward).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from pmoe.profiling import nvtx_range
from pmoe.routing import Routing

from .backward import _dpre_kernel, _dw_kernel, _dx_det_kernel, _dx_kernel
from .forward import _expert_fwd_kernel, _expert_fwd_sum_det_kernel, _expert_pool_det_kernel, _expert_pool_kernel
from . import routing as _routing
from .routing import (_gate_bwd_kernel, _route_dense_dr_kernel, _route_dense_dx_kernel, _route_kernel,
                      _scores_kernel, _select_kernel, GATE_BWD_BLOCK)
from .utils import (ACT_CODES, COMBINE_CODES, GATE_CODES, key_patch_torch, key_score_torch,
                    selection_keys_torch, tuned)

SELECT_BLOCK_N, SELECT_BLOCK_M = 64, 32


def _np2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _matmul_allows_tf32() -> bool:
    """Whether the user allowed TF32 for fp32 matmuls, read the way torch itself resolves it.

    torch >= 2.9: torch.backends.cuda.matmul.fp32_precision ("tf32" / "ieee", or "none": inherit
    torch.backends.fp32_precision); the legacy setters (allow_tf32, set_float32_matmul_precision)
    keep it up to date, but after the new setter the legacy getters raise (mixed-API check), so
    the new one is read first.  Older torch: allow_tf32, then get_float32_matmul_precision()."""
    matmul = torch.backends.cuda.matmul
    try:
        prec = matmul.fp32_precision
    except (AttributeError, RuntimeError):
        prec = None
    if prec == "none":
        prec = getattr(torch.backends, "fp32_precision", "none")
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except (AttributeError, RuntimeError):
        pass
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except (AttributeError, RuntimeError):  # pragma: no cover
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots run as 3 TF32 products (tf32x3: fp32-level accuracy on tensor cores; exact "ieee"
    FMA dots need several times the registers and spill at useful tiles) unless the user allowed
    plain TF32 for matmuls, as torch does (fp32_precision "tf32", allow_tf32, precision "high");
    for 16-bit inputs the setting is irrelevant."""
    if dtype == torch.float32:
        return "tf32" if _matmul_allows_tf32() else "tf32x3"
    return "tf32"


def _device_guard(x: Tensor):
    """Triton launches on the current CUDA device and custom ops add no DeviceGuard: make x's
    device current for the launches (CPU tensors, i.e. the interpreter: nothing to do)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def router_block_k(k: int) -> int:
    """Experts per score tile: tl.dot needs >= 16 columns."""
    return min(64, max(16, _np2(k)))


def select_warps(n_pow2: int) -> int:
    return 4 if n_pow2 <= 1024 else 8


def _dims(x: Tensor, p: int, weight: Tensor):
    B, C, H, W = x.shape
    Wp = W // p
    n = (H // p) * Wp
    k, m, d = weight.shape
    return B, C, H, W, Wp, n, k, m, d


def _bias_args(bias: Optional[Tensor], x: Tensor):
    if bias is None:
        return x, 0, 0, False
    return bias, bias.stride(0), bias.stride(1), True


def _select_torch(scores, l, gate, lse, y):
    """_select_kernel in torch ops, for rows longer than routing.SELECT_MAX_N: the same int64
    keys (utils.selection_keys_torch, the jit helper's twin) so the same patches in the same
    order (unique keys: topk's order is exact), the gates and lse by the kernel's formulas from
    the same fp32 scores (equal up to summation order / exp rounding), and y zeroed whole (the
    expert kernel then overwrites the taken blocks: the kernel's zero-fill, bit for bit).
    scores: (B, k, n) fp32; lse: (B, k) fp32, written for softmax_all."""
    top = torch.topk(selection_keys_torch(scores), l, dim=-1, largest=True, sorted=True).values
    idx = key_patch_torch(top)
    sel = key_score_torch(top)
    if gate == "softmax":
        ex = torch.exp(sel - sel.amax(dim=-1, keepdim=True))
        gates = ex / ex.sum(dim=-1, keepdim=True)
    elif gate == "indicator":
        gates = torch.ones_like(sel)
    else:  # log-sum-exp over all n, with torch.logsumexp's handling of an infinite max
        mx = scores.amax(dim=-1, keepdim=True)
        shift = torch.where(mx.abs() == float("inf"), torch.zeros_like(mx), mx)
        row_lse = torch.log(torch.exp(scores - shift).sum(dim=-1, keepdim=True)) + shift
        lse.copy_(row_lse.squeeze(-1))
        gates = torch.exp(sel - row_lse)
    if y is not None:
        y.zero_()
    return idx, gates.contiguous()


# "auto" (route_fused decides), "fused" or "split": which routing kernels run (benchmarks and
# tests set it to compare the two; results are the same bits either way).
ROUTE = "auto"


def route_warps(lanes: int) -> int:
    return 4 if lanes < 1024 else 8


def _route_fits(n: int, k: int) -> bool:
    """One program holds all k score rows of an image: the experts in one block, and
    next_pow2(n) * block <= ROUTE_MAX_KEYS lanes."""
    return k <= router_block_k(k) and max(16, _np2(n)) * router_block_k(k) <= _routing.ROUTE_MAX_KEYS


def route_fused(B: int, n: int, k: int, device: torch.device) -> bool:
    """Whether the forward routes with the one-launch _route_kernel instead of _scores_kernel +
    _select_kernel (routing.py): when one program can hold an image's k score rows
    (_route_fits) and the batch alone gives every SM a program (B >= multiprocessors; under
    the interpreter, always).  Below that the split kernels tile each image's patches over
    several programs and win on parallelism; above, the fused one saves a launch and the
    scores' round trip through memory."""
    if ROUTE not in ("auto", "fused", "split"):
        raise ValueError(f"pmoe.kernels.op.ROUTE must be 'auto', 'fused' or 'split', got {ROUTE!r}")
    if ROUTE == "split":
        return False
    fits = _route_fits(n, k)
    if ROUTE == "fused":
        if not fits:
            raise ValueError(f"ROUTE='fused' needs k <= 64 and next_pow2(n) * next_pow2(k) <= "
                             f"{_routing.ROUTE_MAX_KEYS} (16 at least each), got n={n}, k={k}")
        return True
    if not fits:
        return False
    return device.type != "cuda" or B >= torch.cuda.get_device_properties(device).multi_processor_count


def _route(x, router, p, l, k, gate, y=None, m=0, deterministic=False):
    """Scores and selection.  -> idx (B, k, l) int64, gates (B, k, l) fp32, scores (B, k, n) fp32
    for softmax_all (its backward needs them; (B, k, 0) otherwise), lse (B, k) fp32.  y: the
    concat output (B, n, k*m) whose unselected blocks are zero-filled here, or None (sum:
    accumulated from zeros; pooled: no map at all).  Rows longer than routing.SELECT_MAX_N are
    selected by _select_torch (read at call time: tests lower it)."""
    B, C, H, W = x.shape
    Wp = W // p
    n = (H // p) * Wp
    d = router.shape[1]
    dev, f32 = x.device, torch.float32
    keep_scores = gate == "softmax_all"
    zero_fill = y is not None
    bk = router_block_k(k)
    lse = torch.empty(B, k, device=dev, dtype=f32)
    idx = torch.empty(B, k, l, device=dev, dtype=torch.int64)
    gates = torch.empty(B, k, l, device=dev, dtype=f32)
    if route_fused(B, n, k, dev):
        scores = torch.empty(B, k, n if keep_scores else 0, device=dev, dtype=f32)
        n_pow2 = max(16, _np2(n))
        with nvtx_range("pmoe.route"):
            _route_kernel[(B,)](x, router, idx, gates, scores, lse, y if zero_fill else scores, n, d, k, l, m, k * m,
                                Wp, p, *x.stride(), *router.stride(), N_POW2=n_pow2, BLOCK_K=bk,
                                GATE=GATE_CODES[gate], ZERO_FILL=zero_fill, STORE_SCORES=keep_scores,
                                PREC=dot_precision(x.dtype), BLOCK_D=_routing.ROUTE_BLOCK_D,
                                BLOCK_M=SELECT_BLOCK_M, num_warps=route_warps(n_pow2 * bk))
        return idx, gates, scores, lse

    scores = torch.empty(B, k, n, device=dev, dtype=f32)
    with nvtx_range("pmoe.scores"):
        tuned(_scores_kernel, deterministic)[lambda meta: (B, triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, bk))](
            x, router, scores, n, d, k, Wp, p, *x.stride(), *router.stride(), BLOCK_K=bk, PREC=dot_precision(x.dtype))
    with nvtx_range("pmoe.select"):
        if n > _routing.SELECT_MAX_N:
            idx, gates = _select_torch(scores, l, gate, lse, y)
        else:
            n_pow2 = max(2, _np2(n))
            _select_kernel[(B, k)](scores, idx, gates, lse, y if zero_fill else scores, n, k, l, m, k * m,
                                   N_POW2=n_pow2, GATE=GATE_CODES[gate], ZERO_FILL=zero_fill,
                                   BLOCK_N=SELECT_BLOCK_N, BLOCK_M=SELECT_BLOCK_M, num_warps=select_warps(n_pow2))
    return idx, gates, scores if keep_scores else scores.new_empty(B, k, 0), lse


def _expert_args(x, weight, bias, idx, gates, out, p, l, out_cols):
    B, C, H, W, Wp, n, k, m, d = _dims(x, p, weight)
    b_t, sbk, sbm, _ = _bias_args(bias, x)
    return (x, weight, b_t, idx, gates, out, B, n, k, l, m, d, Wp, p, *x.stride(), *weight.stride(), sbk, sbm,
            out_cols)


def _forward(x, router, weight, bias, p, l, combine, gate, activation, deterministic):
    with _device_guard(x):
        return _forward_impl(x, router, weight, bias, p, l, combine, gate, activation, deterministic)


def _forward_impl(x, router, weight, bias, p, l, combine, gate, activation, deterministic):
    B, C, H, W, Wp, n, k, m, d = _dims(x, p, weight)
    concat = combine == "concat"
    out_cols = k * m if concat else m
    if concat:
        y = torch.empty(B, n, out_cols, device=x.device, dtype=x.dtype)  # every element written once
    else:
        y = torch.zeros(B, n, out_cols, device=x.device, dtype=torch.float32)  # accumulated in fp32
    idx, gates, scores, lse = _route(x, router, p, l, k, gate, y if concat else None, m, deterministic)

    args = _expert_args(x, weight, bias, idx, gates, y, p, l, out_cols)
    consts = dict(HAS_BIAS=bias is not None, ACT=ACT_CODES[activation], PREC=dot_precision(x.dtype))
    with nvtx_range("pmoe.experts"):
        if not concat and deterministic:
            tuned(_expert_fwd_sum_det_kernel, True)[lambda meta: (B, triton.cdiv(m, meta["BLOCK_M"]))](*args, **consts)
        else:
            tuned(_expert_fwd_kernel, deterministic)[
                lambda meta: (triton.cdiv(B * l, meta["BLOCK_R"]), triton.cdiv(m, meta["BLOCK_M"]), k)](
                *args, COMBINE=COMBINE_CODES[combine], **consts)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, idx, gates, scores, lse


def _forward_pooled(x, router, weight, bias, p, l, combine, gate, activation, deterministic):
    """-> out (B, out_cols) = the layer's output summed over the n patches, and the routing."""
    with _device_guard(x):
        return _forward_pooled_impl(x, router, weight, bias, p, l, combine, gate, activation, deterministic)


def _forward_pooled_impl(x, router, weight, bias, p, l, combine, gate, activation, deterministic):
    B, C, H, W, Wp, n, k, m, d = _dims(x, p, weight)
    out_cols = k * m if combine == "concat" else m
    idx, gates, scores, lse = _route(x, router, p, l, k, gate, deterministic=deterministic)
    consts = dict(HAS_BIAS=bias is not None, ACT=ACT_CODES[activation], COMBINE=COMBINE_CODES[combine],
                  PREC=dot_precision(x.dtype))
    with nvtx_range("pmoe.experts"):
        if deterministic:  # every element stored once, in a fixed order: straight in x's dtype
            out = torch.empty(B, out_cols, device=x.device, dtype=x.dtype)
            tuned(_expert_pool_det_kernel, True)[lambda meta: (B, triton.cdiv(m, meta["BLOCK_M"]))](
                *_expert_args(x, weight, bias, idx, gates, out, p, l, out_cols), **consts)
        else:  # fp32 atomics
            out = torch.zeros(B, out_cols, device=x.device, dtype=torch.float32)
            _expert_pool_kernel[lambda meta: (triton.cdiv(B * l, meta["BLOCK_R"]), triton.cdiv(m, meta["BLOCK_M"]), k)](
                *_expert_args(x, weight, bias, idx, gates, out, p, l, out_cols), **consts)
    return out.to(x.dtype), idx, gates, scores, lse


def _backward(dy, x, router, weight, bias, idx, gates, scores, lse, p, l, combine, gate, activation,
              deterministic):
    """dy: (B, n, out) any strides over (B, n), e.g. the pooled op's stride-0 broadcast view."""
    with _device_guard(x):
        return _backward_impl(dy, x, router, weight, bias, idx, gates, scores, lse, p, l, combine, gate,
                              activation, deterministic)


def _backward_impl(dy, x, router, weight, bias, idx, gates, scores, lse, p, l, combine, gate, activation,
                   deterministic):
    B, C, H, W, Wp, n, k, m, d = _dims(x, p, weight)
    dev = x.device
    prec = dot_precision(x.dtype)
    f32 = torch.float32
    if dy.stride(-1) != 1:  # the kernel needs unit-stride channels; (B, n) strides stay as they are
        dy = dy.contiguous()
    b_t, sbk, sbm, has_bias = _bias_args(bias, x)

    dpre = torch.empty(k, B * l, m, device=dev, dtype=x.dtype)
    dg = torch.empty(B, k, l, device=dev, dtype=f32)
    with nvtx_range("pmoe.backward.dpre"):
        tuned(_dpre_kernel, deterministic)[lambda meta: (triton.cdiv(B * l, meta["BLOCK_R"]), k)](
            x, weight, b_t, idx, gates, dy, dpre, dg, B, n, k, l, m, d, Wp, p, *x.stride(), *weight.stride(),
            sbk, sbm, dy.stride(0), dy.stride(1), HAS_BIAS=has_bias, ACT=ACT_CODES[activation],
            COMBINE=COMBINE_CODES[combine], PREC=prec)

    has_ds = gate != "indicator"
    dense = gate == "softmax_all"
    ds = torch.empty(B, k, l, device=dev, dtype=f32)
    dsd = torch.empty(B, k, n, device=dev, dtype=f32) if dense else ds
    if has_ds:
        with nvtx_range("pmoe.backward.gates"):
            _gate_bwd_kernel[(B, k)](dg, gates, scores if dense else dg, lse if dense else dg, ds, dsd, n, k, l,
                                     GATE=GATE_CODES[gate],
                                     BLOCK=min(GATE_BWD_BLOCK, max(16, _np2(max(l, n if dense else 1)))))

    dx = torch.zeros(B, C, H, W, device=dev, dtype=f32)
    dx_args = (dpre, weight, router, ds, idx, dx, B, n, k, l, m, d, Wp, p, *weight.stride(), *router.stride(),
               *dx.stride())
    with nvtx_range("pmoe.backward.dx"):
        if deterministic:
            tuned(_dx_det_kernel, True)[lambda meta: (B, triton.cdiv(d, meta["BLOCK_D"]))](
                *dx_args, HAS_DS=has_ds, PREC=prec)
        else:
            _dx_kernel[lambda meta: (triton.cdiv(B * l, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_D"]), k)](
                *dx_args, HAS_DS=has_ds, PREC=prec)

    dw = torch.empty(k, m, d, device=dev, dtype=f32)
    db = torch.empty(k, m, device=dev, dtype=f32) if has_bias else dw
    dr = torch.zeros(k, d, device=dev, dtype=f32)
    with nvtx_range("pmoe.backward.dw"):
        tuned(_dw_kernel, deterministic)[
                lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"]), k)](
            x, idx, dpre, ds, dw, db, dr, B, n, k, l, m, d, Wp, p, *x.stride(),
            HAS_BIAS=has_bias, HAS_DS=has_ds, PREC=prec)

    if dense:
        with nvtx_range("pmoe.backward.scores"):
            bk = router_block_k(k)  # experts in blocks of <= 64 (dX: the config's block): any k fits
            tuned(_route_dense_dr_kernel, deterministic)[
                lambda meta: (triton.cdiv(d, meta["BLOCK_D"]), triton.cdiv(k, bk))](
                x, dsd, dr, B, n, d, k, Wp, p, *x.stride(), BLOCK_K=bk, PREC=prec)
            tuned(_route_dense_dx_kernel, deterministic)[
                lambda meta: (triton.cdiv(B * n, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"]))](
                router, dsd, dx, B, n, d, k, Wp, p, *router.stride(), *dx.stride(), PREC=prec)

    db_out = db.to(bias.dtype) if has_bias else torch.empty(0, device=dev, dtype=weight.dtype)
    return dx.to(x.dtype), dr.to(router.dtype), dw.to(weight.dtype), db_out


# ---------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile (no graph break), differentiable, visible to FlopCounterMode


@torch.library.custom_op("pmoe::fused_fwd", mutates_args=())
def fused_fwd(x: Tensor, router: Tensor, weight: Tensor, bias: Optional[Tensor], p: int, l: int,
              combine: str, gate: str, activation: str, deterministic: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> y (B, n, out) x.dtype, idx (B, k, l) int64, gates (B, k, l) fp32, scores (B, k, n) fp32
    and lse (B, k) fp32 (meaningful for softmax_all only; scores is (B, k, 0) for the other gates)."""
    return _forward(x, router, weight, bias, p, l, combine, gate, activation, deterministic)


def _fake_outputs(x, weight, p, l, combine, gate, pooled):
    B, C, H, W = x.shape
    n = (H // p) * (W // p)
    n_scores = n if gate == "softmax_all" else 0
    k, m, _ = weight.shape
    out = k * m if combine == "concat" else m
    f32 = torch.float32
    y = x.new_empty(B, out) if pooled else x.new_empty(B, n, out)
    return (y, x.new_empty(B, k, l, dtype=torch.int64), x.new_empty(B, k, l, dtype=f32),
            x.new_empty(B, k, n_scores, dtype=f32), x.new_empty(B, k, dtype=f32))


@fused_fwd.register_fake
def _(x, router, weight, bias, p, l, combine, gate, activation, deterministic):
    return _fake_outputs(x, weight, p, l, combine, gate, pooled=False)


@torch.library.custom_op("pmoe::pooled_fwd", mutates_args=())
def pooled_fwd(x: Tensor, router: Tensor, weight: Tensor, bias: Optional[Tensor], p: int, l: int,
               combine: str, gate: str, activation: str, deterministic: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """fused_fwd summed over the n patches: -> out (B, out) x.dtype, then idx, gates, scores, lse
    as fused_fwd."""
    return _forward_pooled(x, router, weight, bias, p, l, combine, gate, activation, deterministic)


@pooled_fwd.register_fake
def _(x, router, weight, bias, p, l, combine, gate, activation, deterministic):
    return _fake_outputs(x, weight, p, l, combine, gate, pooled=True)


@torch.library.custom_op("pmoe::fused_bwd", mutates_args=())
def fused_bwd(dy: Tensor, x: Tensor, router: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor,
              gates: Tensor, scores: Optional[Tensor], lse: Optional[Tensor], p: int, l: int, combine: str,
              gate: str, activation: str, deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> dx (like x, contiguous), d router, d weight, d bias (empty when bias is None)."""
    return _backward(dy, x, router, weight, bias, idx, gates, scores, lse, p, l, combine, gate, activation,
                     deterministic)


@fused_bwd.register_fake
def _(dy, x, router, weight, bias, idx, gates, scores, lse, p, l, combine, gate, activation, deterministic):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(router),
            torch.empty_like(weight), db)


def _setup_context(ctx, inputs, output):
    x, router, weight, bias, p, l, combine, gate, activation, deterministic = inputs
    _, idx, gates, scores, lse = output
    dense = gate == "softmax_all"
    ctx.save_for_backward(x, router, weight, bias, idx, gates, scores if dense else None, lse if dense else None)
    ctx.cfg = (p, l, combine, gate, activation, deterministic)
    ctx.has_bias = bias is not None


def _autograd_backward(ctx, dy, _didx, _dgates, _dscores, _dlse):
    x, router, weight, bias, idx, gates, scores, lse = ctx.saved_tensors
    p, l, combine, gate, activation, deterministic = ctx.cfg
    dx, dr, dw, db = fused_bwd(dy, x, router, weight, bias, idx, gates, scores, lse, *ctx.cfg)
    dr = None if gate == "indicator" else dr  # the choice has no gradient and the gate is 1
    return dx, dr, dw, (db if ctx.has_bias else None), None, None, None, None, None, None


def _pooled_autograd_backward(ctx, dout, *_routing_grads):
    """out[b] = sum_j y[b, j], so dY[b, j] = dOut[b] for every patch j: a stride-0 view over the
    patches, read as such by the dpre kernel, never a (B, n, out) tensor."""
    x = ctx.saved_tensors[0]
    p = ctx.cfg[0]
    n = (x.shape[2] // p) * (x.shape[3] // p)
    dy = dout.contiguous().unsqueeze(1).expand(dout.shape[0], n, dout.shape[1])
    return _autograd_backward(ctx, dy, *_routing_grads)


fused_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)
pooled_fwd.register_autograd(_pooled_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# FLOPs (SPEC §4): the sparse work, so FlopCounterMode compares pMoE with a dense conv fairly.


def _fwd_flops(x_shape, router_shape, w_shape, p, l):
    B, _, H, W = x_shape
    n = (H // p) * (W // p)
    k, m, d = w_shape
    return 2 * B * n * d * k, 2 * B * k * l * d * m


@register_flop_formula([torch.ops.pmoe.fused_fwd, torch.ops.pmoe.pooled_fwd])
def _fused_fwd_flop(x_shape, router_shape, w_shape, bias_shape, p, l, *args, out_shape=None, **kwargs) -> int:
    """routing 2·B·n·d·k + experts 2·B·k·l·d·m (pooled too: its sum over patches is additions only,
    which FlopCounterMode does not count for the unpooled layer + torch.sum either)."""
    routing, experts = _fwd_flops(x_shape, router_shape, w_shape, p, l)
    return routing + experts


@register_flop_formula(torch.ops.pmoe.fused_bwd)
def _fused_bwd_flop(dy_shape, x_shape, router_shape, w_shape, bias_shape, idx_shape, gates_shape, scores_shape,
                    lse_shape, p, l, combine, gate, *args, out_shape=None, **kwargs) -> int:
    """Model FLOPs, counted like a conv's backward (2x its forward): dX and dW of the experts,
    2·(2·B·k·l·d·m), plus the router's gradient and its dX term through the gate: 2·(2·B·k·l·d)
    for softmax (selected rows), 2·(2·B·n·d·k) for softmax_all (every score has a gradient), 0 for
    indicator.  Not counted: the recomputation of the pre-activations (one more 2·B·k·l·d·m of
    hardware FLOPs, see the module docstring)."""
    routing, experts = _fwd_flops(x_shape, router_shape, w_shape, p, l)
    B, k = x_shape[0], w_shape[0]
    d = w_shape[2]
    if gate == "softmax":
        router_grad = 2 * (2 * B * k * l * d)
    elif gate == "softmax_all":
        router_grad = 2 * routing
    else:
        router_grad = 0
    return 2 * experts + router_grad


def pmoe_fused(x_map: Tensor, p: int, router: Tensor, weight2d: Tensor, bias: Optional[Tensor], l: int,
               combine: str, gate: str, activation: str, deterministic: bool) -> tuple[Tensor, Routing]:
    """The fused pMoE layer (see pmoe.functional for the argument checks).

    x_map: (B, C, H, W) any strides; router (k, d); weight2d (k, m, d); bias (k, m) or None.
    Returns y (B, n, k*m | m) contiguous in x's dtype and Routing(indices (B, k, l) int64 best
    first, gates (B, k, l) detached, in x's dtype like the torch path, n).
    """
    y, idx, gates, _, _ = fused_fwd(x_map, router, weight2d, bias, p, l, combine, gate, activation,
                                    deterministic)
    n = (x_map.shape[2] // p) * (x_map.shape[3] // p)
    return y, Routing(idx, gates.detach().to(x_map.dtype), n)


def pmoe_fused_pooled(x_map: Tensor, p: int, router: Tensor, weight2d: Tensor, bias: Optional[Tensor], l: int,
                      combine: str, gate: str, activation: str, deterministic: bool) -> tuple[Tensor, Routing]:
    """pmoe_fused's output summed over the n patches, (B, k*m | m) in x's dtype, and the Routing;
    the (B, n, out) map is never written (nor its gradient in backward)."""
    out, idx, gates, _, _ = pooled_fwd(x_map, router, weight2d, bias, p, l, combine, gate, activation,
                                       deterministic)
    n = (x_map.shape[2] // p) * (x_map.shape[3] // p)
    return out, Routing(idx, gates.detach().to(x_map.dtype), n)

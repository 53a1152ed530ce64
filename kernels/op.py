"""Launch glue, the custom ops `pmoe::fused_fwd` / `pmoe::fused_bwd`, their autograd and FLOPs.

Launch sequence (forward):  scores -> select (+ concat zero-fill) -> experts.
Launch sequence (backward): dpre (+ dG) -> gate bwd (dS) -> dX -> dW/db/d router -> [dense router
part, softmax_all only].

Saved for backward (beyond the inputs x, router, weight, bias, which autograd keeps anyway):
  idx   (B, k, l) int64   8·B·k·l bytes  (it is also the returned Routing.indices: no extra copy)
  gates (B, k, l) fp32    4·B·k·l bytes
  softmax_all only: scores (B, k, n) fp32 + lse (B, k) fp32, 4·B·k·(n+1) bytes
Pre-activations are recomputed in backward instead of saved: storing them would cost
B·k·l·m·elt bytes (e.g. B=128, k=4, l=16, m=160, fp32: 5.2 MB per layer) for one extra pass of
the expert GEMM (the same FLOPs as the forward's expert part, a third of the backward's).
Backward scratch: dPre (k, B·l, m) in x's dtype and an fp32 dX map, freed on return.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from pmoe.routing import Routing

from .backward import _dpre_kernel, _dw_kernel, _dx_det_kernel, _dx_kernel
from .forward import _expert_fwd_kernel, _expert_fwd_sum_det_kernel
from .routing import _gate_bwd_kernel, _route_dense_bwd_kernel, _scores_kernel, _select_kernel
from .utils import ACT_CODES, COMBINE_CODES, GATE_CODES

SELECT_BLOCK_N, SELECT_BLOCK_M = 64, 32


def _np2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots run as 3 TF32 products (tf32x3: fp32-level accuracy on tensor cores; exact "ieee"
    FMA dots need several times the registers and spill at useful tiles) unless the user allowed
    plain TF32 for matmuls, as torch does;
    for 16-bit inputs the setting is irrelevant."""
    if dtype == torch.float32:
        try:
            allow = torch.backends.cuda.matmul.allow_tf32
        except Exception:  # pragma: no cover - future torch without the flag
            allow = False
        return "tf32" if allow else "tf32x3"
    return "tf32"


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


def _forward(x, router, weight, bias, p, l, combine, gate, activation, deterministic):
    B, C, H, W, Wp, n, k, m, d = _dims(x, p, weight)
    dev = x.device
    prec = dot_precision(x.dtype)
    f32 = torch.float32

    scores = torch.empty(B, k, n, device=dev, dtype=f32)
    bk = router_block_k(k)
    _scores_kernel[lambda meta: (B, triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, bk))](
        x, router, scores, n, d, k, Wp, p, *x.stride(), *router.stride(), BLOCK_K=bk, PREC=prec)

    idx = torch.empty(B, k, l, device=dev, dtype=torch.int64)
    gates = torch.empty(B, k, l, device=dev, dtype=f32)
    lse = torch.empty(B, k, device=dev, dtype=f32)
    concat = combine == "concat"
    out_cols = k * m if concat else m
    if concat:
        y = torch.empty(B, n, out_cols, device=dev, dtype=x.dtype)  # every element written once
    else:
        y = torch.zeros(B, n, out_cols, device=dev, dtype=f32)  # accumulated in fp32
    n_pow2 = max(2, _np2(n))
    _select_kernel[(B, k)](scores, idx, gates, lse, y, n, k, l, m, out_cols,
                           N_POW2=n_pow2, GATE=GATE_CODES[gate], ZERO_FILL=concat,
                           BLOCK_N=SELECT_BLOCK_N, BLOCK_M=SELECT_BLOCK_M, num_warps=select_warps(n_pow2))

    b_t, sbk, sbm, has_bias = _bias_args(bias, x)
    args = (x, weight, b_t, idx, gates, y, B, n, k, l, m, d, Wp, p, *x.stride(), *weight.stride(), sbk, sbm,
            out_cols)
    if not concat and deterministic:
        _expert_fwd_sum_det_kernel[lambda meta: (B, triton.cdiv(m, meta["BLOCK_M"]))](
            *args, HAS_BIAS=has_bias, ACT=ACT_CODES[activation], PREC=prec)
    else:
        _expert_fwd_kernel[lambda meta: (triton.cdiv(B * l, meta["BLOCK_R"]), triton.cdiv(m, meta["BLOCK_M"]), k)](
            *args, HAS_BIAS=has_bias, ACT=ACT_CODES[activation], COMBINE=COMBINE_CODES[combine], PREC=prec)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, idx, gates, scores, lse


def _backward(dy, x, router, weight, bias, idx, gates, scores, lse, p, l, combine, gate, activation,
              deterministic):
    B, C, H, W, Wp, n, k, m, d = _dims(x, p, weight)
    dev = x.device
    prec = dot_precision(x.dtype)
    f32 = torch.float32
    dy = dy.contiguous()
    out_cols = dy.shape[-1]
    b_t, sbk, sbm, has_bias = _bias_args(bias, x)

    dpre = torch.empty(k, B * l, m, device=dev, dtype=x.dtype)
    dg = torch.empty(B, k, l, device=dev, dtype=f32)
    _dpre_kernel[lambda meta: (triton.cdiv(B * l, meta["BLOCK_R"]), k)](
        x, weight, b_t, idx, gates, dy, dpre, dg, B, n, k, l, m, d, Wp, p, *x.stride(), *weight.stride(),
        sbk, sbm, out_cols, HAS_BIAS=has_bias, ACT=ACT_CODES[activation], COMBINE=COMBINE_CODES[combine],
        PREC=prec)

    has_ds = gate != "indicator"
    dense = gate == "softmax_all"
    ds = torch.empty(B, k, l, device=dev, dtype=f32)
    dsd = torch.empty(B, k, n, device=dev, dtype=f32) if dense else ds
    if has_ds:
        _gate_bwd_kernel[(B, k)](dg, gates, scores if dense else dg, lse if dense else dg, ds, dsd, n, k, l,
                                 L_POW2=max(2, _np2(l)), N_POW2=max(2, _np2(n)) if dense else 2,
                                 GATE=GATE_CODES[gate])

    dx = torch.zeros(B, C, H, W, device=dev, dtype=f32)
    dx_args = (dpre, weight, router, ds, idx, dx, B, n, k, l, m, d, Wp, p, *weight.stride(), *router.stride(),
               *dx.stride())
    if deterministic:
        _dx_det_kernel[lambda meta: (B, triton.cdiv(d, meta["BLOCK_D"]))](*dx_args, HAS_DS=has_ds, PREC=prec)
    else:
        _dx_kernel[lambda meta: (triton.cdiv(B * l, meta["BLOCK_R"]), triton.cdiv(d, meta["BLOCK_D"]), k)](
            *dx_args, HAS_DS=has_ds, PREC=prec)

    dw = torch.empty(k, m, d, device=dev, dtype=f32)
    db = torch.empty(k, m, device=dev, dtype=f32) if has_bias else dw
    dr = torch.zeros(k, d, device=dev, dtype=f32)
    _dw_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"]), k)](
        x, idx, dpre, ds, dw, db, dr, B, n, k, l, m, d, Wp, p, *x.stride(),
        HAS_BIAS=has_bias, HAS_DS=has_ds, PREC=prec)

    if dense:
        _route_dense_bwd_kernel[lambda meta: (triton.cdiv(d, meta["BLOCK_D"]),)](
            x, router, dsd, dx, dr, B, n, d, k, Wp, p, *x.stride(), *router.stride(), *dx.stride(),
            BLOCK_K=max(16, _np2(k)), PREC=prec)

    db_out = db.to(bias.dtype) if has_bias else torch.empty(0, device=dev, dtype=weight.dtype)
    return dx.to(x.dtype), dr.to(router.dtype), dw.to(weight.dtype), db_out


# ---------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile (no graph break), differentiable, visible to FlopCounterMode


@torch.library.custom_op("pmoe::fused_fwd", mutates_args=())
def fused_fwd(x: Tensor, router: Tensor, weight: Tensor, bias: Optional[Tensor], p: int, l: int,
              combine: str, gate: str, activation: str, deterministic: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> y (B, n, out) x.dtype, idx (B, k, l) int64, gates (B, k, l) fp32, scores (B, k, n) fp32,
    lse (B, k) fp32 (meaningful for softmax_all only)."""
    return _forward(x, router, weight, bias, p, l, combine, gate, activation, deterministic)


@fused_fwd.register_fake
def _(x, router, weight, bias, p, l, combine, gate, activation, deterministic):
    B, C, H, W = x.shape
    n = (H // p) * (W // p)
    k, m, _ = weight.shape
    out = k * m if combine == "concat" else m
    f32 = torch.float32
    return (x.new_empty(B, n, out), x.new_empty(B, k, l, dtype=torch.int64), x.new_empty(B, k, l, dtype=f32),
            x.new_empty(B, k, n, dtype=f32), x.new_empty(B, k, dtype=f32))


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


fused_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# FLOPs (SPEC §4): the sparse work, so FlopCounterMode compares pMoE with a dense conv fairly.


def _fwd_flops(x_shape, router_shape, w_shape, p, l):
    B, _, H, W = x_shape
    n = (H // p) * (W // p)
    k, m, d = w_shape
    return 2 * B * n * d * k, 2 * B * k * l * d * m


@register_flop_formula(torch.ops.pmoe.fused_fwd)
def _fused_fwd_flop(x_shape, router_shape, w_shape, bias_shape, p, l, *args, out_shape=None, **kwargs) -> int:
    """routing 2·B·n·d·k + experts 2·B·k·l·d·m."""
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

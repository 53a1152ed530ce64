"""The custom ops `pmoe::fused_fwd` (pooled or not) and `pmoe::fused_bwd`: their fakes, autograd
and FLOP formulas.  Their implementations are the launchers, launch.forward and launch.backward.

Forward: one launch (route and experts, forward.py) where an image's scores fit one program,
else three.  Backward: two launches (backward.py), plus the gate backward where it is not fused
and the dense router term for softmax_all.  Every config comes from configs.py, a function of
the shape: deterministic=True needs no special launch, and only the sum combine changes for it
(experts added in order instead of by atomics).

Saved for backward (beyond x, router, weight, bias, which autograd keeps anyway):
  idx   (B, k, l) int64   8·B·k·l bytes  (also the returned Routing.indices: no extra copy)
  gates (B, k, l) fp32    4·B·k·l bytes
  inv   (B, k, n) int32   4·B·k·n bytes  (patch -> rank: the dX gather)
  softmax_all only: scores (B, k, n) fp32 + lse (B, k) fp32
  pre   (B, k, l, m) x's dtype the pre-activations, when the caller will differentiate (save_pre,
                               which pmoe.functional sets from grad mode and requires_grad): the
                               backward's tiles then read them instead of re-gathering their rows
                               and re-running the GEMM, which read each expert's weights twice
                               (without them, e.g. fused_fwd called with save_pre=False, it
                               recomputes them).
The NCHW row copy is rebuilt in backward (for dW).  Backward scratch: dPre (k, B·l, m) in x's
dtype, the dW split partials.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import launch

# The ops run the launchers themselves (no wrapper frame of their own): a layer call reaches the
# kernel launches as PMoEConv2d.forward -> pmoe_conv2d -> the backend table's _triton -> the
# device guard -> launch.forward.  Arguments: the tensors, then pmoe.vocab.Options' fields.
fused_fwd = torch.library.custom_op("pmoe::fused_fwd", launch.forward, mutates_args=())
fused_bwd = torch.library.custom_op("pmoe::fused_bwd", launch.backward, mutates_args=())


def _fake_outputs(x, weight, p, l, combine, gate, pooled, save_pre):
    B, C, H, W = x.shape
    n = (H // p) * (W // p)
    k, m, _ = weight.shape
    out = k * m if combine == "concat" else m
    f32 = torch.float32
    y = x.new_empty(B, out) if pooled else x.new_empty(B, n, out)
    return (y, x.new_empty(B, k, l, dtype=torch.int64), x.new_empty(B, k, l), x.new_empty(B, k, l, dtype=f32),
            x.new_empty(B, k, n, dtype=torch.int32), x.new_empty(B, k, n if gate == "softmax_all" else 0, dtype=f32),
            x.new_empty(B, k, dtype=f32), x.new_empty(B, k, l, m) if save_pre else x.new_empty(0))


@fused_fwd.register_fake
def _(x, router, weight, bias, p, l, combine, gate, activation, deterministic, pooled, save_pre=False):
    return _fake_outputs(x, weight, p, l, combine, gate, pooled, save_pre)


@fused_bwd.register_fake
def _(dy, x, router, weight, bias, idx, gates, inv, scores, lse, pre, p, l, combine, gate, activation):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(x), torch.empty_like(router), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    x, router, weight, bias, p, l, combine, gate, activation, deterministic, pooled, *_save_pre = inputs
    _, idx, _, gates, inv, scores, lse, pre = output
    ctx.save_for_backward(x, router, weight, bias, idx, gates, inv, scores, lse, pre)
    ctx.cfg = (p, l, combine, gate, activation)
    ctx.has_bias, ctx.pooled = bias is not None, pooled
    ctx.set_materialize_grads(False)  # the routing outputs have no gradient: no zero tensors for them


def _autograd_backward(ctx, dy, *_routing_grads):
    if dy is None:  # only the routing outputs were used
        return (None,) * 12
    if ctx.pooled:
        dy = _pooled_dy(dy, ctx.saved_tensors[0], ctx.cfg[0])
    if torch.is_grad_enabled() and dy.requires_grad:
        raise RuntimeError("the fused pMoE op has no double backward (create_graph=True); run the layer with "
                           "backend='torch' for second derivatives (docs/ROBUSTNESS.md)")
    x, router, weight, bias, idx, gates, inv, scores, lse, pre = ctx.saved_tensors
    dx, dr, dw, db = fused_bwd(dy, x, router, weight, bias, idx, gates, inv, scores, lse, pre, *ctx.cfg)
    gate = ctx.cfg[3]
    dr = None if gate == "indicator" else dr  # the choice has no gradient and the gate is 1
    return dx, dr, dw, (db if ctx.has_bias else None), *(None,) * 8


def _pooled_dy(dout, x, p):
    """out[b] = sum_j y[b, j], so dY[b, j] = dOut[b] for every patch j: a stride-0 view over the
    patches, read as such by the kernels, never a (B, n, out) tensor."""
    n = (x.shape[2] // p) * (x.shape[3] // p)
    return dout.contiguous().unsqueeze(1).expand(dout.shape[0], n, dout.shape[1])


fused_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# FLOPs (SPEC §4): the sparse work, so FlopCounterMode compares pMoE with a dense conv fairly.


def _fwd_flops(x_shape, w_shape, p, l):
    B, _, H, W = x_shape
    n = (H // p) * (W // p)
    k, m, d = w_shape
    return 2 * B * n * d * k, 2 * B * k * l * d * m


@register_flop_formula(torch.ops.pmoe.fused_fwd)
def _fused_fwd_flop(x_shape, router_shape, w_shape, bias_shape, p, l, *args, out_shape=None, **kwargs) -> int:
    """routing 2·B·n·d·k + experts 2·B·k·l·d·m (pooled too: its sum over patches is additions only,
    which FlopCounterMode does not count for the unpooled layer + torch.sum either)."""
    routing, experts = _fwd_flops(x_shape, w_shape, p, l)
    return routing + experts


@register_flop_formula(torch.ops.pmoe.fused_bwd)
def _fused_bwd_flop(dy_shape, x_shape, router_shape, w_shape, bias_shape, idx_shape, gates_shape, inv_shape,
                    scores_shape, lse_shape, pre_shape, p, l, combine, gate, *args, out_shape=None,
                    **kwargs) -> int:
    """Model FLOPs, counted like a conv's backward (2x its forward): dX and dW of the experts,
    2·(2·B·k·l·d·m), plus the router's gradient and its dX term through the gate: 2·(2·B·k·l·d)
    for softmax (selected rows), 2·(2·B·n·d·k) for softmax_all (every score has a gradient), 0 for
    indicator.  Not counted: the pre-activations' recompute where they were not saved (one more
    2·B·k·l·d·m of hardware FLOPs) nor the gather of dX rows to their patches."""
    routing, experts = _fwd_flops(x_shape, w_shape, p, l)
    B, k, d = x_shape[0], w_shape[0], w_shape[2]
    if gate == "softmax":
        router_grad = 2 * (2 * B * k * l * d)
    elif gate == "softmax_all":
        router_grad = 2 * routing
    else:
        router_grad = 0
    return 2 * experts + router_grad

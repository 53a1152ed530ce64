"""Fused Triton kernels for pMoE, installed as `pmoe.kernels` (issue: fused Triton kernels).

Importing this package imports triton; `pmoe` itself imports it only when backend="triton".

    y, routing = pmoe_fused(x_map, p, router, weight2d, bias, l, combine, gate, activation, deterministic)
    pooled, routing = pmoe_fused_pooled(...)   # the same summed over patches: (B, out), no map written

Files: utils.py (jit helpers: patch addressing, selection keys, activations), routing.py
(scores, top-l selection + gates, router backward), forward.py (expert GEMM + combine, or its
pooled epilogue), backward.py (dPre, dX, dW), op.py (launches, custom ops, autograd, FLOP formulas),
registry.py (every kernel with its signature and configs, for bench/compile_report.py).
"""
from .op import fused_bwd, fused_fwd, pmoe_fused, pmoe_fused_pooled, pooled_fwd

__all__ = ["pmoe_fused", "pmoe_fused_pooled", "fused_fwd", "pooled_fwd", "fused_bwd"]

"""Fused Triton kernels for pMoE.  They live in the top-level `kernels/` directory of the
repository (the package's specified layout) and are installed as `pmoe.kernels`; importing this
package imports triton, which `pmoe` itself does only for backend="triton".

    y, routing = pmoe_fused(x_map, p, router, weight2d, bias, l, combine, gate, activation, deterministic)
    pooled, routing = pmoe_fused_pooled(...)   # the same summed over patches: (B, out), no map written

Read top-down: op.py (public entry, custom ops, autograd, FLOP formulas) -> launch.py (buffers,
grids) -> forward.py / backward.py / routing.py (the kernels) -> utils.py (jit helpers).
configs.py holds the launch configurations, modes.py the named mode codes, registry.py every
kernel variant for bench/compile_report.py.
"""
from .op import fused_bwd, fused_fwd, pmoe_fused, pmoe_fused_pooled, pooled_fwd

__all__ = ["pmoe_fused", "pmoe_fused_pooled", "fused_fwd", "pooled_fwd", "fused_bwd"]

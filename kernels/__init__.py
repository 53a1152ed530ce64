"""Fused Triton kernels for pMoE.  They live in the top-level `kernels/` directory of the
repository (the package's specified layout) and are installed as `pmoe.kernels`; importing this
package imports triton, which `pmoe` itself does only for backend="triton".

    y, idx, gates, *saved = fused_fwd(x_map, router, weight2d, bias, *options.op_args())
    # y: (B, n, out), or with options.pooled its sum over the patches (B, out), no map written

pmoe.functional's backend table calls it (its "triton" entry); docs/ARCHITECTURE.md has the map.
Read top-down: op.py (the custom ops, autograd, FLOP formulas) -> launch.py (buffers, grids, the
ops' implementations) -> forward.py / backward.py / routing.py (the kernels) -> utils.py (jit helpers).
configs.py holds the launch configurations, modes.py the named mode codes, registry.py every
kernel variant for bench/compile_report.py.
"""
from .op import fused_bwd, fused_fwd

__all__ = ["fused_fwd", "fused_bwd"]

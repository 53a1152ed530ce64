"""Every pMoE kernel with its argument types, the constexpr variants worth compiling and its
autotune configs, so `bench/compile_report.py` can compile all of them to cubin without a GPU.

signature(dtype) gives ASTSource's {arg: type} ("*bf16", "i32", "constexpr", ...): pointer args
take the data dtype unless listed in `ptrs` (fixed types: fp32 buffers, int64 indices).
`variants` are (label, constexprs (a "num_warps" key sets the launch's warps for kernels without
configs, as op.py does), pointer overrides) covering every branch of the kernel's
constexpr code (gate, combine, activation, bias, router-gradient terms) at representative sizes;
PREC is filled in from the dtype (tf32x3 for fp32, tf32 otherwise, as op.dot_precision does).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import triton

from . import backward, forward, routing


@dataclass
class KernelSpec:
    name: str
    kernel: object  # a JITFunction or an Autotuner wrapping one
    ptrs: dict  # pointer arg -> fixed element type ("fp32", "i64"); others use the data dtype
    variants: list  # [(label, {constexpr: value}, {ptr: type override})]
    configs: list = field(default_factory=list)  # triton.Config list; [] = launched with fixed meta
    num_warps: int = 4  # for kernels without configs

    @property
    def fn(self):
        k = self.kernel
        return k if isinstance(k, triton.runtime.jit.JITFunction) else k.fn

    def signature(self, dtype: str, ptr_overrides: dict | None = None) -> dict:
        ptr_overrides = ptr_overrides or {}
        sig = {}
        for param in self.fn.params:
            name = param.name
            if param.is_constexpr:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + ptr_overrides.get(name, self.ptrs.get(name, dtype))
            else:
                sig[name] = "i32"
        return sig

    def launch_configs(self, dtype: str = "bf16", arch: int = 90):
        """[(label, meta constexprs, num_warps, num_stages)] that autotuning may pick for this dtype
        on this arch (fp32 before sm_90: the first config only, see utils.prune_fp32_pre_hopper)."""
        if not self.configs:
            return [("fixed", {}, self.num_warps, 2)]
        configs = self.configs[:1] if (dtype == "fp32" and arch < 90) else self.configs
        out = []
        for cfg in configs:
            label = "x".join(str(v) for v in cfg.kwargs.values()) + f"/w{cfg.num_warps}s{cfg.num_stages}"
            out.append((label, dict(cfg.kwargs), cfg.num_warps, cfg.num_stages))
        return out


_F32, _I64 = "fp32", "i64"

KERNELS = [
    KernelSpec("scores", routing._scores_kernel, {"scores_ptr": _F32},
               [("k<=16", {"BLOCK_K": 16}, {}), ("k<=64", {"BLOCK_K": 64}, {})],
               routing.SCORES_CONFIGS),
    KernelSpec("select", routing._select_kernel,
               {"scores_ptr": _F32, "idx_ptr": _I64, "gates_ptr": _F32, "lse_ptr": _F32},
               [("n<=256,softmax,concat", dict(N_POW2=256, GATE=0, ZERO_FILL=True, BLOCK_N=64, BLOCK_M=32), {}),
                ("n<=4096,softmax_all,sum", dict(N_POW2=4096, GATE=2, ZERO_FILL=False, BLOCK_N=64, BLOCK_M=32, num_warps=8),
                 {"y_ptr": _F32})]),
    KernelSpec("expert_fwd", forward._expert_fwd_kernel, {"idx_ptr": _I64, "gates_ptr": _F32},
               [("concat,gelu,bias", dict(HAS_BIAS=True, ACT=1, COMBINE=0), {}),
                ("sum,relu", dict(HAS_BIAS=False, ACT=0, COMBINE=1), {"y_ptr": _F32})],
               forward.EXPERT_FWD_CONFIGS),
    KernelSpec("expert_fwd_sum_det", forward._expert_fwd_sum_det_kernel,
               {"idx_ptr": _I64, "gates_ptr": _F32, "y_ptr": _F32},
               [("silu,bias", dict(HAS_BIAS=True, ACT=2), {})],
               forward.EXPERT_FWD_DET_CONFIGS),
    KernelSpec("dpre", backward._dpre_kernel, {"idx_ptr": _I64, "gates_ptr": _F32, "dg_ptr": _F32},
               [("concat,gelu,bias", dict(HAS_BIAS=True, ACT=1, COMBINE=0), {}),
                ("sum,silu", dict(HAS_BIAS=False, ACT=2, COMBINE=1), {})],
               backward.DPRE_CONFIGS),
    KernelSpec("gate_bwd", routing._gate_bwd_kernel, {p: _F32 for p in (
        "dg_ptr", "gates_ptr", "scores_ptr", "lse_ptr", "ds_ptr", "dsd_ptr")},
               [("softmax", dict(L_POW2=64, N_POW2=2, GATE=0), {}),
                ("softmax_all", dict(L_POW2=64, N_POW2=4096, GATE=2), {})]),
    KernelSpec("dx", backward._dx_kernel, {"ds_ptr": _F32, "idx_ptr": _I64, "dx_ptr": _F32},
               [("router-grad", dict(HAS_DS=True), {})], backward.DX_CONFIGS),
    KernelSpec("dx_det", backward._dx_det_kernel, {"ds_ptr": _F32, "idx_ptr": _I64, "dx_ptr": _F32},
               [("router-grad", dict(HAS_DS=True), {})], backward.DX_DET_CONFIGS),
    KernelSpec("dw", backward._dw_kernel,
               {"idx_ptr": _I64, "ds_ptr": _F32, "dw_ptr": _F32, "db_ptr": _F32, "dr_ptr": _F32},
               [("bias,router-grad", dict(HAS_BIAS=True, HAS_DS=True), {})], backward.DW_CONFIGS),
    KernelSpec("route_dense_bwd", routing._route_dense_bwd_kernel,
               {"dsd_ptr": _F32, "dx_ptr": _F32, "dr_ptr": _F32},
               [("k<=16", dict(BLOCK_K=16), {}), ("k<=64", dict(BLOCK_K=64), {})],
               routing.ROUTE_BWD_CONFIGS),
]


def by_name(name: str) -> KernelSpec:
    for spec in KERNELS:
        if spec.name == name:
            return spec
    raise KeyError(name)


def dot_precision_for(dtype: str) -> str:
    return "tf32x3" if dtype == "fp32" else "tf32"


__all__ = ["KERNELS", "KernelSpec", "by_name", "dot_precision_for", "triton"]

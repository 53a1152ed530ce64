"""Every pMoE kernel with its argument types, the constexpr variants worth compiling and its
autotune configs, so `bench/compile_report.py` can compile all of them to cubin without a GPU.

signature(dtype) gives ASTSource's {arg: type} ("*bf16", "i32", "constexpr", ...): pointer args
take the data dtype unless listed in `ptrs` (fixed types: fp32 buffers, int64 indices).
`variants` are (label, constexprs (a "num_warps" key sets the launch's warps for kernels without
configs, as op.py does), pointer overrides) covering every branch of the kernel's
constexpr code (gate, combine, activation, bias, router-gradient terms) at representative sizes;
PREC is filled in from the dtype (tf32x3 for fp32, tf32 otherwise, as op.dot_precision does).

The launcher specialises integer arguments as a real launch sees them: a value of 1 becomes a
constexpr, a multiple of 16 gets a divisibility hint (vectorised, aligned accesses: different
registers).  The overrides dict also carries such specialisations for int args (1 or 16; a 1
must also be in the constexprs); every kernel gets one "contig" variant (`_contiguous`): contiguous
x / weight / router / bias / dX (unit inner strides), the other strides and sizes multiples of 16,
as for a (32, 64, 32, 32) map with p = 2, k = 4, m = 32, l = 64.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import triton

from . import backward, forward, routing


@dataclass
class KernelSpec:
    name: str
    kernel: object  # a JITFunction or an Autotuner wrapping one
    ptrs: dict  # pointer arg -> fixed element type ("fp32", "i64"); others use the data dtype
    variants: list  # [(label, {constexpr: value}, {ptr: type override | int arg: 1 or 16})]
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
            elif ptr_overrides.get(name) == 1:  # the launcher turns an int equal to 1 into a constexpr
                sig[name] = "constexpr"
            else:
                sig[name] = "i32"
        return sig

    def int_attrs(self, sig: dict, overrides: dict | None = None) -> dict:
        """ASTSource attrs for the int args a variant declares multiples of 16 (the launcher's
        "D" specialisation: tt.divisibility 16), keyed like the pointer attrs."""
        overrides = overrides or {}
        return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
                if ty == "i32" and overrides.get(name) == 16}

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
                 {"y_ptr": _F32}),
                # the cap (routing.SELECT_MAX_N; op.select_warps gives 8 warps): the most registers
                ("n<=cap,softmax_all,concat", dict(N_POW2=routing.SELECT_MAX_N, GATE=2, ZERO_FILL=True, BLOCK_N=64,
                                                   BLOCK_M=32, num_warps=8), {}),
                ("n<=cap,softmax_all,sum", dict(N_POW2=routing.SELECT_MAX_N, GATE=2, ZERO_FILL=False, BLOCK_N=64,
                                                BLOCK_M=32, num_warps=8), {"y_ptr": _F32})]),
    # the fused route up to its lane cap (routing.ROUTE_MAX_KEYS; op.route_warps: 8 warps at 1024)
    KernelSpec("route", routing._route_kernel,
               {"idx_ptr": _I64, "gates_ptr": _F32, "scores_ptr": _F32, "lse_ptr": _F32},
               [(f"n<={n},k<={bk},{label}", dict(N_POW2=n, BLOCK_K=bk, GATE=gate, ZERO_FILL=zero_fill,
                                                   STORE_SCORES=gate == 2, BLOCK_D=routing.ROUTE_BLOCK_D, BLOCK_M=32,
                                                   num_warps=4 if n * bk < 1024 else 8),
                 {} if zero_fill else {"y_ptr": _F32})
                for n, bk, gate, zero_fill, label in [(16, 16, 0, True, "softmax,concat"),
                                                      (32, 16, 2, True, "softmax_all,concat"),
                                                      (64, 16, 0, True, "softmax,concat"),
                                                      (16, 64, 1, True, "indicator,concat"),
                                                      (32, 32, 2, False, "softmax_all,sum")]]),
    KernelSpec("expert_fwd", forward._expert_fwd_kernel, {"idx_ptr": _I64, "gates_ptr": _F32},
               [("concat,gelu,bias", dict(HAS_BIAS=True, ACT=1, COMBINE=0), {}),
                ("sum,relu", dict(HAS_BIAS=False, ACT=0, COMBINE=1), {"y_ptr": _F32})],
               forward.EXPERT_FWD_CONFIGS),
    KernelSpec("expert_fwd_sum_det", forward._expert_fwd_sum_det_kernel,
               {"idx_ptr": _I64, "gates_ptr": _F32, "y_ptr": _F32},
               [("silu,bias", dict(HAS_BIAS=True, ACT=2), {})],
               forward.EXPERT_FWD_DET_CONFIGS),
    KernelSpec("expert_pool", forward._expert_pool_kernel, {"idx_ptr": _I64, "gates_ptr": _F32, "out_ptr": _F32},
               [("concat,gelu,bias", dict(HAS_BIAS=True, ACT=1, COMBINE=0), {}),
                ("sum,relu", dict(HAS_BIAS=False, ACT=0, COMBINE=1), {})],
               forward.EXPERT_FWD_CONFIGS),
    KernelSpec("expert_pool_det", forward._expert_pool_det_kernel, {"idx_ptr": _I64, "gates_ptr": _F32},
               [("concat,relu", dict(HAS_BIAS=False, ACT=0, COMBINE=0), {}),
                ("sum,silu,bias", dict(HAS_BIAS=True, ACT=2, COMBINE=1), {})],
               forward.EXPERT_FWD_DET_CONFIGS),
    KernelSpec("dpre", backward._dpre_kernel, {"idx_ptr": _I64, "gates_ptr": _F32, "dg_ptr": _F32},
               [("concat,gelu,bias", dict(HAS_BIAS=True, ACT=1, COMBINE=0), {}),
                ("sum,silu", dict(HAS_BIAS=False, ACT=2, COMBINE=1), {})],
               backward.DPRE_CONFIGS),
    KernelSpec("gate_bwd", routing._gate_bwd_kernel, {p: _F32 for p in (
        "dg_ptr", "gates_ptr", "scores_ptr", "lse_ptr", "ds_ptr", "dsd_ptr")},
               [("softmax", dict(GATE=0, BLOCK=64), {}),
                ("softmax_all", dict(GATE=2, BLOCK=routing.GATE_BWD_BLOCK), {})]),
    KernelSpec("dx", backward._dx_kernel, {"ds_ptr": _F32, "idx_ptr": _I64, "dx_ptr": _F32},
               [("router-grad", dict(HAS_DS=True), {})], backward.DX_CONFIGS),
    KernelSpec("dx_det", backward._dx_det_kernel, {"ds_ptr": _F32, "idx_ptr": _I64, "dx_ptr": _F32},
               [("router-grad", dict(HAS_DS=True), {})], backward.DX_DET_CONFIGS),
    KernelSpec("dw", backward._dw_kernel,
               {"idx_ptr": _I64, "ds_ptr": _F32, "dw_ptr": _F32, "db_ptr": _F32, "dr_ptr": _F32},
               [("bias,router-grad", dict(HAS_BIAS=True, HAS_DS=True), {})], backward.DW_CONFIGS),
    KernelSpec("route_dense_dr", routing._route_dense_dr_kernel, {"dsd_ptr": _F32, "dr_ptr": _F32},
               [("k<=16", dict(BLOCK_K=16), {}), ("k>=64", dict(BLOCK_K=64), {})],
               routing.ROUTE_BWD_CONFIGS),
    KernelSpec("route_dense_dx", routing._route_dense_dx_kernel, {"dsd_ptr": _F32, "dx_ptr": _F32},
               [("any k", {}, {})], routing.ROUTE_DX_CONFIGS),
]

# the "contig" specialisation (see the module docstring): unit strides and multiples of 16
_UNIT_STRIDES = ("sxw", "swd", "srd", "sbm", "sdw")
_MULTIPLES_OF_16 = ("sxb", "sxc", "sxh", "swk", "swm", "srk", "sbk", "sdb", "sdc", "sdh", "sdyb", "sdyn",
                    "B", "n", "d", "m", "l", "Wp", "out_cols")


def _contiguous(spec: KernelSpec):
    label, constexprs, overrides = spec.variants[0]
    fn = spec.kernel
    while hasattr(fn, "fn"):  # Autotuner -> JITFunction (or the interpreter's) -> the Python function
        fn = fn.fn
    names = list(inspect.signature(fn).parameters)  # (the listed names are all plain int args)
    ones = {name: 1 for name in names if name in _UNIT_STRIDES}
    sixteens = {name: 16 for name in names if name in _MULTIPLES_OF_16}
    return ("contig," + label, {**constexprs, **ones}, {**overrides, **ones, **sixteens})


for _spec in KERNELS:
    _spec.variants.append(_contiguous(_spec))


def by_name(name: str) -> KernelSpec:
    for spec in KERNELS:
        if spec.name == name:
            return spec
    raise KeyError(name)


def dot_precision_for(dtype: str) -> str:
    return "tf32x3" if dtype == "fp32" else "tf32"


__all__ = ["KERNELS", "KernelSpec", "by_name", "dot_precision_for", "triton"]

"""Host launchers: buffers, configs (configs.py) and grids for the forward and backward kernels.

forward(): one launch (forward.py, FWD_FUSED) when an image's scores fit one program
(configs.route_fits); else the split route (_scores_kernel, then _select_kernel or select_torch
for rows longer than routing.SELECT_MAX_N) and an experts-only launch.
backward(): see backward.py.
Every launch runs with x's CUDA device current (device_guard) inside a pmoe.profiling.nvtx_range.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from pmoe.profiling import nvtx_range
from pmoe.routing import gate_values

from . import configs
from .forward import _forward_kernel
from .modes import FWD_EXPERTS, FWD_FUSED, SRC_MAP, SRC_ROWS, activation_code, combine_code, gate_code
from .routing import SELECT_BLOCK_N, SELECT_MAX_N, _scores_kernel, _select_kernel
from .utils import key_patch_torch, key_score_torch, selection_keys_torch

# "auto" (configs.route_fits decides), "fused" or "split": which route runs (tests and
# benchmarks set it to compare the two; the results are the same bits either way).
ROUTE = "auto"
# A callable that receives each launch (kernel, grid, args, kwargs) in place of run() launching
# it (it may launch it itself: bench/gpu_timing.py times each launch so), and the GPU generation
# to choose configs for.  registry.record sets both, so the compile report compiles exactly what
# these launchers launch.
RECORDER = None
FORCE_SM = None


def run(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), or hand it to the RECORDER; every launch may use as many
    registers as let one CTA fit an SM, at most 255 (configs.max_registers)."""
    kwargs.setdefault("maxnreg", configs.max_registers(kwargs.get("num_warps", 4)))
    if RECORDER is not None:
        RECORDER(kernel, grid, args, kwargs)
        return
    kernel[grid](*args, **kwargs)


@dataclass(frozen=True)
class Problem:
    """The sizes of one call."""
    B: int
    C: int
    H: int
    W: int
    p: int
    k: int
    m: int
    l: int

    @property
    def Wp(self) -> int:
        return self.W // self.p

    @property
    def n(self) -> int:
        return (self.H // self.p) * self.Wp

    @property
    def d(self) -> int:
        return self.C * self.p * self.p

    @classmethod
    def of(cls, x: Tensor, p: int, weight: Tensor, l: int) -> "Problem":
        B, C, H, W = x.shape
        k, m, _ = weight.shape
        return cls(B, C, H, W, p, k, m, l)


def device_guard(x: Tensor):
    """Triton launches on the current CUDA device and custom ops add no DeviceGuard: make x's
    device current for the launches (CPU tensors, i.e. the interpreter: nothing to do)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def on_device(launcher):
    """Decorator: run the launcher under device_guard of its first argument (x, or dy on x's
    device)."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        with device_guard(args[0]):
            return launcher(*args, **kwargs)
    return guarded


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
    FMA dots need several times the registers) unless the user allowed plain TF32 for matmuls,
    as torch does; for 16-bit inputs the setting is irrelevant."""
    if dtype == torch.float32:
        return "tf32" if _matmul_allows_tf32() else "tf32x3"
    return "tf32"


def capability(x: Tensor) -> int:
    """The GPU generation configs are chosen for (sm_90 under the interpreter: it runs what an
    H100 would)."""
    if FORCE_SM is not None:
        return FORCE_SM
    if x.is_cuda:
        major, minor = torch.cuda.get_device_capability(x.device)
        return 10 * major + minor
    return 90


def gather_source(x: Tensor) -> int:
    """SRC_MAP when x's channels are its innermost axis (channels-last maps, the token form):
    a patch row is then K-contiguous in x itself; else SRC_ROWS (the route pass copies rows)."""
    return SRC_MAP if x.shape[1] > 1 and x.stride(1) == 1 else SRC_ROWS


_SYNC: dict = {}


def sync_counters(x: Tensor, size: int) -> Tensor:
    """A cached int32 buffer of at least `size` zeros for x's device and current stream.  The
    kernels that take tickets leave it zeroed when they end (utils.finish_ticket), so it is
    allocated (one fill) only the first time, or when a launch needs more counters."""
    stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0
    key = (x.device, stream)
    buf = _SYNC.get(key)
    if buf is None or buf.numel() < size:
        buf = _SYNC[key] = torch.zeros(max(size, 1024), device=x.device, dtype=torch.int32)
    return buf


def use_fused_route(P: Problem) -> bool:
    if ROUTE not in ("auto", "fused", "split"):
        raise ValueError(f"pmoe.kernels.launch.ROUTE must be 'auto', 'fused' or 'split', got {ROUTE!r}")
    fits = configs.route_fits(P.n, P.k)
    if ROUTE == "fused" and not fits:
        raise ValueError(f"ROUTE='fused' needs k <= 64 and next_pow2(n) * next_pow2(k) <= "
                         f"{configs.ROUTE_MAX_LANES}, got n={P.n}, k={P.k}")
    return fits and ROUTE != "split"


def select_torch(scores: Tensor, l: int, gate: str, lse: Tensor, inv: Tensor, y: Optional[Tensor]):
    """_select_kernel in torch ops, for rows longer than routing.SELECT_MAX_N: the same int64
    keys (utils.selection_keys_torch, the jit helper's twin) so the same patches in the same
    order; the gates and lse by the torch path's formula (pmoe.routing.gate_values) from the
    same fp32 scores (equal to the kernel's up to summation order / exp rounding); inv; and y
    zeroed whole (the experts then overwrite the taken blocks: the kernel's zero-fill, bit for
    bit).  -> idx, gates."""
    top = torch.topk(selection_keys_torch(scores), l, dim=-1, largest=True, sorted=True).values
    idx = key_patch_torch(top)
    sel = key_score_torch(top)
    row_lse = None
    if gate == "softmax_all":
        row_lse = torch.logsumexp(scores, dim=-1)
        lse.copy_(row_lse)
    gates = gate_values(sel, gate, row_lse)
    inv.fill_(-1).scatter_(2, idx, torch.arange(l, device=idx.device, dtype=torch.int32).expand(idx.shape).contiguous())
    if y is not None:
        y.zero_()
    return idx, gates.contiguous()


def _split_route(x, router, rows, P: Problem, gate, cfg, y, idx, gates, gates_out, inv, lse, write_rows: bool):
    """Scores tiled over (image, patch block), then one select program per (image, expert) row.
    -> idx, gates, gates_out, scores (B, k, n) fp32."""
    scores = torch.empty(P.B, P.k, P.n, device=x.device, dtype=torch.float32)
    block_n = min(cfg.n_pow2, 256)  # the route's (patches, features) tile where it fits: the same score bits
    with nvtx_range("pmoe.scores"):
        run(_scores_kernel, (P.B, triton.cdiv(P.n, block_n)),
            x, router, rows, scores, P.n, P.d, P.k, P.Wp, P.p, *x.stride(), *router.stride(),
            WRITE_ROWS=write_rows, BLOCK_N=block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,  # the route's d-loop
            PREC=dot_precision(x.dtype), num_warps=4)
    with nvtx_range("pmoe.select"):
        if P.n > SELECT_MAX_N:
            idx, gates = select_torch(scores, P.l, gate, lse, inv, y)
            gates_out.copy_(gates)
        else:
            n_pow2 = max(16, triton.next_power_of_2(P.n))
            run(_select_kernel, (P.B, P.k), scores, idx, gates, gates_out, inv, lse, y if y is not None else scores,
                                       P.n, P.k, P.l, P.m, P.k * P.m, GATE=gate_code(gate),
                                       ZERO_FILL=y is not None, N_POW2=n_pow2, BLOCK_N=SELECT_BLOCK_N,
                                       BLOCK_M=32, num_warps=4 if n_pow2 <= 1024 else 8 if n_pow2 <= 2048 else 16)
    return idx, gates, gates_out, scores


@on_device
def forward(x: Tensor, router: Tensor, weight: Tensor, bias: Optional[Tensor], p: int, l: int, combine: str,
            gate: str, activation: str, deterministic: bool, pooled: bool, save_pre: bool = False
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The custom op pmoe::fused_fwd (op.py registers it).  x: (B, C, H, W) any strides; router
    (k, d); weight (k, m, d); bias (k, m) or None; then pmoe.vocab.Options' fields in order, then
    save_pre (the caller will differentiate: keep the pre-activations for the backward).
    -> out, idx (B, k, l) int64 best first, gates (B, k, l) in x's dtype (Routing.gates), the same
    in fp32 (for the backward), inv (B, k, n) int32, scores (B, k, n) fp32 for softmax_all
    ((B, k, 0) otherwise), lse (B, k) fp32, pre (B, k, l, m) in x's dtype with save_pre, else
    empty (the backward then recomputes it).  out: (B, n, out) in x's dtype, contiguous, or
    pooled its sum over the n patches, (B, out)."""
    P = Problem.of(x, p, weight, l)
    dev, f32 = x.device, torch.float32
    B, n, k, m, l, d = P.B, P.n, P.k, P.m, P.l, P.d
    concat = combine == "concat"
    expert_loop = deterministic and not concat  # the sum combine adds experts in order, no atomics
    source = gather_source(x)
    cfg = configs.forward_config(n, d, k, l, m, x.element_size(), capability(x), not concat,
                                 source == SRC_MAP and p > 1, pooled and save_pre)
    out_cols = k * m if concat else m
    zero_fill = concat and not pooled
    if pooled:
        y = torch.zeros(B, out_cols, device=dev, dtype=f32)
    elif concat:
        y = torch.empty(B, n, out_cols, device=dev, dtype=x.dtype)  # every element written once
    else:
        y = torch.zeros(B, n, out_cols, device=dev, dtype=f32)  # experts add up
    fused = use_fused_route(P)
    tiles = 1 if expert_loop else k
    ring = (configs.ring_images(B, cfg.group, cfg.group + tiles, n * d * x.element_size(), multiprocessors(x))
            if fused else B)
    rows = torch.empty(ring * n, d, device=dev, dtype=x.dtype) if source == SRC_ROWS else x
    idx = torch.empty(B, k, l, device=dev, dtype=torch.int64)
    gates = torch.empty(B, k, l, device=dev, dtype=f32)
    gates_out = torch.empty(B, k, l, device=dev, dtype=x.dtype)  # its own buffer: op outputs may not alias
    inv = torch.empty(B, k, n, device=dev, dtype=torch.int32)
    lse = torch.empty(B, k, device=dev, dtype=f32)
    pre = torch.empty(B, k, l, m, device=dev, dtype=x.dtype) if save_pre else x.new_empty(0)
    keep_scores = gate == "softmax_all"
    groups = triton.cdiv(B, cfg.group)
    b_t = bias if bias is not None else weight
    args = [B, n, d, k, l, m, out_cols, P.Wp, P.p, cfg.group, cfg.l_chunk, tiles, ring, *x.stride(), *router.stride(),
            *weight.stride(), *((bias.stride()) if bias is not None else (0, 0))]
    consts = dict(GATE=gate_code(gate), COMBINE=combine_code(combine), ACT=activation_code(activation),
                  HAS_BIAS=bias is not None, SOURCE=source, POOLED=pooled, ZERO_FILL=zero_fill,
                  STORE_SCORES=keep_scores, EXPERT_LOOP=expert_loop, SAVE_PRE=save_pre,
                  OFF32=cfg.group * max(n * out_cols, k * l * m) < 2**31, PREC=dot_precision(x.dtype),
                  N_POW2=cfg.n_pow2, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m,
                  HAS_N2=cfg.has_n2, BLOCK_R=cfg.block_r, BLOCK_N=cfg.block_n, BLOCK_N2=cfg.block_n2,
                  BLOCK_DK=cfg.block_dk, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if fused:
        scores = torch.empty(B, k, n if keep_scores else 0, device=dev, dtype=f32)
        with nvtx_range("pmoe.forward"):
            run(_forward_kernel, (groups * (cfg.group + tiles),),
                x, rows, router, weight, b_t, idx, gates, gates_out, inv, scores, lse, y, pre, sync_counters(x, 2 + groups),
                *args, MODE=FWD_FUSED, **consts)
    else:
        idx, gates, gates_out, scores = _split_route(x, router, rows, P, gate, cfg, y if zero_fill else None, idx,
                                                     gates, gates_out, inv, lse, source == SRC_ROWS)
        if not keep_scores:
            scores = scores.new_empty(B, k, 0)
        with nvtx_range("pmoe.experts"):
            run(_forward_kernel, (groups * tiles,),
                x, rows, router, weight, b_t, idx, gates, gates_out, inv, scores, lse, y, pre, idx, *args,
                MODE=FWD_EXPERTS, **consts)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, idx, gates_out, gates, inv, scores, lse, pre


def multiprocessors(x: Tensor) -> int:
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132


@on_device
def backward(dy: Tensor, x: Tensor, router: Tensor, weight: Tensor, bias: Optional[Tensor], idx: Tensor,
             gates: Tensor, inv: Tensor, scores: Tensor, lse: Tensor, pre: Tensor, p: int, l: int, combine: str,
             gate: str, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The custom op pmoe::fused_bwd.  dy: (B, n, out) any strides over (B, n) (the pooled
    forward's is a stride-0 view over n); then forward's inputs and saved outputs (pre empty:
    the expert tiles recompute the pre-activations from the gathered rows).
    -> dx (x's dtype and layout), d router, d weight, d bias (empty without bias)."""
    P = Problem.of(x, p, weight, l)
    from .backward import _dx_dw_kernel, _rows_bwd_kernel
    from .routing import GATE_BWD_BLOCK, _gate_bwd_kernel, _route_dense_dr_kernel

    dev, f32 = x.device, torch.float32
    B, n, k, m, l, d = P.B, P.n, P.k, P.m, P.l, P.d
    source = gather_source(x)
    cfg = configs.backward_config(B, n, d, k, l, m, x.element_size(), capability(x), multiprocessors(x))
    fc = cfg.fwd
    pre_saved = pre.numel() > 0
    if pre_saved and (tuple(pre.shape) != (B, k, l, m) or pre.dtype != x.dtype or not pre.is_contiguous()):
        raise ValueError(f"pre must be contiguous ({B}, {k}, {l}, {m}) in {x.dtype} (or empty), got "
                         f"{tuple(pre.shape)} {pre.dtype}")
    if dy.stride(-1) != 1:  # the kernels need unit-stride channels; (B, n) strides stay as they are
        dy = dy.contiguous()
    prec = dot_precision(x.dtype)
    has_ds = gate != "indicator"
    dense = gate == "softmax_all"
    fuse_ds = gate == "softmax" and fc.l_chunk == l
    rows = torch.empty(B * n, d, device=dev, dtype=x.dtype) if source == SRC_ROWS else x
    dpre = torch.empty(k, B * l, m, device=dev, dtype=x.dtype)
    dg = torch.empty(B, k, l, device=dev, dtype=f32)
    ds = torch.empty(B, k, l, device=dev, dtype=f32)
    groups = triton.cdiv(B, fc.group)
    b_t = bias if bias is not None else weight
    dx = torch.empty_like(x)
    dx_here = fuse_ds or not has_ds  # dX needs dS: here when the tiles compute it, else after the gate backward
    dx_blocks = triton.cdiv(d, cfg.block_dx)
    copies = fc.group if source == SRC_ROWS else 0
    combines = fc.group * dx_blocks if dx_here else 0
    period = copies + k + combines
    # T: read by this launch's dX programs (a ring of the groups in flight), else by launch 2
    t_ring = (configs.ring_images(B, fc.group, period, k * l * d * x.element_size(), multiprocessors(x))
              if dx_here else B)
    t = torch.empty(k, t_ring * l, d, device=dev, dtype=x.dtype)
    with nvtx_range("pmoe.backward.rows"):
        run(_rows_bwd_kernel, (groups * period,),
            x, rows, weight, b_t, router, idx, gates, inv, dy, pre, dpre, t, dg, ds, dx,
            sync_counters(x, 2 + 2 * groups),
            B, n, k, l, m, d, P.Wp, P.p, fc.group, fc.l_chunk, dx_blocks, t_ring, *x.stride(), *weight.stride(),
            *((bias.stride()) if bias is not None else (0, 0)), *router.stride(), dy.stride(0), dy.stride(1),
            *dx.stride(), SOURCE=source, COMBINE=combine_code(combine), ACT=activation_code(activation),
            HAS_BIAS=bias is not None, PRE_SAVED=pre_saved, FUSE_DS=fuse_ds, ONE_PASS=m <= fc.block_n + fc.block_n2 * fc.has_n2,
            DX_HERE=dx_here, PREC=prec, N_POW2=min(fc.n_pow2, 256), BLOCK_D=fc.block_d,
            HAS_N2=fc.has_n2,
            BLOCK_R=fc.block_r, BLOCK_N=fc.block_n, BLOCK_N2=fc.block_n2, BLOCK_DK=fc.block_dk, BLOCK_DT=cfg.block_dt,
            BLOCK_K=fc.block_k, DX_N=cfg.n_block, BLOCK_DX=cfg.block_dx, num_warps=fc.num_warps,
            num_stages=fc.num_stages)
    dsd = torch.empty(B, k, n, device=dev, dtype=f32) if dense else ds
    if has_ds and not fuse_ds:
        with nvtx_range("pmoe.backward.gates"):
            run(_gate_bwd_kernel, (B, k), dg, gates, scores if dense else dg, lse if dense else dg, ds, dsd, n, k, l,
                GATE=gate_code(gate), BLOCK=min(GATE_BWD_BLOCK, max(16, triton.next_power_of_2(max(l, n if dense else 1)))))
    dw = torch.empty_like(weight)
    db = torch.empty_like(bias) if bias is not None else torch.empty(0, device=dev, dtype=weight.dtype)
    if has_ds:  # written whole by the dW reducers (in fp32 when softmax_all's dense part is added after)
        dr = torch.empty(k, d, device=dev, dtype=f32 if dense else router.dtype)
    else:  # the indicator gate: no router gradient
        dr = torch.zeros(k, d, device=dev, dtype=router.dtype)
    d_blocks = triton.cdiv(d, cfg.block_dw)
    part = torch.empty(cfg.splits, k, m * d + m + d, device=dev, dtype=f32)
    count = sync_counters(x, 2 + 2 * groups + k * d_blocks)[2 + 2 * groups:]  # past the row kernel's: zero
    dx_programs = 0 if dx_here else B * dx_blocks
    with nvtx_range("pmoe.backward.weights"):
        run(_dx_dw_kernel, (dx_programs + k * d_blocks * cfg.splits,),
            x, rows, idx, inv, dpre, t, ds, dsd, router, dx, dw, db if bias is not None else dw, dr, part, count,
            B, n, k, l, m, d, P.Wp, P.p, cfg.splits, dx_programs, *x.stride(), *router.stride(), *dx.stride(),
            SOURCE=source, HAS_BIAS=bias is not None, HAS_DS=has_ds, DENSE=dense, PREC=prec, N_POW2=cfg.n_block,
            BLOCK_K=fc.block_k, BLOCK_DX=cfg.block_dx, HAS_N2=fc.has_n2, BLOCK_N=fc.block_n, BLOCK_N2=fc.block_n2,
            BLOCK_DW=cfg.block_dw, BLOCK_RK=cfg.block_rk, num_warps=cfg.num_warps, num_stages=fc.num_stages)
    if dense:
        with nvtx_range("pmoe.backward.scores"):
            block_k = min(64, max(16, triton.next_power_of_2(k)))
            run(_route_dense_dr_kernel, (triton.cdiv(d, 32), triton.cdiv(k, block_k)),
                x, dsd, dr, B, n, d, k, P.Wp, P.p, *x.stride(), BLOCK_K=block_k, BLOCK_N=32, BLOCK_D=32, PREC=prec)
    return dx, dr.to(router.dtype) if dr.dtype != router.dtype else dr, dw, db

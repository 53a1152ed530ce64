"""Routing kernels: scores, on-chip top-l selection + gates, and the router's backward.

Forward is two launches instead of one per-image program: `_scores_kernel` tiles (image, patch
block, expert block) so that even B = 1 fills the GPU, and reads the input exactly once (all k
experts share each gathered x tile); `_select_kernel` then sorts one (image, expert) row of n
fp32 scores in registers.  The round trip costs B*k*n*4 bytes (vs B*n*d*elt for the input), and
avoids a grid-wide dependency inside one kernel.  Rows longer than SELECT_MAX_N are selected
by op.py with torch ops on the same scores (the on-chip sort would not fit: see SELECT_MAX_N).
"""
import triton
import triton.language as tl

from .utils import (key_patch, key_score, patch_col_offsets, patch_row_offsets,
                    PRUNE, pick_configs, selection_keys)

# The longest score row _select_kernel sorts on chip.  Its bitonic sort of N_POW2 int64 keys
# needs N_POW2 * 8 bytes of shared memory and, at 8 warps, N_POW2 / 128 keys per thread in
# registers: N_POW2 = 8192 compiles without spills on sm_90 and sm_80 (up to 255 registers,
# 64 KiB shared), 16384 spills (255 registers + 304..912 B at 8 warps, 600..950 B at 16; 128 KiB
# shared) and 32768 needs 256 KiB of shared memory, more than an H100 has (227 KiB).  Longer
# rows take op.py's torch fallback (same keys, same result).  registry.py compiles the cap.
SELECT_MAX_N = 8192

# Configs: the largest tiles that compile without spills on sm_90 and sm_80 (compile_report).
SCORES_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 128, "BLOCK_D": 32}, num_warps=8, num_stages=2),
]


@triton.autotune(configs=pick_configs(SCORES_CONFIGS), key=["n", "d", "k"], prune_configs_by=PRUNE)
@triton.jit
def _scores_kernel(x_ptr, r_ptr, scores_ptr, n, d, k, Wp, p,
                   sxb, sxc, sxh, sxw, srk, srd,
                   BLOCK_K: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """scores[b, s, j] = <router_s, x_{b,j}> for a (BLOCK_N patches, BLOCK_K experts) tile.

    x: (B, C, H, W) any strides; router: (k, d); scores: (B, k, n) fp32, rounded to x's dtype
    (the torch path computes the matmul in that dtype; rounding alike keeps the selections equal).
    Grid: (B, cdiv(n, BLOCK_N), cdiv(k, BLOCK_K)).
    """
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = j < n
    e_ok = e < k
    row_off = patch_row_offsets(tl.full((BLOCK_N,), b, tl.int64), j, Wp, p, sxb, sxh, sxw)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        c = d0 + tl.arange(0, BLOCK_D)
        c_ok = c < d
        col_off = patch_col_offsets(c, p, sxc, sxh, sxw)
        xt = tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)
        rt = tl.load(r_ptr + e[None, :].to(tl.int64) * srk + c[:, None].to(tl.int64) * srd,
                     mask=c_ok[:, None] & e_ok[None, :], other=0.0)
        acc = tl.dot(xt, rt, acc, input_precision=PREC)
    acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    out = scores_ptr + (b.to(tl.int64) * k + e[None, :]) * n + j[:, None]
    tl.store(out, acc, mask=j_ok[:, None] & e_ok[None, :])


@triton.jit
def _select_kernel(scores_ptr, idx_ptr, gates_ptr, lse_ptr, y_ptr, n, k, l, m, out_cols,
                   N_POW2: tl.constexpr, GATE: tl.constexpr, ZERO_FILL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Top-l of one (image b, expert s) score row, best first, and its gates.

    One bitonic sort of n int64 keys (selection_keys) in registers gives SPEC's order exactly.
    Writes idx (B, k, l) int64, gates (B, k, l) fp32, lse (B, k) fp32 (softmax_all only) and, for
    concat (ZERO_FILL), the zeros of expert s's channel block at the patches it did not take, so
    every element of y is written exactly once (the expert kernel writes the taken ones).
    Grid: (B, k).
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    row = scores_ptr + (b * k + s) * n
    j = tl.arange(0, N_POW2)
    j_ok = j < n
    r = tl.load(row + j, mask=j_ok, other=0.0)
    ranked = tl.sort(selection_keys(r, j, j_ok), descending=True)
    i = tl.arange(0, N_POW2)  # rank
    taken = i < l
    sel_off = (b * k + s) * l + i
    tl.store(idx_ptr + sel_off, key_patch(ranked), mask=taken)
    sel = key_score(ranked)
    if GATE == 0:
        mx = tl.max(tl.where(taken, sel, float("-inf")), axis=0)
        ex = tl.where(taken, tl.exp(sel - mx), 0.0)
        g = ex / tl.sum(ex, axis=0)
    elif GATE == 1:
        g = tl.full((N_POW2,), 1.0, tl.float32)
    else:
        # log-sum-exp over all n, with torch.logsumexp's handling of an infinite max
        mx = tl.max(tl.where(j_ok, r, float("-inf")), axis=0)
        shift = tl.where(tl.abs(mx) == float("inf"), 0.0, mx)
        lse = tl.log(tl.sum(tl.where(j_ok, tl.exp(r - shift), 0.0), axis=0)) + shift
        tl.store(lse_ptr + b * k + s, lse)
        g = tl.exp(sel - lse)
    tl.store(gates_ptr + sel_off, g, mask=taken)

    if ZERO_FILL:
        # keys are unique, so "taken" == key >= the l-th largest key; re-derive keys by chunk
        # (a (N_POW2, BLOCK_M) store tile would not fit in registers for large n)
        kth = tl.min(tl.where(taken, ranked, 9223372036854775807), axis=0)
        for n0 in range(0, n, BLOCK_N):
            jj = n0 + tl.arange(0, BLOCK_N)
            jj_ok = jj < n
            keys = selection_keys(tl.load(row + jj, mask=jj_ok, other=0.0), jj, jj_ok)
            skip = jj_ok & (keys < kth)
            base = (b * n + jj) * out_cols + s * m
            for m0 in range(0, m, BLOCK_M):
                mm = m0 + tl.arange(0, BLOCK_M)
                zero = tl.zeros((BLOCK_N, BLOCK_M), dtype=y_ptr.dtype.element_ty)
                tl.store(y_ptr + base[:, None] + mm[None, :], zero, mask=skip[:, None] & (mm < m)[None, :])


GATE_BWD_BLOCK = 1024  # lanes per chunk of the gate backward (any l, n: no spills)


@triton.jit
def _gate_bwd_kernel(dg_ptr, gates_ptr, scores_ptr, lse_ptr, ds_ptr, dsd_ptr, n, k, l,
                     GATE: tl.constexpr, BLOCK: tl.constexpr):
    """Score gradients from gate gradients dG (B, k, l) for one (image, expert).

    softmax:      dS_i = G_i (dG_i - c),  c = sum_i G_i dG_i, over the l taken (sparse, ds).
    softmax_all:  G = P restricted to the taken set, P = softmax over all n scores, so
                  dS_t = [t taken] dG_t P_t - P_t c  for every t: the sparse part dG_i G_i goes
                  to ds, the dense part -P_t c (every patch, taken or not) to dsd (B, k, n).
    Loops over chunks of BLOCK, so l and n are unbounded (c: a fixed-order sum, deterministic).
    Grid: (B, k).
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    base = (b * k + s) * l
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, l, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_ok = i < l
        acc += tl.load(gates_ptr + base + i, mask=i_ok, other=0.0) * tl.load(dg_ptr + base + i, mask=i_ok, other=0.0)
    c = tl.sum(acc, axis=0)
    for i0 in range(0, l, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        i_ok = i < l
        dg = tl.load(dg_ptr + base + i, mask=i_ok, other=0.0)
        g = tl.load(gates_ptr + base + i, mask=i_ok, other=0.0)
        if GATE == 0:
            tl.store(ds_ptr + base + i, g * (dg - c), mask=i_ok)
        else:
            tl.store(ds_ptr + base + i, g * dg, mask=i_ok)
    if GATE == 2:
        lse = tl.load(lse_ptr + b * k + s)
        for j0 in range(0, n, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            j_ok = j < n
            row = (b * k + s) * n + j
            r = tl.load(scores_ptr + row, mask=j_ok, other=0.0)
            tl.store(dsd_ptr + row, -tl.exp(r - lse) * c, mask=j_ok)


# The dense (all-n) part of softmax_all's router backward, two launches, each output element
# with one owner and a fixed summation order (deterministic, no atomics):
#     d router[e, c] += sum_{b,j} dsd[b, e, j] x_{b,j}[c]     (_route_dense_dr_kernel)
#     dX_{b,j}[c]    += sum_e dsd[b, e, j] router_e[c]        (_route_dense_dx_kernel)
# Experts come in blocks: of BLOCK_K <= 64 (op.router_block_k) along a grid axis for d router;
# of the config's BLOCK_K in a loop (fp32 accumulator) for dX (64 experts at a time spill at
# useful fp32 tiles).  So any k fits.  Both run after the expert kernels and add onto their fp32
# results.
ROUTE_BWD_CONFIGS = [
    triton.Config({"BLOCK_N": 16, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_D": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_D": 16}, num_warps=8, num_stages=2),
]
ROUTE_DX_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_D": 32, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_K": 16}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 128, "BLOCK_D": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
]


@triton.autotune(configs=pick_configs(ROUTE_BWD_CONFIGS), key=["n", "d", "k"], prune_configs_by=PRUNE,
                 restore_value=["dr_ptr"])
@triton.jit
def _route_dense_dr_kernel(x_ptr, dsd_ptr, dr_ptr, B, n, d, k, Wp, p, sxb, sxc, sxh, sxw,
                           BLOCK_K: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """d router[e block, c block] += sum over every (b, j) of dsd[b, e, j] x_{b,j}[c]: one program
    per output tile walks all B*n rows in order.  Parallelism cdiv(d, BLOCK_D) * cdiv(k, BLOCK_K)
    programs: fine for this rarely-used gate, a split over patches would be next.
    x: (B,C,H,W); dsd: (B, k, n) fp32; dr: (k, d) fp32 contiguous.
    Grid: (cdiv(d, BLOCK_D), cdiv(k, BLOCK_K))."""
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    e = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = c < d
    e_ok = e < k
    col_x = patch_col_offsets(c, p, sxc, sxh, sxw)
    dr = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, B * n, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        r_ok = rows < B * n
        b = rows // n
        j = rows - b * n
        xt = tl.load(x_ptr + patch_row_offsets(b, j, Wp, p, sxb, sxh, sxw)[:, None] + col_x[None, :],
                     mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        dst = tl.load(dsd_ptr + (b.to(tl.int64)[:, None] * k + e[None, :]) * n + j[:, None],
                      mask=r_ok[:, None] & e_ok[None, :], other=0.0)
        dr = tl.dot(tl.trans(dst), xt, dr, input_precision=PREC)
    dr_ptrs = dr_ptr + e[:, None].to(tl.int64) * d + c[None, :]
    dr_mask = e_ok[:, None] & c_ok[None, :]
    tl.store(dr_ptrs, tl.load(dr_ptrs, mask=dr_mask, other=0.0) + dr, mask=dr_mask)


@triton.autotune(configs=pick_configs(ROUTE_DX_CONFIGS), key=["n", "d", "k"], prune_configs_by=PRUNE,
                 restore_value=["dx_ptr"])
@triton.jit
def _route_dense_dx_kernel(r_ptr, dsd_ptr, dx_ptr, B, n, d, k, Wp, p, srk, srd, sdb, sdc, sdh, sdw,
                           PREC: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """dX_{b,j}[c] += sum_e dsd[b, e, j] router_e[c] for a (BLOCK_N rows, BLOCK_D features) tile,
    experts 0..k-1 in blocks of BLOCK_K in order, one read-modify-write of its own dx elements.
    router: (k, d); dsd: (B, k, n) fp32; dx: fp32 map (strides sd*).
    Grid: (cdiv(B*n, BLOCK_N), cdiv(d, BLOCK_D))."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = rows < B * n
    c_ok = c < d
    b = rows // n
    j = rows - b * n
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for e0 in range(0, k, BLOCK_K):
        e = e0 + tl.arange(0, BLOCK_K)
        e_ok = e < k
        dst = tl.load(dsd_ptr + (b.to(tl.int64)[:, None] * k + e[None, :]) * n + j[:, None],
                      mask=r_ok[:, None] & e_ok[None, :], other=0.0)
        rt = tl.load(r_ptr + e[:, None].to(tl.int64) * srk + c[None, :].to(tl.int64) * srd,
                     mask=e_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(dst, rt, acc, input_precision=PREC)
    mask = r_ok[:, None] & c_ok[None, :]
    dx_ptrs = (dx_ptr + patch_row_offsets(b, j, Wp, p, sdb, sdh, sdw)[:, None]
               + patch_col_offsets(c, p, sdc, sdh, sdw)[None, :])
    tl.store(dx_ptrs, tl.load(dx_ptrs, mask=mask, other=0.0) + acc, mask=mask)

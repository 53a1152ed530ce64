"""Routing kernels: scores, on-chip top-l selection + gates, and the router's backward.

Forward, one of two ways (op.route_fused picks):
- fused, `_route_kernel`: one program per image computes its (n, k) scores, sorts every
  expert's row in registers and writes the chosen patches and gates; the scores never go to
  memory.  Grid (B,): it needs all of an image's scores in one program (ROUTE_MAX_KEYS) and
  enough images to fill the GPU.
- split, `_scores_kernel` then `_select_kernel`: the scores tiled over (image, patch block,
  expert block), so that even B = 1 fills the GPU, written out (B*k*n*4 bytes, against
  B*n*d*elt for the input) and sorted one (image, expert) row per program.  Rows longer than
  SELECT_MAX_N are selected by op.py with torch ops on the same scores (see SELECT_MAX_N).
Both read the input exactly once (all k experts share each gathered x tile) and share the
selection and gate code (_top_l).
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


@triton.jit
def _score_tile(x_ptr, r_ptr, row_off, j_ok, e, e_ok, d, p, sxc, sxh, sxw, srk, srd,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """(BLOCK_N patches, BLOCK_K experts) fp32 scores <router_e, x_j>, rounded to x's dtype (the
    torch path computes the matmul in that dtype; rounding alike keeps the selections equal).
    row_off: patch_row_offsets of the patches; both routes run this same d-loop, so they score
    alike bit for bit."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        c = d0 + tl.arange(0, BLOCK_D)
        c_ok = c < d
        col_off = patch_col_offsets(c, p, sxc, sxh, sxw)
        xt = tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)
        rt = tl.load(r_ptr + e[None, :].to(tl.int64) * srk + c[:, None].to(tl.int64) * srd,
                     mask=c_ok[:, None] & e_ok[None, :], other=0.0)
        acc = tl.dot(xt, rt, acc, input_precision=PREC)
    return acc.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.autotune(configs=pick_configs(SCORES_CONFIGS), key=["n", "d", "k"], prune_configs_by=PRUNE)
@triton.jit
def _scores_kernel(x_ptr, r_ptr, scores_ptr, n, d, k, Wp, p,
                   sxb, sxc, sxh, sxw, srk, srd,
                   BLOCK_K: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """scores[b, s, j] = <router_s, x_{b,j}> for a (BLOCK_N patches, BLOCK_K experts) tile.

    x: (B, C, H, W) any strides; router: (k, d); scores: (B, k, n) fp32 (_score_tile).
    Grid: (B, cdiv(n, BLOCK_N), cdiv(k, BLOCK_K)).
    """
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = j < n
    e_ok = e < k
    row_off = patch_row_offsets(tl.full((BLOCK_N,), b, tl.int64), j, Wp, p, sxb, sxh, sxw)
    acc = _score_tile(x_ptr, r_ptr, row_off, j_ok, e, e_ok, d, p, sxc, sxh, sxw, srk, srd,
                      BLOCK_N, BLOCK_K, BLOCK_D, PREC)
    out = scores_ptr + (b.to(tl.int64) * k + e[None, :]) * n + j[:, None]
    tl.store(out, acc, mask=j_ok[:, None] & e_ok[None, :])


@triton.jit
def _row_lse(r, valid):
    """log-sum-exp of score rows over their valid lanes (the last axis, kept as a size-1 axis),
    with torch.logsumexp's handling of an infinite max."""
    mx = tl.max(tl.where(valid, r, float("-inf")), axis=-1, keep_dims=True)
    shift = tl.where(tl.abs(mx) == float("inf"), 0.0, mx)
    return tl.log(tl.sum(tl.where(valid, tl.exp(r - shift), 0.0), axis=-1, keep_dims=True)) + shift


@triton.jit
def _top_l(r, j, valid, l, GATE: tl.constexpr):
    """SPEC's selection and gates of one score row (N_POW2,) or a block of rows (R, N_POW2).

    One bitonic sort of int64 keys (selection_keys) along the last axis gives SPEC's order
    exactly.  r: fp32 scores; j: each lane's patch number (broadcastable to r; after the sort
    it is the lane's rank); valid: real (row, patch) lanes, padding sorts last.
    -> keys (unsorted), ranked (best first), taken (rank < l), gates (meaningful where taken),
       lse (softmax_all: _row_lse of the rows; 0 for the other gates).
    """
    keys = selection_keys(r, j, valid)
    ranked = tl.sort(keys, descending=True)
    taken = j < l
    sel = key_score(ranked)
    lse = 0.0
    if GATE == 0:
        mx = tl.max(tl.where(taken, sel, float("-inf")), axis=-1, keep_dims=True)
        ex = tl.where(taken, tl.exp(sel - mx), 0.0)
        g = ex / tl.sum(ex, axis=-1, keep_dims=True)
    elif GATE == 1:
        g = tl.full(sel.shape, 1.0, tl.float32)
    else:
        lse = _row_lse(r, valid)
        g = tl.exp(sel - lse)
    return keys, ranked, taken, g, lse


@triton.jit
def _select_kernel(scores_ptr, idx_ptr, gates_ptr, lse_ptr, y_ptr, n, k, l, m, out_cols,
                   N_POW2: tl.constexpr, GATE: tl.constexpr, ZERO_FILL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Top-l of one (image b, expert s) score row, best first, and its gates (_top_l).

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
    _, ranked, taken, g, lse = _top_l(r, j, j_ok, l, GATE)
    sel_off = (b * k + s) * l + j
    tl.store(idx_ptr + sel_off, key_patch(ranked), mask=taken)
    tl.store(gates_ptr + sel_off, g, mask=taken)
    if GATE == 2:
        tl.store(lse_ptr + b * k + s + tl.arange(0, 1), lse)  # lse: (1,)

    if ZERO_FILL:
        # keys are unique, so "taken" == key >= the l-th largest key; re-derive keys by chunk
        # (a (N_POW2, BLOCK_M) store tile would not fit in registers for large n)
        kth = tl.min(tl.where(taken, ranked, 9223372036854775807), axis=0)
        for n0 in range(0, n, BLOCK_N):
            jj = n0 + tl.arange(0, BLOCK_N)
            jj_ok = jj < n
            chunk_keys = selection_keys(tl.load(row + jj, mask=jj_ok, other=0.0), jj, jj_ok)
            skip = jj_ok & (chunk_keys < kth)
            base = (b * n + jj) * out_cols + s * m
            for m0 in range(0, m, BLOCK_M):
                mm = m0 + tl.arange(0, BLOCK_M)
                zero = tl.zeros((BLOCK_N, BLOCK_M), dtype=y_ptr.dtype.element_ty)
                tl.store(y_ptr + base[:, None] + mm[None, :], zero, mask=skip[:, None] & (mm < m)[None, :])


# The fused route: one program holds all n scores of an image for all k experts in registers
# ((BLOCK_K, N_POW2) fp32 + the int64 keys and their sort), up to ROUTE_MAX_KEYS = N_POW2 *
# BLOCK_K lanes (op.route_warps: 8 warps at 1024, 4 below).  Every shape up to the cap compiles
# without spills on sm_90 and sm_80 in every dtype (registry.py); above it ptxas spills at some
# (2048 lanes: 32 B for bf16 on sm_80 at 8 warps, fp32 on sm_80 more), so the split kernels run.
ROUTE_MAX_KEYS = 1024
ROUTE_BLOCK_D = 32  # = the scores kernel's BLOCK_D: the same d-loop, the same score bits


@triton.jit
def _route_kernel(x_ptr, r_ptr, idx_ptr, gates_ptr, scores_ptr, lse_ptr, y_ptr, n, d, k, l, m, out_cols,
                  Wp, p, sxb, sxc, sxh, sxw, srk, srd,
                  N_POW2: tl.constexpr, BLOCK_K: tl.constexpr, GATE: tl.constexpr, ZERO_FILL: tl.constexpr,
                  STORE_SCORES: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Scores, top-l selection and gates of image b for all k experts in one program: the
    image's patches are read once and its scores never leave registers (they are stored only
    with STORE_SCORES: softmax_all's backward needs them).  The same arithmetic as
    _scores_kernel + _select_kernel: the same scores, so the same choice and gates.

    x: (B, C, H, W) any strides; router: (k, d); idx/gates (B, k, l); scores (B, k, n) fp32;
    lse (B, k) fp32 (softmax_all); y: the concat output (B, n, k*m), zero-filled where an expert
    did not take a patch (ZERO_FILL).  Grid: (B,).
    """
    b = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, N_POW2)
    e = tl.arange(0, BLOCK_K)
    j_ok = j < n
    e_ok = e < k
    row_off = patch_row_offsets(tl.full((N_POW2,), b, tl.int64), j, Wp, p, sxb, sxh, sxw)
    r = tl.trans(_score_tile(x_ptr, r_ptr, row_off, j_ok, e, e_ok, d, p, sxc, sxh, sxw, srk, srd,
                             N_POW2, BLOCK_K, BLOCK_D, PREC))  # (BLOCK_K, N_POW2): a row per expert
    valid = e_ok[:, None] & j_ok[None, :]
    rows = b * k + e[:, None]
    if STORE_SCORES:
        tl.store(scores_ptr + rows * n + j[None, :], r, mask=valid)
    keys, ranked, taken, g, lse = _top_l(r, j[None, :], valid, l, GATE)
    taken = taken & e_ok[:, None]
    sel_off = rows * l + j[None, :]
    tl.store(idx_ptr + sel_off, key_patch(ranked), mask=taken)
    tl.store(gates_ptr + sel_off, g, mask=taken)
    if GATE == 2:
        tl.store(lse_ptr + rows, lse, mask=e_ok[:, None])  # lse: (BLOCK_K, 1)

    if ZERO_FILL:
        kth = tl.min(tl.where(taken, ranked, 9223372036854775807), axis=1, keep_dims=True)
        skip = (valid & (keys < kth)).to(tl.int32)  # (BLOCK_K, N_POW2): expert e left patch j
        base = (b * n + j) * out_cols
        for s in range(0, k):
            skip_s = tl.max(tl.where(e[:, None] == s, skip, 0), axis=0) > 0  # row s, as (N_POW2,)
            for m0 in range(0, m, BLOCK_M):
                mm = m0 + tl.arange(0, BLOCK_M)
                zero = tl.zeros((N_POW2, BLOCK_M), dtype=y_ptr.dtype.element_ty)
                tl.store(y_ptr + base[:, None] + (s * m + mm)[None, :], zero,
                         mask=skip_s[:, None] & (mm < m)[None, :])


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

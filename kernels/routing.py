"""Routing on the GPU: scores, top-l selection and gates, and their backward.

The selection of one (image, expert) score row, `select_row`, is SPEC's rule exactly: one
bitonic sort of int64 keys (utils.selection_keys: an order-preserving image of the fp32 score
above 2^31-1-j), so ties go to the lower patch and NaN ranks above +inf, as torch.sort does.
It writes, per (image b, expert s):
    idx   (B, k, l) int64  chosen patches, best first         (Routing.indices)
    gates (B, k, l) fp32   their gates, and again in x's dtype (Routing.gates)
    inv   (B, k, n) int32  each patch's rank in s's choice, or -1 (the backward's dX gather)
    lse   (B, k)    fp32   log-sum-exp of the row (softmax_all only)
and, for concat, the zeros of s's output block at the patches s did not take.

Two ways to route (launch.route_fits decides):
- `route_image`, called by the forward kernel's route programs (forward.py): one program per
  image computes its (n, k) scores in registers (the image's patches are read once, and for NCHW
  input copied K-contiguous on the way, see forward.py), then selects each expert's row.
- `_scores_kernel` + `_select_kernel`, when one program cannot hold an image's scores: scores
  tiled over (image, patch block), written out, then one program per (image, expert) row.
  Rows longer than SELECT_MAX_N are selected by launch.select_torch with the same keys.
"""
import triton
import triton.language as tl

from .modes import GATE_INDICATOR, GATE_SOFTMAX, GATE_SOFTMAX_ALL
from .utils import key_patch, key_score, patch_col_offsets, patch_row_offsets, selection_keys

# The longest score row _select_kernel sorts on chip.  Its bitonic sort of N_POW2 int64 keys
# needs N_POW2 * 8 bytes of shared memory and, at 8 warps, N_POW2 / 128 keys per thread in
# registers: 8192 compiles without spills on sm_90 and sm_80; 32768 needs 256 KiB of shared
# memory, more than an H100 has.  Longer rows take launch.select_torch (same keys, same result).
SELECT_MAX_N = 8192
SELECT_BLOCK_N = 64  # patches per zero-fill chunk of _select_kernel


@triton.jit
def score_tile(x_ptr, r_ptr, rows_ptr, row_off, row_out, j_ok, e, e_ok, d, p,
               stride_xc, stride_xh, stride_xw, stride_rk, stride_rd,
               WRITE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               PREC: tl.constexpr):
    """(BLOCK_N patches, BLOCK_K experts) fp32 scores <router_e, x_j>, rounded to x's dtype (the
    torch path computes the matmul in that dtype; rounding alike keeps the selections equal).

    row_off: patch_row_offsets of the patches in x.  WRITE_ROWS: also copy each patch, features
    in unfold order, to rows_ptr + row_out (d contiguous elements per patch): the d-loop reads x
    once for both (forward.py, SRC_ROWS).  Without it x's channels are innermost (SRC_MAP), and
    the loop steps through each patch in runs of channels, (py, px, c) order, so that a
    BLOCK_D-wide step reads contiguous memory even when p > 1 (in unfold order it would read p*p
    runs of BLOCK_D / p^2 channels).  Every route runs this same loop: the same score bits.
    """
    pp = p * p
    C = d // pp
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        q = d0 + tl.arange(0, BLOCK_D)  # loop position
        c_ok = q < d
        if WRITE_ROWS:
            c = q  # the rows are copied in unfold order
        else:
            c = (q % C) * pp + q // C  # the unfold index of position q in (py, px, c) order
        mask = j_ok[:, None] & c_ok[None, :]
        xt = tl.load(x_ptr + row_off[:, None] + patch_col_offsets(c, p, stride_xc, stride_xh, stride_xw)[None, :],
                     mask=mask, other=0.0)
        if WRITE_ROWS:
            tl.store(rows_ptr + row_out[:, None] + c[None, :], xt, mask=mask)
        rt = tl.load(r_ptr + e[None, :].to(tl.int64) * stride_rk + c[:, None].to(tl.int64) * stride_rd,
                     mask=c_ok[:, None] & e_ok[None, :], other=0.0)
        acc = tl.dot(xt, rt, acc, input_precision=PREC)
    return acc.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _row_lse(r, valid):
    """log-sum-exp of a score row over its valid lanes, with torch.logsumexp's handling of an
    infinite max."""
    mx = tl.max(tl.where(valid, r, float("-inf")), axis=0)
    shift = tl.where(tl.abs(mx) == float("inf"), 0.0, mx)
    return tl.log(tl.sum(tl.where(valid, tl.exp(r - shift), 0.0), axis=0)) + shift


@triton.jit
def select_row(r, j, j_ok, b, s, idx_ptr, gates_ptr, gates_out_ptr, inv_ptr, lse_ptr, y_ptr, n, k, l, m, out_cols,
               GATE: tl.constexpr, ZERO_FILL: tl.constexpr, BLOCK_M: tl.constexpr):
    """SPEC's top-l of one score row r (N_POW2,) fp32 of image b, expert s, and its gates;
    writes idx, gates, inv, lse and (ZERO_FILL) the concat zeros, as the module docstring says.

    j: the lanes' patch numbers, j_ok: the real ones (padding sorts last).  After the sort, lane
    j holds rank j: the first l lanes are the choice, best first.
    """
    keys = selection_keys(r, j, j_ok)
    ranked = tl.sort(keys, descending=True)
    taken = j < l
    sel = key_score(ranked)
    if GATE == GATE_SOFTMAX:
        mx = tl.max(tl.where(taken, sel, float("-inf")), axis=0)
        ex = tl.where(taken, tl.exp(sel - mx), 0.0)
        g = ex / tl.sum(ex, axis=0)
    elif GATE == GATE_INDICATOR:
        g = tl.full(sel.shape, 1.0, tl.float32)
    elif GATE == GATE_SOFTMAX_ALL:
        lse = _row_lse(r, j_ok)
        g = tl.exp(sel - lse)
        tl.store(lse_ptr + b * k + s + tl.arange(0, 1), tl.full((1,), 0.0, tl.float32) + lse)
    else:
        tl.static_assert(False, "unknown gate code")
    row = b * k + s
    patch = key_patch(ranked)
    tl.store(idx_ptr + row * l + j, patch, mask=taken)
    tl.store(gates_ptr + row * l + j, g, mask=taken)
    tl.store(gates_out_ptr + row * l + j, g.to(gates_out_ptr.dtype.element_ty), mask=taken)
    # keys are unique, so "patch j was taken" == its key >= the l-th largest key
    kth = tl.min(tl.where(taken, ranked, 9223372036854775807), axis=0)
    left = j_ok & (keys < kth)
    tl.store(inv_ptr + row * n + j, tl.full(j.shape, -1, tl.int32), mask=left)  # lanes: patches
    tl.store(inv_ptr + row * n + patch, j.to(tl.int32), mask=taken)              # lanes: ranks
    if ZERO_FILL:
        base = (b * n + j) * out_cols + s * m
        for m0 in range(0, m, BLOCK_M):
            mm = m0 + tl.arange(0, BLOCK_M)
            zero = tl.zeros((j.shape[0], BLOCK_M), dtype=y_ptr.dtype.element_ty)
            tl.store(y_ptr + base[:, None] + mm[None, :], zero, mask=left[:, None] & (mm < m)[None, :])


@triton.jit
def route_image(b, x_ptr, r_ptr, rows_ptr, idx_ptr, gates_ptr, gates_out_ptr, inv_ptr, scores_ptr, lse_ptr, y_ptr,
                n, d, k, l, m, out_cols, Wp, p, ring,
                stride_xb, stride_xc, stride_xh, stride_xw, stride_rk, stride_rd,
                GATE: tl.constexpr, ZERO_FILL: tl.constexpr, STORE_SCORES: tl.constexpr, WRITE_ROWS: tl.constexpr,
                N_POW2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                PREC: tl.constexpr):
    """Scores, selection and gates of image b for all k experts, in one program.

    The image's (n, k) scores stay in registers (stored only with STORE_SCORES: softmax_all's
    backward needs them); the experts are then selected one row at a time (select_row), so the
    sort never holds more than N_POW2 keys.  WRITE_ROWS copies the image's patch rows, unfold
    order, to rows_ptr (ring*n, d), image b in slot b % ring, on the way (score_tile).
    """
    b = b.to(tl.int64)
    j = tl.arange(0, N_POW2)
    e = tl.arange(0, BLOCK_K)
    j_ok = j < n
    e_ok = e < k
    row_off = patch_row_offsets(tl.full((N_POW2,), b, tl.int64), j, Wp, p, stride_xb, stride_xh, stride_xw)
    scores = tl.trans(score_tile(x_ptr, r_ptr, rows_ptr, row_off, ((b % ring) * n + j) * d, j_ok, e, e_ok, d, p,
                                 stride_xc, stride_xh, stride_xw, stride_rk, stride_rd,
                                 WRITE_ROWS, N_POW2, BLOCK_K, BLOCK_D, PREC))  # (BLOCK_K, N_POW2)
    if STORE_SCORES:
        tl.store(scores_ptr + (b * k + e[:, None]) * n + j[None, :], scores, mask=e_ok[:, None] & j_ok[None, :])
    for s in range(0, k):
        # row s as (N_POW2,): a sum with zeros keeps NaN, +-inf and the score bits (-0.0 -> +0.0,
        # which the keys equate anyway)
        r = tl.sum(tl.where(e[:, None] == s, scores, 0.0), axis=0)
        select_row(r, j, j_ok, b, s, idx_ptr, gates_ptr, gates_out_ptr, inv_ptr, lse_ptr, y_ptr, n, k, l, m,
                   out_cols, GATE, ZERO_FILL, BLOCK_M)


@triton.jit
def _scores_kernel(x_ptr, r_ptr, rows_ptr, scores_ptr, n, d, k, Wp, p,
                   stride_xb, stride_xc, stride_xh, stride_xw, stride_rk, stride_rd,
                   WRITE_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   PREC: tl.constexpr):
    """scores[b, e, j] = <router_e, x_{b,j}> for a (BLOCK_N patches, all k <= BLOCK_K experts)
    tile (score_tile; WRITE_ROWS as there: every patch is read by exactly one program).
    x: (B, C, H, W) any strides; router: (k, d); scores: (B, k, n) fp32.
    Grid: (B, cdiv(n, BLOCK_N))."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.arange(0, BLOCK_K)
    j_ok = j < n
    e_ok = e < k
    row_off = patch_row_offsets(tl.full((BLOCK_N,), b, tl.int64), j, Wp, p, stride_xb, stride_xh, stride_xw)
    acc = score_tile(x_ptr, r_ptr, rows_ptr, row_off, (b * n + j) * d, j_ok, e, e_ok, d, p,
                     stride_xc, stride_xh, stride_xw, stride_rk, stride_rd, WRITE_ROWS, BLOCK_N, BLOCK_K, BLOCK_D,
                     PREC)
    tl.store(scores_ptr + (b * k + e[None, :]) * n + j[:, None], acc, mask=j_ok[:, None] & e_ok[None, :])


@triton.jit
def _select_kernel(scores_ptr, idx_ptr, gates_ptr, gates_out_ptr, inv_ptr, lse_ptr, y_ptr, n, k, l, m, out_cols,
                   GATE: tl.constexpr, ZERO_FILL: tl.constexpr, N_POW2: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """select_row of one stored (image b, expert s) score row; the inv -1s and the zero-fill run
    over chunks of BLOCK_N patches (an (N_POW2, BLOCK_M) tile would not fit in registers), their
    keys recomputed from the row.  Grid: (B, k)."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    row = scores_ptr + (b * k + s) * n
    j = tl.arange(0, N_POW2)
    j_ok = j < n
    r = tl.load(row + j, mask=j_ok, other=0.0)
    # the full-row select_row, without its zero-fill (done in chunks below)
    select_row(r, j, j_ok, b, s, idx_ptr, gates_ptr, gates_out_ptr, inv_ptr, lse_ptr, y_ptr, n, k, l, m, out_cols,
               GATE, False, BLOCK_M)
    if ZERO_FILL:
        kth = tl.min(tl.where(j < l, tl.sort(selection_keys(r, j, j_ok), descending=True), 9223372036854775807),
                     axis=0)
        for n0 in range(0, n, BLOCK_N):
            jj = n0 + tl.arange(0, BLOCK_N)
            jj_ok = jj < n
            left = jj_ok & (selection_keys(tl.load(row + jj, mask=jj_ok, other=0.0), jj, jj_ok) < kth)
            base = (b * n + jj) * out_cols + s * m
            for m0 in range(0, m, BLOCK_M):
                mm = m0 + tl.arange(0, BLOCK_M)
                zero = tl.zeros((BLOCK_N, BLOCK_M), dtype=y_ptr.dtype.element_ty)
                tl.store(y_ptr + base[:, None] + mm[None, :], zero, mask=left[:, None] & (mm < m)[None, :])


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
        if GATE == GATE_SOFTMAX:
            tl.store(ds_ptr + base + i, g * (dg - c), mask=i_ok)
        elif GATE == GATE_SOFTMAX_ALL:
            tl.store(ds_ptr + base + i, g * dg, mask=i_ok)
        else:
            tl.static_assert(False, "the indicator gate has no score gradient")
    if GATE == GATE_SOFTMAX_ALL:
        lse = tl.load(lse_ptr + b * k + s)
        for j0 in range(0, n, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            j_ok = j < n
            row = (b * k + s) * n + j
            r = tl.load(scores_ptr + row, mask=j_ok, other=0.0)
            tl.store(dsd_ptr + row, -tl.exp(r - lse) * c, mask=j_ok)


# The dense (all-n) part of softmax_all's router gradient, d router[e, c] += sum over every
# (b, j) of dsd[b, e, j] x_{b,j}[c]: one owner per output element and a fixed summation order
# (deterministic, no atomics); it runs after the dW programs and adds onto their fp32 result.
# Its dX twin, sum_e dsd[b, e, j] router_e[c], is part of backward.dx_tile.


@triton.jit
def _route_dense_dr_kernel(x_ptr, dsd_ptr, dr_ptr, B, n, d, k, Wp, p,
                           stride_xb, stride_xc, stride_xh, stride_xw,
                           BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """d router[e block, c block] += sum over every (b, j) of dsd[b, e, j] x_{b,j}[c]: one
    program per output tile walks all B*n rows in order.  x: (B,C,H,W); dsd: (B, k, n) fp32;
    dr: (k, d) fp32 contiguous.  Grid: (cdiv(d, BLOCK_D), cdiv(k, BLOCK_K))."""
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    e = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    c_ok = c < d
    e_ok = e < k
    col_x = patch_col_offsets(c, p, stride_xc, stride_xh, stride_xw)
    dr = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, B * n, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        r_ok = rows < B * n
        b = rows // n
        j = rows - b * n
        xt = tl.load(x_ptr + patch_row_offsets(b, j, Wp, p, stride_xb, stride_xh, stride_xw)[:, None] + col_x[None, :],
                     mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        dst = tl.load(dsd_ptr + (b.to(tl.int64)[:, None] * k + e[None, :]) * n + j[:, None],
                      mask=r_ok[:, None] & e_ok[None, :], other=0.0)
        dr = tl.dot(tl.trans(dst), xt, dr, input_precision=PREC)
    dr_ptrs = dr_ptr + e[:, None].to(tl.int64) * d + c[None, :]
    dr_mask = e_ok[:, None] & c_ok[None, :]
    tl.store(dr_ptrs, tl.load(dr_ptrs, mask=dr_mask, other=0.0) + dr, mask=dr_mask)

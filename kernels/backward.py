"""Backward: two launches, no atomics on data, every gradient written once, deterministic.

1. `_rows_bwd_kernel`, expert tiles as in the forward (same rows: GROUP whole images of one
   expert; forward.tile_rows).  Each tile reads pre = W_s x_j + b_s as the forward saved it
   (PRE_SAVED; else it gathers its rows again and recomputes it), and from dY:
       dG_j   = <dY_j, act(pre_j)>          (the gate's gradient)
       dPre_j = G_j dY_j act'(pre_j)         -> dpre (k, B*l, m) in x's dtype
   and, for the softmax gate with whole images in the tile, the score gradient
       dS_i = G_i (dG_i - sum_i' G_i' dG_i') -> ds (B, k, l) fp32;
   otherwise it stores dG and routing._gate_bwd_kernel computes dS (and softmax_all's dense part).
   dY is read through strides: the pooled layer's (B, out) gradient is a stride-0 view over the
   patches, never materialised.  For an NCHW map the launch starts, like the forward, with one
   program per image copying its patch rows K-contiguous (tickets, see forward.py).
2. `_dx_dw_kernel`, two kinds of programs in one launch (neither waits for the other):
   dX programs, one per (image, d block): for every expert s,
       T = dPre_s rows (l per image) @ W_s[:, d block] + dS_s (x) router_s[d block]
   (the dS term added by the step-1 tiles where they compute dS, else here) is read at the
   patches s took (by inv, the forward's patch -> rank map) and summed over experts in
   registers, plus softmax_all's dense term; the (n, d block) tile of each image is then stored
   once, in x's dtype and layout: no fp32 map, no atomics.  With the score gradient known in
   step 1, these programs run in step 1's launch instead (DX_HERE).
   dW programs, one per (expert, d block, split of the B*l rows): dW_s partials
   dPre_s^T X_s (all m columns), db_s and the router's sparse gradient sum dS x; the split that
   finishes last (a counter) adds the partials in split order and writes the result.
"""
import triton
import triton.language as tl

from .forward import rows_gemm, source_cols, source_rows, tile_rows
from .modes import COMBINE_CONCAT, COMBINE_SUM, SRC_ROWS
from .utils import (activation, activation_grad, finish_ticket, patch_col_offsets, patch_row_offsets, signal_group,
                    take_ticket, wait_group, wait_ring_slot)


@triton.jit
def copy_rows(b, x_ptr, rows_ptr, n, d, Wp, p, stride_xb, stride_xc, stride_xh, stride_xw,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Copy image b's patch rows, unfold order, from the map to rows (B*n, d), in (BLOCK_N
    patches, BLOCK_D features) tiles."""
    b = b.to(tl.int64)
    for j0 in range(0, n, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < n
        row_off = patch_row_offsets(tl.full((BLOCK_N,), b, tl.int64), j, Wp, p, stride_xb, stride_xh, stride_xw)
        for d0 in range(0, d, BLOCK_D):
            c = d0 + tl.arange(0, BLOCK_D)
            mask = j_ok[:, None] & (c < d)[None, :]
            xt = tl.load(x_ptr + row_off[:, None] + patch_col_offsets(c, p, stride_xc, stride_xh, stride_xw)[None, :],
                         mask=mask, other=0.0)
            tl.store(rows_ptr + ((b * n + j) * d)[:, None] + c[None, :], xt, mask=mask)


@triton.jit
def dpre_block(acc, dy_ptr, dpre_ptr, o, m, gate, dy_row, dpre_row, ok, ACT: tl.constexpr):
    """dPre of columns o (stored and returned) and this block's part of dG, from the recomputed
    pre-activations acc."""
    o_ok = o < m
    mask = ok[:, None] & o_ok[None, :]
    dy = tl.load(dy_ptr + dy_row[:, None] + o[None, :], mask=mask, other=0.0).to(tl.float32)
    dp = (dy * gate[:, None] * activation_grad(acc, ACT)).to(dpre_ptr.dtype.element_ty)
    tl.store(dpre_ptr + dpre_row[:, None] + o[None, :], dp, mask=mask)
    return tl.sum(dy * activation(acc, ACT), axis=1), dp


@triton.jit
def load_pre(pre_ptr, pre_row, ok, o, m):
    """The saved pre-activations (B, k, l, m) of columns o (< m) at rows pre_row (int64), fp32."""
    return tl.load(pre_ptr + pre_row[:, None] + o[None, :], mask=ok[:, None] & (o < m)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def dpre_pass(n0, src_ptr, row_off, ok, sel, w_ptr, b_ptr, pre_ptr, dy_ptr, dpre_ptr, s, m, d, p, gate, dy_row,
              dpre_row,
              stride_xc, stride_xh, stride_xw, stride_wk, stride_wm, stride_wd, stride_bk, stride_bm,
              SOURCE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, PRE_SAVED: tl.constexpr,
              HAS_N2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
              BLOCK_DK: tl.constexpr, PREC: tl.constexpr):
    """One column pass (columns n0..) of pre = W_s x + b_s, read back (PRE_SAVED: the forward
    stored it, row sel * m) or recomputed from the gathered rows, dPre stored: -> this pass's
    part of dG and the dPre blocks (the second zeros without HAS_N2)."""
    o1 = n0 + tl.arange(0, BLOCK_N)
    o2 = n0 + BLOCK_N + tl.arange(0, BLOCK_N2)
    if PRE_SAVED:  # read one column block at a time: fewer fp32 values live
        acc1 = load_pre(pre_ptr, sel * m, ok, o1, m)
    else:
        acc1, acc2 = rows_gemm(src_ptr, row_off, ok, w_ptr, b_ptr, s, n0, m, d, p, stride_xc, stride_xh, stride_xw,
                               stride_wk, stride_wm, stride_wd, stride_bk, stride_bm, SOURCE, HAS_BIAS, HAS_N2,
                               BLOCK_R, BLOCK_N, BLOCK_N2, BLOCK_DK, PREC)
    dg, dp1 = dpre_block(acc1, dy_ptr, dpre_ptr, o1, m, gate, dy_row, dpre_row, ok, ACT)
    if HAS_N2:
        if PRE_SAVED:
            acc2 = load_pre(pre_ptr, sel * m, ok, o2, m)
        part, dp2 = dpre_block(acc2, dy_ptr, dpre_ptr, o2, m, gate, dy_row, dpre_row, ok, ACT)
        dg += part
    else:
        dp2 = tl.zeros((BLOCK_R, BLOCK_N2), dtype=dpre_ptr.dtype.element_ty)
    return dg, dp1, dp2


@triton.jit
def dpre_tile(g, s, x_ptr, rows_ptr, w_ptr, b_ptr, r_ptr, idx_ptr, gates_ptr, dy_ptr, pre_ptr, dpre_ptr, t_ptr, dg_ptr,
              ds_ptr,
              B, n, k, l, m, d, Wp, p, GROUP, L_CHUNK, t_ring,
              stride_xb, stride_xc, stride_xh, stride_xw, stride_wk, stride_wm, stride_wd, stride_bk, stride_bm,
              stride_rk, stride_rd, stride_dyb, stride_dyn,
              SOURCE: tl.constexpr, COMBINE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
              PRE_SAVED: tl.constexpr, FUSE_DS: tl.constexpr, ONE_PASS: tl.constexpr, HAS_N2: tl.constexpr,
              BLOCK_R: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DT: tl.constexpr,
              PREC: tl.constexpr):
    """Step 1 of the module docstring for expert s over image group g."""
    cols: tl.constexpr = BLOCK_N + BLOCK_N2 if HAS_N2 else BLOCK_N
    if SOURCE == SRC_ROWS:
        src_ptr = rows_ptr
    else:
        src_ptr = x_ptr
    if COMBINE == COMBINE_CONCAT:
        col0 = s * m
    elif COMBINE == COMBINE_SUM:
        col0 = 0
    else:
        tl.static_assert(False, "unknown combine code")
    o1 = tl.arange(0, BLOCK_N)
    o2 = BLOCK_N + tl.arange(0, BLOCK_N2)
    for i0 in range(0, l, L_CHUNK):
        b, i, slot, ok, sel, j, gate, row_off = tile_rows(g, i0, s, idx_ptr, gates_ptr, B, n, k, l, d, Wp, p, GROUP,
                                                          L_CHUNK, B, stride_xb, stride_xh, stride_xw, SOURCE, BLOCK_R)
        dy_row = b * stride_dyb + j * stride_dyn + col0
        dpre_row = ((s * B + b) * l + i) * m
        if ONE_PASS:  # keep dPre in registers for T below
            dg, dp1, dp2 = dpre_pass(0, src_ptr, row_off, ok, sel, w_ptr, b_ptr, pre_ptr, dy_ptr, dpre_ptr, s, m, d,
                                     p, gate, dy_row, dpre_row, stride_xc, stride_xh, stride_xw, stride_wk,
                                     stride_wm, stride_wd, stride_bk, stride_bm, SOURCE, ACT, HAS_BIAS, PRE_SAVED,
                                     HAS_N2, BLOCK_R, BLOCK_N, BLOCK_N2, BLOCK_DK, PREC)
        else:
            dg = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for n0 in range(0, m, cols):
                part, _, _ = dpre_pass(n0, src_ptr, row_off, ok, sel, w_ptr, b_ptr, pre_ptr, dy_ptr, dpre_ptr, s, m,
                                       d, p, gate, dy_row, dpre_row, stride_xc, stride_xh, stride_xw, stride_wk,
                                       stride_wm, stride_wd, stride_bk, stride_bm, SOURCE, ACT, HAS_BIAS, PRE_SAVED,
                                       HAS_N2, BLOCK_R, BLOCK_N, BLOCK_N2, BLOCK_DK, PREC)
                dg += part
        if FUSE_DS:  # softmax gate, whole images in the tile: dS_i = G_i (dG_i - c) per image
            gdg = gate * dg
            img_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for img in range(0, GROUP):
                in_t = ok & (slot == img)
                img_sum = tl.where(in_t, tl.sum(tl.where(in_t, gdg, 0.0), axis=0), img_sum)
            ds = gate * (dg - img_sum)
            tl.store(ds_ptr + sel, ds, mask=ok)
        else:
            tl.store(dg_ptr + sel, dg, mask=ok)
        # T = dPre_s W_s (+ dS router_s with FUSE_DS): expert s's input gradient at its rows, all d
        # features (step 2 sums the experts per patch).  dPre from registers when m took one pass,
        # else read back.
        w_s = w_ptr + s * stride_wk
        t_row = ((s * t_ring + b % t_ring) * l + i).to(tl.int64) * d
        if not ONE_PASS:
            tl.debug_barrier()  # this tile's dPre stores before its loads below
        for d0 in range(0, d, BLOCK_DT):
            c = d0 + tl.arange(0, BLOCK_DT)
            c_ok = c < d
            t = tl.zeros((BLOCK_R, BLOCK_DT), dtype=tl.float32)
            if ONE_PASS:
                w1 = tl.load(w_s + o1[:, None].to(tl.int64) * stride_wm + c[None, :].to(tl.int64) * stride_wd,
                             mask=(o1 < m)[:, None] & c_ok[None, :], other=0.0)
                t = tl.dot(dp1, w1, t, input_precision=PREC)
                if HAS_N2:
                    w2 = tl.load(w_s + o2[:, None].to(tl.int64) * stride_wm + c[None, :].to(tl.int64) * stride_wd,
                                 mask=(o2 < m)[:, None] & c_ok[None, :], other=0.0)
                    t = tl.dot(dp2, w2, t, input_precision=PREC)
            else:
                for m0 in range(0, m, BLOCK_N):
                    o = m0 + o1
                    dp = tl.load(dpre_ptr + dpre_row[:, None] + o[None, :], mask=ok[:, None] & (o < m)[None, :],
                                 other=0.0)
                    wt = tl.load(w_s + o[:, None].to(tl.int64) * stride_wm + c[None, :].to(tl.int64) * stride_wd,
                                 mask=(o < m)[:, None] & c_ok[None, :], other=0.0)
                    t = tl.dot(dp, wt, t, input_precision=PREC)
            if FUSE_DS:
                rt = tl.load(r_ptr + s * stride_rk + c.to(tl.int64) * stride_rd, mask=c_ok, other=0.0).to(tl.float32)
                t += ds[:, None] * rt[None, :]
            tl.store(t_ptr + t_row[:, None] + c[None, :], t.to(t_ptr.dtype.element_ty), mask=ok[:, None] & c_ok[None, :])


@triton.jit
def _rows_bwd_kernel(x_ptr, rows_ptr, w_ptr, b_ptr, r_ptr, idx_ptr, gates_ptr, inv_ptr, dy_ptr,
                     pre_ptr,  # (B, k, l, m) the forward's pre-activations (PRE_SAVED), in x's dtype
                     dpre_ptr, t_ptr, dg_ptr, ds_ptr, dx_ptr,
                     sync_ptr,  # int32 (2 + 2 * groups,) ticket counters (utils.take_ticket), zero between launches
                     B, n, k, l, m, d, Wp, p, GROUP, L_CHUNK, DX_BLOCKS,
                     t_ring,                                      # images t holds (B, or a ring of groups)
                     stride_xb, stride_xc, stride_xh, stride_xw,  # x: (B, C, H, W), any strides
                     stride_wk, stride_wm, stride_wd,             # weight: (k, m, d)
                     stride_bk, stride_bm,                        # bias: (k, m)
                     stride_rk, stride_rd,                        # router: (k, d)
                     stride_dyb, stride_dyn,                      # dy: (B, n, out), unit stride over out
                     stride_db, stride_dc, stride_dh, stride_dw,  # dx: like x
                     SOURCE: tl.constexpr, COMBINE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PRE_SAVED: tl.constexpr, FUSE_DS: tl.constexpr, ONE_PASS: tl.constexpr, DX_HERE: tl.constexpr,
                     PREC: tl.constexpr,
                     N_POW2: tl.constexpr, BLOCK_D: tl.constexpr, HAS_N2: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_DK: tl.constexpr,
                     BLOCK_DT: tl.constexpr, BLOCK_K: tl.constexpr, DX_N: tl.constexpr, BLOCK_DX: tl.constexpr):
    """Step 1 (module docstring), ticket-ordered per image group (utils.take_ticket):
        copies   GROUP programs copying the group's NCHW patch rows (SOURCE = SRC_ROWS), then
        tiles    k expert tiles (dpre_tile; wait for the copies unless PRE_SAVED: then they read
                 pre, not the rows, which only the dW programs of launch 2 need), then
        dX       GROUP * DX_BLOCKS programs (DX_HERE: dx_combine, one image and d block each; wait
                 for the k tiles, then count themselves done), when the score gradient is known
                 here (softmax fused: the tiles add dS router_s to T, or none).
    dpre: (k, B*l, m) and t: (k, t_ring*l, d) in x's dtype, image b's rows in slot b % t_ring (with
    DX_HERE a ring of the groups in flight: a tile of group g >= t_ring / GROUP first waits until
    group g - t_ring / GROUP's tiles and dX programs are done); dg / ds: (B, k, l) fp32."""
    copies = GROUP if SOURCE == SRC_ROWS else 0
    combines = GROUP * DX_BLOCKS if DX_HERE else 0
    groups = tl.cdiv(B, GROUP)
    ticket = take_ticket(sync_ptr)
    period = copies + k + combines
    g = ticket // period
    slot = ticket - g * period
    if slot < copies:
        b = g * GROUP + slot
        if b < B:
            copy_rows(b, x_ptr, rows_ptr, n, d, Wp, p, stride_xb, stride_xc, stride_xh, stride_xw, N_POW2, BLOCK_D)
        signal_group(sync_ptr, g)
    elif slot < copies + k:
        if not PRE_SAVED:
            wait_group(sync_ptr, g, copies)
        if DX_HERE:  # the T slot's last group: its tiles wrote it and its dX programs have read it
            wait_ring_slot(sync_ptr + groups, g, GROUP, t_ring, k + combines)
        dpre_tile(g, slot - copies, x_ptr, rows_ptr, w_ptr, b_ptr, r_ptr, idx_ptr, gates_ptr, dy_ptr, pre_ptr,
                  dpre_ptr, t_ptr, dg_ptr, ds_ptr, B, n, k, l, m, d, Wp, p, GROUP, L_CHUNK, t_ring, stride_xb,
                  stride_xc, stride_xh, stride_xw, stride_wk, stride_wm, stride_wd, stride_bk, stride_bm, stride_rk,
                  stride_rd, stride_dyb, stride_dyn,
                  SOURCE, COMBINE, ACT, HAS_BIAS, PRE_SAVED, FUSE_DS, ONE_PASS, HAS_N2, BLOCK_R, BLOCK_N, BLOCK_N2,
                  BLOCK_DK, BLOCK_DT, PREC)
        signal_group(sync_ptr + groups, g)
    else:
        wait_group(sync_ptr + groups, g, k)
        q = slot - copies - k  # image (q // DX_BLOCKS) of the group, d block (q % DX_BLOCKS)
        b = g * GROUP + q // DX_BLOCKS
        if b < B:
            dx_combine(b * DX_BLOCKS + q % DX_BLOCKS, t_ptr, r_ptr, ds_ptr, inv_ptr, ds_ptr, dx_ptr, B, n, k, l, d,
                       Wp, p, t_ring, stride_rk, stride_rd, stride_db, stride_dc, stride_dh, stride_dw, False, False,
                       DX_N, BLOCK_K, BLOCK_DX, PREC)
        signal_group(sync_ptr + groups, g)  # done reading the group's T: its ring slot may be rewritten
    finish_ticket(sync_ptr, tl.num_programs(0), 2 * groups)


@triton.jit
def dx_combine(pid, t_ptr, r_ptr, ds_ptr, inv_ptr, dsd_ptr, dx_ptr, B, n, k, l, d, Wp, p, t_ring, stride_rk, stride_rd,
               stride_db, stride_dc, stride_dh, stride_dw,
               HAS_DS: tl.constexpr, DENSE: tl.constexpr, N_POW2: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_DX: tl.constexpr, PREC: tl.constexpr):
    """dX of one image, one d block (module docstring, step 2): per patch, the sum over the
    experts that took it of T at its rank (inv), plus dS router_s with HAS_DS (where the step-1
    tiles have not added it to T already), plus softmax_all's dense term;
    every patch's row stored once, in x's dtype and layout (zeros where no expert took it)."""
    d_blocks = tl.cdiv(d, BLOCK_DX)
    b = (pid // d_blocks).to(tl.int64)
    c = (pid % d_blocks) * BLOCK_DX + tl.arange(0, BLOCK_DX)
    c_ok = c < d
    for j0 in range(0, n, N_POW2):
        j = j0 + tl.arange(0, N_POW2)
        j_ok = j < n
        acc = tl.zeros((N_POW2, BLOCK_DX), dtype=tl.float32)
        for s in range(0, k):
            rank = tl.load(inv_ptr + (b * k + s) * n + j, mask=j_ok, other=-1)
            took = rank >= 0
            row = (s * t_ring + b % t_ring) * l + rank
            acc += tl.load(t_ptr + row[:, None] * d + c[None, :], mask=took[:, None] & c_ok[None, :],
                           other=0.0).to(tl.float32)
            if HAS_DS:
                ds = tl.load(ds_ptr + (b * k + s) * l + rank, mask=took, other=0.0)
                rt = tl.load(r_ptr + s * stride_rk + c.to(tl.int64) * stride_rd, mask=c_ok, other=0.0).to(tl.float32)
                acc += ds[:, None] * rt[None, :]
        if DENSE:  # softmax_all: every patch's score has a gradient, dsd (B, k, n)
            e = tl.arange(0, BLOCK_K)
            dsd = tl.load(dsd_ptr + (b * k + e[None, :]) * n + j[:, None], mask=j_ok[:, None] & (e < k)[None, :],
                          other=0.0)
            rt = tl.load(r_ptr + e[:, None].to(tl.int64) * stride_rk + c[None, :].to(tl.int64) * stride_rd,
                         mask=(e < k)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(dsd, rt, acc, input_precision=PREC)
        ptrs = (dx_ptr + patch_row_offsets(tl.full((N_POW2,), b, tl.int64), j, Wp, p, stride_db, stride_dh,
                                           stride_dw)[:, None]
                + patch_col_offsets(c, p, stride_dc, stride_dh, stride_dw)[None, :])
        tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=j_ok[:, None] & c_ok[None, :])


@triton.jit
def dw_tile(pid, x_ptr, rows_ptr, idx_ptr, dpre_ptr, ds_ptr, dw_ptr, db_ptr, dr_ptr, part_ptr, count_ptr,
            B, n, k, l, m, d, Wp, p, SPLITS, stride_xb, stride_xc, stride_xh, stride_xw,
            SOURCE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DS: tl.constexpr, HAS_N2: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_DW: tl.constexpr, BLOCK_RK: tl.constexpr,
            PREC: tl.constexpr):
    """dW_s[:, d block] (all m), db_s and the router's sparse gradient over one split of expert
    s's B*l rows, as partials; the split that finishes last adds them (module docstring, step 2).
    part: (SPLITS, k, m*d + m + d) fp32 (dW, then db, then d router); count: int32
    (k * d blocks) zeros, left zero (the reducing program resets its counter)."""
    d_blocks = tl.cdiv(d, BLOCK_DW)
    q = pid % SPLITS
    rest = pid // SPLITS
    dblk = rest % d_blocks
    s = rest // d_blocks
    c = dblk * BLOCK_DW + tl.arange(0, BLOCK_DW)
    c_ok = c < d
    cols: tl.constexpr = BLOCK_N + BLOCK_N2 if HAS_N2 else BLOCK_N
    part = part_ptr + (q * k + s).to(tl.int64) * (m * d + m + d)
    rows = B * l
    per = tl.cdiv(tl.cdiv(rows, SPLITS), BLOCK_RK) * BLOCK_RK
    r_lo = q * per
    r_hi = tl.minimum(r_lo + per, rows)
    for n0 in range(0, m, cols):
        o1 = n0 + tl.arange(0, BLOCK_N)
        o2 = n0 + BLOCK_N + tl.arange(0, BLOCK_N2)
        first = n0 == 0
        acc1 = tl.zeros((BLOCK_N, BLOCK_DW), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N2, BLOCK_DW), dtype=tl.float32)
        db1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db2 = tl.zeros((BLOCK_N2,), dtype=tl.float32)
        dr = tl.zeros((BLOCK_DW,), dtype=tl.float32)
        for r0 in range(r_lo, r_hi, BLOCK_RK):
            r = r0 + tl.arange(0, BLOCK_RK)
            r_ok = r < r_hi
            b = (r // l).to(tl.int64)
            sel = (b * k + s) * l + r % l
            j = tl.load(idx_ptr + sel, mask=r_ok, other=0)
            src = source_rows(b, j, n, d, Wp, p, B, stride_xb, stride_xh, stride_xw, SOURCE)
            col_off = source_cols(c, p, stride_xc, stride_xh, stride_xw, SOURCE)
            if SOURCE == SRC_ROWS:
                xs = tl.load(rows_ptr + src[:, None] + col_off[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            else:
                xs = tl.load(x_ptr + src[:, None] + col_off[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            dpre_row = (s * rows + r).to(tl.int64) * m
            dp1 = tl.load(dpre_ptr + dpre_row[:, None] + o1[None, :], mask=r_ok[:, None] & (o1 < m)[None, :],
                          other=0.0)
            acc1 = tl.dot(tl.trans(dp1), xs, acc1, input_precision=PREC)
            db1 += tl.sum(dp1.to(tl.float32), axis=0)
            if HAS_N2:
                dp2 = tl.load(dpre_ptr + dpre_row[:, None] + o2[None, :], mask=r_ok[:, None] & (o2 < m)[None, :],
                              other=0.0)
                acc2 = tl.dot(tl.trans(dp2), xs, acc2, input_precision=PREC)
                db2 += tl.sum(dp2.to(tl.float32), axis=0)
            if HAS_DS:
                ds = tl.load(ds_ptr + sel, mask=r_ok, other=0.0)
                dr += tl.sum(ds[:, None] * xs.to(tl.float32), axis=0)
        tl.store(part + o1[:, None] * d + c[None, :], acc1, mask=(o1 < m)[:, None] & c_ok[None, :])
        if HAS_N2:
            tl.store(part + o2[:, None] * d + c[None, :], acc2, mask=(o2 < m)[:, None] & c_ok[None, :])
        if HAS_BIAS:
            if dblk == 0:
                tl.store(part + m * d + o1, db1, mask=o1 < m)
                if HAS_N2:
                    tl.store(part + m * d + o2, db2, mask=o2 < m)
        if HAS_DS:
            if first:
                tl.store(part + m * d + m + c, dr, mask=c_ok)
    tl.debug_barrier()  # this split's partials happen before its arrival
    arrived = tl.atomic_add(count_ptr + s * d_blocks + dblk, 1, sem="acq_rel")
    if arrived == SPLITS - 1:
        tl.store(count_ptr + s * d_blocks + dblk + tl.arange(0, 1), tl.zeros((1,), dtype=tl.int32))  # for the next launch
        tl.debug_barrier()
        dw_reduce(s, dblk, c, c_ok, part_ptr, dw_ptr, db_ptr, dr_ptr, k, m, d, SPLITS,
                  HAS_BIAS, HAS_DS, BLOCK_N, BLOCK_DW)


@triton.jit
def dw_reduce(s, dblk, c, c_ok, part_ptr, dw_ptr, db_ptr, dr_ptr, k, m, d, SPLITS,
              HAS_BIAS: tl.constexpr, HAS_DS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DW: tl.constexpr):
    """Add the SPLITS partials of (expert s, d block) in split order, BLOCK_N columns at a time;
    write dW (weight dtype), db (bias dtype) and the router's sparse gradient (router dtype, or
    fp32 when softmax_all adds its dense part after)."""
    for n0 in range(0, m, BLOCK_N):
        o = n0 + tl.arange(0, BLOCK_N)
        mask = (o < m)[:, None] & c_ok[None, :]
        tot = tl.zeros((BLOCK_N, BLOCK_DW), dtype=tl.float32)
        tb = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for q in range(0, SPLITS):
            part = part_ptr + (q * k + s).to(tl.int64) * (m * d + m + d)
            tot += tl.load(part + o[:, None] * d + c[None, :], mask=mask, other=0.0)
            if HAS_BIAS:
                if dblk == 0:
                    tb += tl.load(part + m * d + o, mask=o < m, other=0.0)
        tl.store(dw_ptr + (s * m + o).to(tl.int64)[:, None] * d + c[None, :], tot.to(dw_ptr.dtype.element_ty),
                 mask=mask)
        if HAS_BIAS:
            if dblk == 0:
                tl.store(db_ptr + s * m + o, tb.to(db_ptr.dtype.element_ty), mask=o < m)
    if HAS_DS:
        tr = tl.zeros((BLOCK_DW,), dtype=tl.float32)
        for q in range(0, SPLITS):
            tr += tl.load(part_ptr + (q * k + s).to(tl.int64) * (m * d + m + d) + m * d + m + c, mask=c_ok, other=0.0)
        tl.store(dr_ptr + s * d + c, tr.to(dr_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _dx_dw_kernel(x_ptr, rows_ptr, idx_ptr, inv_ptr, dpre_ptr, t_ptr, ds_ptr, dsd_ptr, r_ptr,
                  dx_ptr, dw_ptr, db_ptr, dr_ptr, part_ptr, count_ptr,
                  B, n, k, l, m, d, Wp, p, SPLITS, DX_PROGRAMS,
                  stride_xb, stride_xc, stride_xh, stride_xw,   # x: (B, C, H, W)
                  stride_rk, stride_rd,                         # router: (k, d)
                  stride_db, stride_dc, stride_dh, stride_dw,   # dx: like x
                  SOURCE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DS: tl.constexpr, DENSE: tl.constexpr,
                  PREC: tl.constexpr, N_POW2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DX: tl.constexpr,
                  HAS_N2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_DW: tl.constexpr,
                  BLOCK_RK: tl.constexpr):
    """Step 2 (module docstring).  t: (k, B*l, d) in x's dtype, T of step 1.  Grid: DX_PROGRAMS =
    B * cdiv(d, BLOCK_DX) dX programs, then k * cdiv(d, BLOCK_DW) * SPLITS dW programs."""
    pid = tl.program_id(0)
    if pid < DX_PROGRAMS:
        dx_combine(pid, t_ptr, r_ptr, ds_ptr, inv_ptr, dsd_ptr, dx_ptr, B, n, k, l, d, Wp, p, B, stride_rk, stride_rd,
                   stride_db, stride_dc, stride_dh, stride_dw, HAS_DS, DENSE, N_POW2, BLOCK_K, BLOCK_DX, PREC)
    else:
        dw_tile(pid - DX_PROGRAMS, x_ptr, rows_ptr, idx_ptr, dpre_ptr, ds_ptr, dw_ptr, db_ptr, dr_ptr, part_ptr,
                count_ptr, B, n, k, l, m, d, Wp, p, SPLITS, stride_xb, stride_xc, stride_xh, stride_xw,
                SOURCE, HAS_BIAS, HAS_DS, HAS_N2, BLOCK_N, BLOCK_N2, BLOCK_DW, BLOCK_RK, PREC)

"""Forward: routing, top-l, gates and the grouped expert GEMM in one launch.

One launch (MODE = FWD_FUSED) runs two kinds of programs, told apart by a ticket: an atomic
counter each program takes first, so tickets follow the order programs actually start.

  route program, one per image: routing.route_image.  Reads the image's patches once, keeps its
      (n, k) scores in registers, selects each expert's top-l and gates, writes idx / gates / inv
      and the concat zeros, and, for an NCHW map (SOURCE = SRC_ROWS), copies the image's patch
      rows K-contiguous into `rows` on the same pass.  Then it counts itself done on its group's
      counter (release).
  expert tile, one per (image group, expert): waits until the group's GROUP route programs are
      done (acquire), then runs that expert's GEMM over the group's GROUP*l chosen rows and all of
      its m outputs (expert_tile), writes them, and (SRC_ROWS) counts itself done on the counter.

`rows` holds `ring` images, image b in slot b % ring: all B, or, where the groups in flight are
fewer than all (configs.ring_images), a ring of whole groups small enough to stay in L2, so the
copy is L2 traffic and not a DRAM write of x's size.  Before it copies, a route program of group
g >= ring / GROUP waits until group g - ring / GROUP's route programs and tiles are all done
(GROUP + TILES on its counter): the slot's last readers.

Tickets are laid out group by group: GROUP route tickets, then TILES expert tickets, so the tiles
of a group start right after its routing, while its rows are still in L2 (for a channels-last
map the tiles gather straight from x, whose rows the route programs just read).  A program waits
only on smaller tickets, held by programs that already started: the smallest unfinished ticket
never waits, so there is no deadlock, whatever order the GPU starts programs in.  The
interpreter runs programs in order, so there nothing ever spins.  MODE = FWD_ROUTE / FWD_EXPERTS run the two halves as separate
launches (grids B and groups*TILES), for the split route (launch.py) and for tests.

Expert tiles (expert_tile).  Rows are (image, rank) pairs of GROUP whole images:
    r in [0, BLOCK_R):  image g*GROUP + r // L_CHUNK,  rank i0 + r % L_CHUNK
with L_CHUNK = l when whole images fit (GROUP = BLOCK_R // l), else GROUP = 1 and the tile loops
over chunks of L_CHUNK = BLOCK_R ranks.  Columns: BLOCK_N (+ BLOCK_N2 when HAS_N2), covering all
of m in one pass when m <= 256 (e.g. 160 = 128 + 32), so each row is gathered once per expert;
wider experts (the sum combine) take several passes.  Epilogue, by combine:
    concat:          y[b, j, s*m + o] = h                          (each element has one owner)
    sum:             y[b, j, o] += h   fp32 atomics, or, deterministic (TILES = 1: the tile runs
                                       experts 0..k-1 in order), read-modify-write
    pooled concat:   out[b, s*m + o] += sum over the image's rows   (one owner: read-modify-write)
    pooled sum:      out[b, o]       += ... atomics, or deterministic as sum
Saved for the backward: idx / gates / inv (and scores / lse for softmax_all) and, when the
caller will differentiate (SAVE_PRE), the pre-activations the tiles have in registers anyway,
(B, k, l, m) in x's dtype: the backward then neither re-reads the rows nor re-runs the GEMM (its
tiles would read each expert's weights twice).
"""
import triton
import triton.language as tl

from .modes import COMBINE_CONCAT, COMBINE_SUM, FWD_EXPERTS, FWD_FUSED, FWD_ROUTE, SRC_MAP, SRC_ROWS
from .routing import route_image
from .utils import (activation, finish_ticket, patch_col_offsets, patch_row_offsets, signal_group, take_ticket,
                    wait_group, wait_ring_slot)


@triton.jit
def tile_rows(g, i0, s, idx_ptr, gates_ptr, B, n, k, l, d, Wp, p, GROUP, L_CHUNK, ring, stride_xb, stride_xh,
              stride_xw, SOURCE: tl.constexpr, BLOCK_R: tl.constexpr):
    """Expert s's rows r in [0, BLOCK_R) of a tile (image group g, ranks from i0): image b
    (int64), rank i, the row's image slot in the group (for per-image reductions), validity, the
    (b, s, i) choice index sel, the chosen patch j, its gate, and the row's offset in the gather
    source (source_rows; ring: the images a rows copy holds)."""
    r = tl.arange(0, BLOCK_R)
    slot = r // L_CHUNK
    b = (g * GROUP + slot).to(tl.int64)
    i = i0 + r % L_CHUNK
    ok = (slot < GROUP) & (b < B) & (i < l)
    sel = (b * k + s) * l + i
    j = tl.load(idx_ptr + sel, mask=ok, other=0)
    gate = tl.load(gates_ptr + sel, mask=ok, other=0.0)
    row_off = source_rows(b, j, n, d, Wp, p, ring, stride_xb, stride_xh, stride_xw, SOURCE)
    return b, i, slot, ok, sel, j, gate, row_off


@triton.jit
def source_rows(b, j, n, d, Wp, p, ring, stride_xb, stride_xh, stride_xw, SOURCE: tl.constexpr):
    """int64 offsets of rows (b, j) in the gather source: the map through its strides
    (SRC_MAP), or the K-contiguous row copy (SRC_ROWS), which holds `ring` images (image b in
    slot b % ring: B, or the fused forward's ring)."""
    if SOURCE == SRC_MAP:
        return patch_row_offsets(b, j, Wp, p, stride_xb, stride_xh, stride_xw)
    elif SOURCE == SRC_ROWS:
        return ((b % ring) * n + j) * d
    else:
        tl.static_assert(False, "unknown source code")


@triton.jit
def source_cols(c, p, stride_xc, stride_xh, stride_xw, SOURCE: tl.constexpr):
    """int64 offsets of features c (unfold order) inside a row of the gather source."""
    if SOURCE == SRC_MAP:
        return patch_col_offsets(c, p, stride_xc, stride_xh, stride_xw)
    elif SOURCE == SRC_ROWS:
        return c.to(tl.int64)
    else:
        tl.static_assert(False, "unknown source code")


@triton.jit
def rows_gemm(src_ptr, row_off, ok, w_ptr, b_ptr, s, n0, m, d, p, stride_xc, stride_xh, stride_xw,
              stride_wk, stride_wm, stride_wd, stride_bk, stride_bm, SOURCE: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_N2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
              BLOCK_DK: tl.constexpr, PREC: tl.constexpr):
    """(BLOCK_R, BLOCK_N) and (BLOCK_R, BLOCK_N2) fp32 pre-activations W_s x + b_s of the gathered
    rows, columns n0.. and n0 + BLOCK_N.. of expert s's m (the second block only with HAS_N2):
    the K loop reads each row's d features once for both blocks; the bias starts the
    accumulators (no epilogue add to keep live)."""
    o1 = n0 + tl.arange(0, BLOCK_N)
    o2 = n0 + BLOCK_N + tl.arange(0, BLOCK_N2)
    w_s = w_ptr + s * stride_wk  # k*m*d < 2^31: a weight tensor of 8 GB would not fit
    acc1 = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_R, BLOCK_N2), dtype=tl.float32)
    if HAS_BIAS:
        acc1 += tl.load(b_ptr + s * stride_bk + o1 * stride_bm, mask=o1 < m, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(b_ptr + s * stride_bk + o2 * stride_bm, mask=o2 < m, other=0.0).to(tl.float32)[None, :]
    for d0 in range(0, d, BLOCK_DK):
        c = d0 + tl.arange(0, BLOCK_DK)
        c_ok = c < d
        col_off = source_cols(c, p, stride_xc, stride_xh, stride_xw, SOURCE)
        xs = tl.load(src_ptr + row_off[:, None] + col_off[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
        w1 = tl.load(w_s + o1[None, :].to(tl.int64) * stride_wm + c[:, None].to(tl.int64) * stride_wd,
                     mask=c_ok[:, None] & (o1 < m)[None, :], other=0.0)
        acc1 = tl.dot(xs, w1, acc1, input_precision=PREC)
        if HAS_N2:
            w2 = tl.load(w_s + o2[None, :].to(tl.int64) * stride_wm + c[:, None].to(tl.int64) * stride_wd,
                         mask=c_ok[:, None] & (o2 < m)[None, :], other=0.0)
            acc2 = tl.dot(xs, w2, acc2, input_precision=PREC)
    return acc1, acc2


@triton.jit
def expert_output(pre, gate, ACT: tl.constexpr):
    """h = G * act(pre), fp32."""
    return activation(pre, ACT) * gate[:, None]


@triton.jit
def store_output(h, y_ptr, b, y_first, y_rows, slot, ok, s, o, k, m, out_cols, GROUP,
                 COMBINE: tl.constexpr, POOLED: tl.constexpr, ATOMIC: tl.constexpr):
    """Place h (BLOCK_R, cols o of expert s) into y (B, n, out_cols) at rows y_first + y_rows
    (tile_offsets) or, pooled, add its per-image sums into out (B, out_cols) fp32 (see the module
    docstring for who owns what)."""
    if COMBINE == COMBINE_CONCAT:
        col = s * m + o
    elif COMBINE == COMBINE_SUM:
        col = o
    else:
        tl.static_assert(False, "unknown combine code")
    o_ok = o < m
    if POOLED:
        for t in range(0, GROUP):
            in_t = ok & (slot == t)
            part = tl.sum(tl.where(in_t[:, None], h, 0.0), axis=0)
            b_t = tl.max(tl.where(in_t, b, -1), axis=0)
            ptrs = y_ptr + b_t * out_cols + col
            if b_t >= 0:
                if ATOMIC:
                    tl.atomic_add(ptrs, part, mask=o_ok, sem="relaxed")
                else:
                    tl.store(ptrs, tl.load(ptrs, mask=o_ok, other=0.0) + part, mask=o_ok)
    else:
        ptrs = (y_ptr + y_first) + y_rows[:, None] + col[None, :]
        mask = ok[:, None] & o_ok[None, :]
        if COMBINE == COMBINE_CONCAT:
            tl.store(ptrs, h.to(y_ptr.dtype.element_ty), mask=mask)
        elif ATOMIC:
            tl.atomic_add(ptrs, h, mask=mask, sem="relaxed")
        else:
            tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + h, mask=mask)


@triton.jit
def tile_offsets(g, s, slot, b, i, j, sel, n, k, l, m, out_cols, GROUP, OFF32: tl.constexpr):
    """Element offsets of a tile's rows in y (B, n, out_cols), row (b, j), and in pre
    (B, k, l, m), row sel = (b*k + s)*l + i: (y_first, y_rows, pre_first, pre_rows), the rows at
    first + rows.
    OFF32 (launch.py: the tile's GROUP images span < 2^31 elements of each): first is the
    group's first row, int64, and rows int32 offsets from it (fewer live 64-bit registers in the
    epilogue); else first is 0 and rows int64."""
    if OFF32:
        b0 = (g * GROUP).to(tl.int64)
        y_first = b0 * n * out_cols
        y_rows = (slot * n + j.to(tl.int32)) * out_cols
        pre_first = (b0 * k + s) * l * m
        pre_rows = (slot * k * l + i) * m
    else:
        y_first = 0
        y_rows = (b * n + j) * out_cols
        pre_first = 0
        pre_rows = sel * m
    return y_first, y_rows, pre_first, pre_rows


@triton.jit
def store_pre(acc, pre_ptr, pre_first, pre_rows, ok, o, m):
    """The pre-activations of columns o (< m) at rows pre_first + pre_rows, in pre's dtype."""
    tl.store((pre_ptr + pre_first) + pre_rows[:, None] + o[None, :], acc.to(pre_ptr.dtype.element_ty),
             mask=ok[:, None] & (o < m)[None, :])


@triton.jit
def expert_tile(g, tile, x_ptr, rows_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, y_ptr, pre_ptr,
                B, n, k, l, m, d, out_cols, Wp, p, GROUP, L_CHUNK, TILES, ring,
                stride_xb, stride_xc, stride_xh, stride_xw, stride_wk, stride_wm, stride_wd, stride_bk, stride_bm,
                SOURCE: tl.constexpr, COMBINE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                POOLED: tl.constexpr, EXPERT_LOOP: tl.constexpr, SAVE_PRE: tl.constexpr, OFF32: tl.constexpr,
                HAS_N2: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_DK: tl.constexpr,
                PREC: tl.constexpr):
    """Expert `tile`'s GEMM over image group g, or, EXPERT_LOOP (TILES = 1, the deterministic
    sum), every expert in order; see the module docstring.  SAVE_PRE: the pre-activations also
    go to pre (B, k, l, m) in x's dtype, for the backward."""
    atomic: tl.constexpr = (COMBINE == COMBINE_SUM) and not EXPERT_LOOP
    cols: tl.constexpr = BLOCK_N + BLOCK_N2 if HAS_N2 else BLOCK_N
    if SOURCE == SRC_MAP:
        src_ptr = x_ptr
    else:
        src_ptr = rows_ptr
    if EXPERT_LOOP:
        s_lo = 0
        s_hi = k
    else:
        s_lo = tile
        s_hi = tile + 1
    for s in range(s_lo, s_hi):
        for i0 in range(0, l, L_CHUNK):
            b, i, slot, ok, sel, j, gate, row_off = tile_rows(g, i0, s, idx_ptr, gates_ptr, B, n, k, l, d, Wp, p,
                                                              GROUP, L_CHUNK, ring, stride_xb, stride_xh, stride_xw,
                                                              SOURCE, BLOCK_R)
            for n0 in range(0, m, cols):
                acc1, acc2 = rows_gemm(src_ptr, row_off, ok, w_ptr, b_ptr, s, n0, m, d, p, stride_xc, stride_xh,
                                       stride_xw, stride_wk, stride_wm, stride_wd, stride_bk, stride_bm, SOURCE,
                                       HAS_BIAS, HAS_N2, BLOCK_R, BLOCK_N, BLOCK_N2, BLOCK_DK, PREC)
                o1 = n0 + tl.arange(0, BLOCK_N)
                o2 = n0 + BLOCK_N + tl.arange(0, BLOCK_N2)
                y_first, y_rows, pre_first, pre_rows = tile_offsets(g, s, slot, b, i, j, sel, n, k, l, m, out_cols,
                                                                    GROUP, OFF32)
                if SAVE_PRE:
                    store_pre(acc1, pre_ptr, pre_first, pre_rows, ok, o1, m)
                    if HAS_N2:
                        store_pre(acc2, pre_ptr, pre_first, pre_rows, ok, o2, m)
                h1 = expert_output(acc1, gate, ACT)
                store_output(h1, y_ptr, b, y_first, y_rows, slot, ok, s, o1, k, m, out_cols, GROUP, COMBINE, POOLED,
                             atomic)
                if HAS_N2:
                    h2 = expert_output(acc2, gate, ACT)
                    store_output(h2, y_ptr, b, y_first, y_rows, slot, ok, s, o2, k, m, out_cols, GROUP, COMBINE,
                                 POOLED, atomic)
            if not atomic:
                tl.debug_barrier()  # read-modify-writes of the next chunk / expert see these


@triton.jit
def _forward_kernel(x_ptr, rows_ptr, r_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, gates_out_ptr, inv_ptr, scores_ptr,
                    lse_ptr, y_ptr,
                    pre_ptr,   # (B, k, l, m) pre-activations for the backward (SAVE_PRE), in x's dtype
                    sync_ptr,  # int32 (2 + groups,) ticket counters (utils.take_ticket), zero between launches
                    B, n, d, k, l, m, out_cols, Wp, p, GROUP, L_CHUNK, TILES,
                    ring,                                        # images `rows` holds (B, or a ring of groups)
                    stride_xb, stride_xc, stride_xh, stride_xw,  # x: (B, C, H, W), any strides
                    stride_rk, stride_rd,                        # router: (k, d)
                    stride_wk, stride_wm, stride_wd,             # weight: (k, m, d)
                    stride_bk, stride_bm,                        # bias: (k, m)
                    MODE: tl.constexpr, GATE: tl.constexpr, COMBINE: tl.constexpr, ACT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SOURCE: tl.constexpr, POOLED: tl.constexpr, ZERO_FILL: tl.constexpr,
                    STORE_SCORES: tl.constexpr, EXPERT_LOOP: tl.constexpr, SAVE_PRE: tl.constexpr,
                    OFF32: tl.constexpr, PREC: tl.constexpr,
                    N_POW2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    HAS_N2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
                    BLOCK_DK: tl.constexpr):
    """The pMoE forward (module docstring).  rows: (ring*n, d) in x's dtype (SRC_ROWS); idx/gates
    (B, k, l), gates_out the gates again in x's dtype (Routing.gates); inv (B, k, n) int32; scores (B, k, n) fp32 (STORE_SCORES); lse (B, k) fp32;
    y: (B, n, out_cols) in x's dtype (concat) or fp32 zeros (sum), or pooled (B, out_cols) fp32
    zeros; pre (B, k, l, m) in x's dtype (SAVE_PRE; OFF32: tile_offsets).  Grid: FUSED
    groups*(GROUP + TILES); ROUTE B; EXPERTS groups*TILES."""
    if MODE == FWD_FUSED:
        ticket = take_ticket(sync_ptr)
        period = GROUP + TILES
        g = ticket // period
        slot = ticket - g * period
        if slot < GROUP:
            b = g * GROUP + slot
            if SOURCE == SRC_ROWS:  # the slot's last group: routed, and all its tiles have read it
                wait_ring_slot(sync_ptr, g, GROUP, ring, GROUP + TILES)
            if b < B:
                route_image(b, x_ptr, r_ptr, rows_ptr, idx_ptr, gates_ptr, gates_out_ptr, inv_ptr, scores_ptr,
                            lse_ptr, y_ptr, n, d, k, l, m, out_cols, Wp, p, ring, stride_xb, stride_xc, stride_xh,
                            stride_xw, stride_rk, stride_rd, GATE, ZERO_FILL, STORE_SCORES, SOURCE == SRC_ROWS,
                            N_POW2, BLOCK_K, BLOCK_D, BLOCK_M, PREC)
            signal_group(sync_ptr, g)
        else:
            wait_group(sync_ptr, g, GROUP)
            expert_tile(g, slot - GROUP, x_ptr, rows_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, y_ptr, pre_ptr,
                        B, n, k, l, m, d, out_cols, Wp, p, GROUP, L_CHUNK, TILES, ring,
                        stride_xb, stride_xc, stride_xh, stride_xw, stride_wk, stride_wm, stride_wd,
                        stride_bk, stride_bm, SOURCE, COMBINE, ACT, HAS_BIAS, POOLED, EXPERT_LOOP, SAVE_PRE, OFF32,
                        HAS_N2, BLOCK_R, BLOCK_N, BLOCK_N2, BLOCK_DK, PREC)
            if SOURCE == SRC_ROWS:
                signal_group(sync_ptr, g)  # done reading the group's rows: its ring slot may be rewritten
        finish_ticket(sync_ptr, tl.num_programs(0), tl.cdiv(B, GROUP))
    elif MODE == FWD_ROUTE:
        route_image(tl.program_id(0), x_ptr, r_ptr, rows_ptr, idx_ptr, gates_ptr, gates_out_ptr, inv_ptr,
                    scores_ptr, lse_ptr, y_ptr, n, d, k, l, m, out_cols, Wp, p, ring, stride_xb, stride_xc, stride_xh, stride_xw,
                    stride_rk, stride_rd, GATE, ZERO_FILL, STORE_SCORES, SOURCE == SRC_ROWS,
                    N_POW2, BLOCK_K, BLOCK_D, BLOCK_M, PREC)
    elif MODE == FWD_EXPERTS:
        pid = tl.program_id(0)
        g = pid // TILES
        expert_tile(g, pid - g * TILES, x_ptr, rows_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, y_ptr, pre_ptr,
                    B, n, k, l, m, d, out_cols, Wp, p, GROUP, L_CHUNK, TILES, ring,
                    stride_xb, stride_xc, stride_xh, stride_xw, stride_wk, stride_wm, stride_wd,
                    stride_bk, stride_bm, SOURCE, COMBINE, ACT, HAS_BIAS, POOLED, EXPERT_LOOP, SAVE_PRE, OFF32,
                    HAS_N2, BLOCK_R, BLOCK_N, BLOCK_N2, BLOCK_DK, PREC)
    else:
        tl.static_assert(False, "unknown forward mode")

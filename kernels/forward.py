"""Expert forward: gathered patch rows x W_s^T (+ b_s), activation, gate, placed into y.

Rows are the (image, rank) pairs of one expert, flattened to B*l, so a tile of BLOCK_R rows
spans several images when l is small (l = 2..16 is common; tl.dot needs >= 16 rows): one
grouped GEMM per expert, the grid's third axis.  Each row's patch is gathered straight from the
(B, C, H, W) map (implicit GEMM) and its output written at the patch's place in y (B, n, out):
    concat: y[b, j, s*m:(s+1)*m] = h  (each (patch, expert) pair is unique: a plain store)
    sum:    y[b, j, :] += h           (atomics into an fp32 buffer), or, deterministic, one
            program per (image, m block) adds the experts in order 0..k-1 (no atomics).
Nothing is saved for backward here: pre-activations are recomputed (see op.py for the bytes).

Pooled variants (the paper's classifier sums the layer's output over all patches): the same
expert GEMM, but the epilogue reduces the tile's rows image by image and adds them into
out (B, out_cols), out[b, o] = sum_j y[b, j, o]; the (B, n, out) map is never written:
    _expert_pool_kernel      fp32 atomics, one per (image in the tile, column);
    _expert_pool_det_kernel  one program per (image, m block) sums experts 0..k-1 and their row
                             tiles in a fixed order: bit-identical run to run, no atomics.
"""
import triton
import triton.language as tl

from .utils import activation, expert_preact, patch_row_offsets, PRUNE, pick_configs

# Configs: the largest tiles that compile without spills on sm_90 and sm_80 for fp32 (tf32x3)
# and 16-bit inputs (bench/compile_report.py); the gathered addresses are int64 per element.
EXPERT_FWD_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "BLOCK_M": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_R": 64, "BLOCK_M": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
]
# one program per (image, m block): its row tiles hold one image's l patches
EXPERT_FWD_DET_CONFIGS = [
    triton.Config({"BLOCK_R": 16, "BLOCK_M": 32, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_R": 64, "BLOCK_M": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
]


@triton.jit
def _out_cols(s, mm, out_cols, k, COMBINE: tl.constexpr):
    """Output columns of expert s's channels mm: its own block for concat, shared for sum."""
    if COMBINE == 0:
        return s * (out_cols // k) + mm
    else:
        return mm


@triton.jit
def _expert_rows(x_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, b, i, row_ok, s, mm, m_ok, n, k, l, d, Wp, p,
                 sxb, sxc, sxh, sxw, swk, swm, swd, sbk, sbm, out_cols,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, COMBINE: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """h = G * act(W_s x_j + b_s) for rows (b, i) of expert s, and their offsets into y."""
    sel = (b * k + s) * l + i
    j = tl.load(idx_ptr + sel, mask=row_ok, other=0)
    g = tl.load(gates_ptr + sel, mask=row_ok, other=0.0)
    row_off = patch_row_offsets(b, j, Wp, p, sxb, sxh, sxw)
    pre = expert_preact(x_ptr, w_ptr, b_ptr, s, row_off, row_ok, mm, m_ok, d, p, sxc, sxh, sxw,
                        swk, swm, swd, sbk, sbm, HAS_BIAS, BLOCK_R, BLOCK_M, BLOCK_D, PREC)
    h = activation(pre, ACT) * g[:, None]
    y_off = (b * n + j)[:, None] * out_cols + _out_cols(s, mm, out_cols, k, COMBINE)[None, :]
    return h, y_off


@triton.autotune(configs=pick_configs(EXPERT_FWD_CONFIGS), key=["l", "m", "d", "COMBINE"], prune_configs_by=PRUNE, reset_to_zero=["y_ptr"])
@triton.jit
def _expert_fwd_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, y_ptr, B, n, k, l, m, d, Wp, p,
                       sxb, sxc, sxh, sxw, swk, swm, swd, sbk, sbm, out_cols,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, COMBINE: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """x: (B,C,H,W) any strides; w: (k, m, d); bias: (k, m); idx/gates: (B, k, l);
    y: (B, n, out_cols) contiguous (fp32 buffer for sum).  Grid: (cdiv(B*l, BLOCK_R), cdiv(m, BLOCK_M), k).
    reset_to_zero: the sum path accumulates, so autotuning must start each trial from zeros."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    s = tl.program_id(2)
    row_ok = r < B * l
    m_ok = mm < m
    b = (r // l).to(tl.int64)
    i = r % l
    h, y_off = _expert_rows(x_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, b, i, row_ok, s, mm, m_ok, n, k, l, d,
                            Wp, p, sxb, sxc, sxh, sxw, swk, swm, swd, sbk, sbm, out_cols,
                            HAS_BIAS, ACT, COMBINE, BLOCK_R, BLOCK_M, BLOCK_D, PREC)
    mask = row_ok[:, None] & m_ok[None, :]
    if COMBINE == 0:
        tl.store(y_ptr + y_off, h.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(y_ptr + y_off, h, mask=mask, sem="relaxed")


@triton.autotune(configs=pick_configs(EXPERT_FWD_DET_CONFIGS), key=["l", "m", "d"], prune_configs_by=PRUNE, restore_value=["y_ptr"])
@triton.jit
def _expert_fwd_sum_det_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, y_ptr, B, n, k, l, m, d, Wp, p,
                               sxb, sxc, sxh, sxw, swk, swm, swd, sbk, sbm, out_cols,
                               HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Bit-reproducible sum combine: this program alone owns y[b, :, m block] and adds experts
    0..k-1 in order.  An expert's l patches are distinct, so one tile never hits a y row twice;
    the barrier orders one tile's read-modify-write before the next tile's (threads differ).
    y: (B, n, m) fp32, zero-initialised.  Grid: (B, cdiv(m, BLOCK_M))."""
    b = tl.full((BLOCK_R,), tl.program_id(0), tl.int64)
    mm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = mm < m
    for s in range(0, k):
        for i0 in range(0, l, BLOCK_R):
            i = i0 + tl.arange(0, BLOCK_R)
            row_ok = i < l
            h, y_off = _expert_rows(x_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, b, i, row_ok, s, mm, m_ok, n, k, l,
                                    d, Wp, p, sxb, sxc, sxh, sxw, swk, swm, swd, sbk, sbm, out_cols,
                                    HAS_BIAS, ACT, 1, BLOCK_R, BLOCK_M, BLOCK_D, PREC)
            mask = row_ok[:, None] & m_ok[None, :]
            tl.store(y_ptr + y_off, tl.load(y_ptr + y_off, mask=mask, other=0.0) + h, mask=mask)
            tl.debug_barrier()


@triton.autotune(configs=pick_configs(EXPERT_FWD_CONFIGS), key=["l", "m", "d", "COMBINE"], prune_configs_by=PRUNE, reset_to_zero=["out_ptr"])
@triton.jit
def _expert_pool_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, out_ptr, B, n, k, l, m, d, Wp, p,
                        sxb, sxc, sxh, sxw, swk, swm, swd, sbk, sbm, out_cols,
                        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, COMBINE: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, cols] += sum over this tile's rows of image b of h.  out: (B, out_cols) fp32 zeroed.
    Grid: (cdiv(B*l, BLOCK_R), cdiv(m, BLOCK_M), k), the rows as in _expert_fwd_kernel.

    Rows are image-major (r = b*l + i), so the tile holds images r0 // l .. (r_end - 1) // l,
    at most BLOCK_R of them (l = 1), usually 1 + BLOCK_R // l.  Each image's rows are picked with
    tl.where, not multiplied by a 0/1 matrix: a NaN/inf row of one image must not reach another
    image's sum (0 * inf = NaN)."""
    r0 = tl.program_id(0) * BLOCK_R
    r = r0 + tl.arange(0, BLOCK_R)
    mm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    s = tl.program_id(2)
    row_ok = r < B * l
    m_ok = mm < m
    b = (r // l).to(tl.int64)
    i = r % l
    h, _ = _expert_rows(x_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, b, i, row_ok, s, mm, m_ok, n, k, l, d,
                        Wp, p, sxb, sxc, sxh, sxw, swk, swm, swd, sbk, sbm, out_cols,
                        HAS_BIAS, ACT, COMBINE, BLOCK_R, BLOCK_M, BLOCK_D, PREC)
    cols = _out_cols(s, mm, out_cols, k, COMBINE)
    b_first = (r0 // l).to(tl.int64)
    n_img = (tl.minimum(r0 + BLOCK_R, B * l) - 1) // l - b_first + 1
    for t in range(0, n_img):
        part = tl.sum(tl.where((b == b_first + t)[:, None], h, 0.0), axis=0)
        tl.atomic_add(out_ptr + (b_first + t) * out_cols + cols, part, mask=m_ok, sem="relaxed")


@triton.autotune(configs=pick_configs(EXPERT_FWD_DET_CONFIGS), key=["l", "m", "d", "COMBINE"], prune_configs_by=PRUNE)
@triton.jit
def _expert_pool_det_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, out_ptr, B, n, k, l, m, d, Wp, p,
                            sxb, sxc, sxh, sxw, swk, swm, swd, sbk, sbm, out_cols,
                            HAS_BIAS: tl.constexpr, ACT: tl.constexpr, COMBINE: tl.constexpr, PREC: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Bit-reproducible pooled forward: this program alone owns out[b, column block(s)], sums
    its l rows tile by tile and the experts 0..k-1 in order, and stores each value once (in
    out's dtype: no fp32 buffer).  out: (B, out_cols).  Grid: (B, cdiv(m, BLOCK_M))."""
    b = tl.full((BLOCK_R,), tl.program_id(0), tl.int64)
    mm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = mm < m
    out_row = out_ptr + tl.program_id(0).to(tl.int64) * out_cols
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s in range(0, k):
        for i0 in range(0, l, BLOCK_R):
            i = i0 + tl.arange(0, BLOCK_R)
            row_ok = i < l
            h, _ = _expert_rows(x_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, b, i, row_ok, s, mm, m_ok, n, k, l,
                                d, Wp, p, sxb, sxc, sxh, sxw, swk, swm, swd, sbk, sbm, out_cols,
                                HAS_BIAS, ACT, COMBINE, BLOCK_R, BLOCK_M, BLOCK_D, PREC)
            acc += tl.sum(tl.where(row_ok[:, None], h, 0.0), axis=0)
        if COMBINE == 0:  # concat: expert s owns its own channel block
            tl.store(out_row + _out_cols(s, mm, out_cols, k, COMBINE), acc.to(out_ptr.dtype.element_ty), mask=m_ok)
            acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if COMBINE == 1:
        tl.store(out_row + mm, acc.to(out_ptr.dtype.element_ty), mask=m_ok)

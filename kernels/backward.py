"""Expert backward, three launches over the B*l gathered rows of each expert (grouped GEMMs):

  1. `_dpre_kernel`  recompute pre = W_s x_j + b_s (never stored by the forward), then
                     dG_j = <dY_j, act(pre_j)>  and  dPre_j = G_j dY_j act'(pre_j)  -> (k, B*l, m);
                     dY is read through strides, so the pooled layer's (B, out) gradient serves
                     as dY_j = dP_b for every patch (stride 0 over patches).
  2. `_dx_kernel`    dX_j += dPre_j W_s + dS_j router_s, scattered straight into the fp32 (B,C,H,W)
                     gradient (implicit-GEMM scatter).  Several experts may take one patch: fp32
                     atomics, or in deterministic mode one program per (image, d block) adding the
                     experts in order 0..k-1.
  3. `_dw_kernel`    dW_s = dPre_s^T X_s, db_s = sum dPre_s, d router_s = sum dS_j x_j: one program
                     per output tile walks all B*l rows in order (deterministic, no atomics).
dS (the score gradient, between 1 and 2) comes from routing._gate_bwd_kernel.
"""
import triton
import triton.language as tl

from .utils import (activation, activation_grad, expert_preact, patch_col_offsets, patch_row_offsets,
                    PRUNE, pick_configs)

# Configs: the largest tiles that compile without spills on sm_90 and sm_80 (compile_report).
DPRE_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "BLOCK_M": 32, "BLOCK_D": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_R": 64, "BLOCK_M": 32, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_R": 32, "BLOCK_M": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
]
DX_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "BLOCK_D": 32, "BLOCK_M": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_R": 64, "BLOCK_D": 64, "BLOCK_M": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_R": 128, "BLOCK_D": 64, "BLOCK_M": 32}, num_warps=8, num_stages=2),
]
DX_DET_CONFIGS = [
    triton.Config({"BLOCK_R": 16, "BLOCK_D": 32, "BLOCK_M": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_R": 64, "BLOCK_D": 64, "BLOCK_M": 16}, num_warps=8, num_stages=2),
]
DW_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_D": 32, "BLOCK_R": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_D": 64, "BLOCK_R": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_D": 64, "BLOCK_R": 32}, num_warps=8, num_stages=2),
]


@triton.autotune(configs=pick_configs(DPRE_CONFIGS), key=["l", "m", "d"], prune_configs_by=PRUNE)
@triton.jit
def _dpre_kernel(x_ptr, w_ptr, b_ptr, idx_ptr, gates_ptr, dy_ptr, dpre_ptr, dg_ptr, B, n, k, l, m, d, Wp, p,
                 sxb, sxc, sxh, sxw, swk, swm, swd, sbk, sbm, sdyb, sdyn,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, COMBINE: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dy: (B, n, out) with strides (sdyb, sdyn, 1): sdyn = 0 is the pooled layer's gradient, one
    (B, out) row per image broadcast to all its patches (never materialised); dpre: (k, B*l, m)
    in x's dtype; dg: (B, k, l) fp32.
    One program owns BLOCK_R rows of expert s and loops over all of m, so dG (a sum over m)
    needs no atomics.  Grid: (cdiv(B*l, BLOCK_R), k)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    s = tl.program_id(1)
    row_ok = r < B * l
    b = (r // l).to(tl.int64)
    i = r % l
    sel = (b * k + s) * l + i
    j = tl.load(idx_ptr + sel, mask=row_ok, other=0)
    g = tl.load(gates_ptr + sel, mask=row_ok, other=0.0)
    row_off = patch_row_offsets(b, j, Wp, p, sxb, sxh, sxw)
    if COMBINE == 0:
        col0 = s * m
    else:
        col0 = 0
    dy_row = b * sdyb + j * sdyn + col0
    dpre_row = (s * B * l + r).to(tl.int64) * m  # row numbers k*B*l < 2^31; offsets int64
    dg = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        mm = m0 + tl.arange(0, BLOCK_M)
        m_ok = mm < m
        mask = row_ok[:, None] & m_ok[None, :]
        pre = expert_preact(x_ptr, w_ptr, b_ptr, s, row_off, row_ok, mm, m_ok, d, p, sxc, sxh, sxw,
                            swk, swm, swd, sbk, sbm, HAS_BIAS, BLOCK_R, BLOCK_M, BLOCK_D, PREC)
        dyt = tl.load(dy_ptr + dy_row[:, None] + mm[None, :], mask=mask, other=0.0).to(tl.float32)
        dg += tl.sum(dyt * activation(pre, ACT), axis=1)
        dp = dyt * g[:, None] * activation_grad(pre, ACT)
        tl.store(dpre_ptr + dpre_row[:, None] + mm[None, :], dp.to(dpre_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + sel, dg, mask=row_ok)


@triton.jit
def _dx_rows(dpre_ptr, w_ptr, r_ptr, ds_ptr, idx_ptr, b, i, row_ok, s, c, c_ok, B, n, k, l, m, Wp, p,
             swk, swm, swd, srk, srd, sdb, sdc, sdh, sdw,
             HAS_DS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
             PREC: tl.constexpr):
    """(BLOCK_R, BLOCK_D) fp32 input gradient of rows (b, i) of expert s, and its dx offsets."""
    sel = (b * k + s) * l + i
    j = tl.load(idx_ptr + sel, mask=row_ok, other=0)
    dpre_row = (s * B * l + b * l + i) * m
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        mm = m0 + tl.arange(0, BLOCK_M)
        m_ok = mm < m
        dpt = tl.load(dpre_ptr + dpre_row[:, None] + mm[None, :], mask=row_ok[:, None] & m_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + s * swk + mm[:, None].to(tl.int64) * swm + c[None, :].to(tl.int64) * swd,
                     mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(dpt, wt, acc, input_precision=PREC)
    if HAS_DS:
        ds = tl.load(ds_ptr + sel, mask=row_ok, other=0.0)
        rt = tl.load(r_ptr + s * srk + c.to(tl.int64) * srd, mask=c_ok, other=0.0).to(tl.float32)
        acc += ds[:, None] * rt[None, :]
    dx_off = patch_row_offsets(b, j, Wp, p, sdb, sdh, sdw)[:, None] + patch_col_offsets(c, p, sdc, sdh, sdw)[None, :]
    return acc, dx_off


@triton.autotune(configs=pick_configs(DX_CONFIGS), key=["l", "m", "d"], prune_configs_by=PRUNE, reset_to_zero=["dx_ptr"])
@triton.jit
def _dx_kernel(dpre_ptr, w_ptr, r_ptr, ds_ptr, idx_ptr, dx_ptr, B, n, k, l, m, d, Wp, p,
               swk, swm, swd, srk, srd, sdb, sdc, sdh, sdw,
               HAS_DS: tl.constexpr, PREC: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """dx: fp32 (B, C, H, W) zero-initialised (strides sd*).  Grid: (cdiv(B*l, BLOCK_R), cdiv(d, BLOCK_D), k)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.program_id(2)
    row_ok = r < B * l
    c_ok = c < d
    b = (r // l).to(tl.int64)
    i = r % l
    acc, dx_off = _dx_rows(dpre_ptr, w_ptr, r_ptr, ds_ptr, idx_ptr, b, i, row_ok, s, c, c_ok, B, n, k, l, m, Wp, p,
                           swk, swm, swd, srk, srd, sdb, sdc, sdh, sdw, HAS_DS, BLOCK_R, BLOCK_D, BLOCK_M, PREC)
    tl.atomic_add(dx_ptr + dx_off, acc, mask=row_ok[:, None] & c_ok[None, :], sem="relaxed")


@triton.autotune(configs=pick_configs(DX_DET_CONFIGS), key=["l", "m", "d"], prune_configs_by=PRUNE, restore_value=["dx_ptr"])
@triton.jit
def _dx_det_kernel(dpre_ptr, w_ptr, r_ptr, ds_ptr, idx_ptr, dx_ptr, B, n, k, l, m, d, Wp, p,
                   swk, swm, swd, srk, srd, sdb, sdc, sdh, sdw,
                   HAS_DS: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Bit-reproducible dX: this program alone owns image b's features in its d block and adds
    experts 0..k-1 in order (read-modify-write; the barrier orders tiles, see the forward).
    Grid: (B, cdiv(d, BLOCK_D))."""
    b = tl.full((BLOCK_R,), tl.program_id(0), tl.int64)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    c_ok = c < d
    for s in range(0, k):
        for i0 in range(0, l, BLOCK_R):
            i = i0 + tl.arange(0, BLOCK_R)
            row_ok = i < l
            acc, dx_off = _dx_rows(dpre_ptr, w_ptr, r_ptr, ds_ptr, idx_ptr, b, i, row_ok, s, c, c_ok, B, n, k, l, m,
                                   Wp, p, swk, swm, swd, srk, srd, sdb, sdc, sdh, sdw,
                                   HAS_DS, BLOCK_R, BLOCK_D, BLOCK_M, PREC)
            mask = row_ok[:, None] & c_ok[None, :]
            tl.store(dx_ptr + dx_off, tl.load(dx_ptr + dx_off, mask=mask, other=0.0) + acc, mask=mask)
            tl.debug_barrier()


@triton.autotune(configs=pick_configs(DW_CONFIGS), key=["l", "m", "d"], prune_configs_by=PRUNE)
@triton.jit
def _dw_kernel(x_ptr, idx_ptr, dpre_ptr, ds_ptr, dw_ptr, db_ptr, dr_ptr, B, n, k, l, m, d, Wp, p,
               sxb, sxc, sxh, sxw,
               HAS_BIAS: tl.constexpr, HAS_DS: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """dw: (k, m, d) fp32; db: (k, m) fp32; dr: (k, d) fp32 (the router's sparse part).
    The reduction runs over all B*l rows inside one program (fixed order).  Grid:
    (cdiv(m, BLOCK_M), cdiv(d, BLOCK_D), k); the bias sum is stored by the d-block-0 programs and
    the router sum by the m-block-0 ones (the others compute and drop them: elementwise, cheap)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    s = tl.program_id(2)
    mm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok = mm < m
    c_ok = c < d
    col_off = patch_col_offsets(c, p, sxc, sxh, sxw)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dr = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r0 in range(0, B * l, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        row_ok = r < B * l
        b = (r // l).to(tl.int64)
        sel = (b * k + s) * l + r % l
        j = tl.load(idx_ptr + sel, mask=row_ok, other=0)
        xt = tl.load(x_ptr + patch_row_offsets(b, j, Wp, p, sxb, sxh, sxw)[:, None] + col_off[None, :],
                     mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        dpt = tl.load(dpre_ptr + (s * B * l + r).to(tl.int64)[:, None] * m + mm[None, :],
                      mask=row_ok[:, None] & m_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dpt), xt, acc, input_precision=PREC)
        if HAS_BIAS:
            db += tl.sum(dpt.to(tl.float32), axis=0)
        if HAS_DS:
            ds = tl.load(ds_ptr + sel, mask=row_ok, other=0.0)
            dr += tl.sum(ds[:, None] * xt.to(tl.float32), axis=0)
    tl.store(dw_ptr + (s * m + mm).to(tl.int64)[:, None] * d + c[None, :], acc, mask=m_ok[:, None] & c_ok[None, :])
    if HAS_BIAS:
        if pid_d == 0:
            tl.store(db_ptr + s * m + mm, db, mask=m_ok)
    if HAS_DS:
        if pid_m == 0:
            tl.store(dr_ptr + s * d + c, dr, mask=c_ok)

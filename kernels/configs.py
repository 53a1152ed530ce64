"""Launch configurations: a small table for the shapes this project benchmarks, rules for the rest.

No autotuning: a config is a pure function of the shape, the dtype and the GPU generation, so
every run of a shape launches the same code (deterministic mode needs nothing more), the
interpreter runs exactly what the GPU would (bench/traffic.py models that), and
bench/compile_report.py compiles exactly these.  The table is where a GPU session's tuning lands
(bench/gpu_check.py prints the config it ran beside each time); an autotuner over its neighbours,
for runs that need not be deterministic, can come once a GPU can time them.

Sizes are chosen from the traffic model and the compile report, not guessed:
- expert tiles of BLOCK_R rows (whole images: GROUP = BLOCK_R // l of them) read each expert's
  weights B*l/BLOCK_R times, which is most of an NCHW forward's L2 traffic: 128 rows in the
  sm_90 16-bit forward (in K steps of 32, 2 stages: the accumulator takes the registers), 64 in
  its backward (rows_bwd also keeps dPre and T live), in the sum combine's forward and where
  the forward gathers p x p patches from a channels-last map, 32 elsewhere: the largest that
  compile without spills on Triton 3.6 to 3.9;
- BLOCK_N (+ BLOCK_N2) covers all of an expert's m <= 256 outputs (160 = 128 + 32), so each
  gathered row is read once per expert;
- the route program holds an image's (N_POW2, BLOCK_K) scores: up to ROUTE_MAX_LANES of them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

import triton

ROUTE_MAX_LANES = 4096  # next_pow2(n) * next_pow2(k): above it the split route runs (launch.py)
MAX_COLS = 256          # output columns per pass of an expert tile


def _np2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _prev_pow2(v: int) -> int:
    return 1 << (max(int(v), 1).bit_length() - 1)


@dataclass(frozen=True)
class ForwardConfig:
    # route programs
    n_pow2: int      # patches per image, padded
    block_k: int     # experts per score tile (>= 16: tl.dot)
    block_d: int     # features per step of the score loop
    block_m: int     # output columns per zero-fill store
    # expert tiles
    block_r: int     # rows per tile
    group: int       # whole images per tile (1 when l > block_r: the tile loops over chunks)
    l_chunk: int     # ranks per image per chunk
    block_n: int     # first column block
    block_n2: int    # second column block (used when has_n2)
    has_n2: bool
    block_dk: int    # features per step of the expert K loop
    num_warps: int
    num_stages: int

    @property
    def route_lanes(self) -> int:
        return self.n_pow2 * self.block_k


def column_blocks(m: int, max_cols: int = MAX_COLS) -> tuple[int, int, bool]:
    """(BLOCK_N, BLOCK_N2, HAS_N2): a first block of at most max_cols / 2 columns and a second of
    at most half of it and max_cols / 8, covering m in one pass with little padding where they
    can (160 -> 128 + 32, 96 -> 64 + 32, 128 -> 128); wider m runs passes of max_cols / 4 columns
    (the passes keep more live across the K loop: 300 -> 5 x 64)."""
    first = max(16, min(max_cols // 2, _prev_pow2(m)))
    rest = m - first
    if rest <= 0:
        return first, 16, False
    second = max(16, min(first // 2, max_cols // 8, _np2(rest)))
    if first + second < m:
        return max(16, max_cols // 4), 16, False
    return first, second, True


@dataclass(frozen=True)
class Budget:
    """The largest tiles that compile without spills for one GPU generation and element size
    (bench/compile_report.py checks every launch of kernels/registry.py against this)."""
    block_r: int       # the forward's expert tile rows
    rows_block_r: int  # the backward's expert tile rows (rows_bwd keeps dPre and T live as well)
    max_cols: int      # expert tile columns per pass
    fwd_warps: int     # the forward kernel
    rows_warps: int    # the backward's expert tiles (rows_bwd)
    dxdw_warps: int    # the backward's dX / dW programs
    block_dt: int      # features per step of T = dPre @ W_s
    dw_lanes: int      # dW accumulator: columns x features
    stages: int
    fwd_dk: int = 0      # K step and stages of forward tiles wider than the backward's (0: the
    fwd_stages: int = 0  # backward's): a 128-row accumulator leaves fewer registers to the pipeline


# (sm >= 90: wgmma; else mma.sync) x (2: bf16/fp16; 4: fp32 as tf32x3, three products a dot).
# Every kernel runs 8 warps with ptxas allowed all 255 registers (MAXNREG): left to itself,
# ptxas caps some 8-warp kernels at 128 registers and spills; at 4 warps (2 CTAs an SM) the
# forward's epilogue-heavy variants spill on both generations.  One CTA of 8 warps an SM is the
# same 8 warps an SM as two of 4.
MAXNREG = 255


def max_registers(num_warps: int) -> int:
    """Registers a thread may use so that one CTA of num_warps fits an SM's 64K registers."""
    return min(MAXNREG, 65536 // (32 * num_warps))


BUDGETS = {
    (90, 2): Budget(128, 64, 256, fwd_warps=8, rows_warps=8, dxdw_warps=8, block_dt=64, dw_lanes=32768, stages=3,
                    fwd_dk=32, fwd_stages=2),
    (90, 4): Budget(32, 32, 64, fwd_warps=8, rows_warps=8, dxdw_warps=8, block_dt=16, dw_lanes=4096, stages=3),
    (80, 2): Budget(32, 32, 128, fwd_warps=8, rows_warps=8, dxdw_warps=8, block_dt=32, dw_lanes=8192, stages=2),
    (80, 4): Budget(32, 32, 64, fwd_warps=8, rows_warps=8, dxdw_warps=8, block_dt=16, dw_lanes=2048, stages=2),
}


def budget(elt_bytes: int, sm: int) -> Budget:
    return BUDGETS[(90 if sm >= 90 else 80, 2 if elt_bytes <= 2 else 4)]


# The fused forward's K-contiguous row copy of an NCHW map (SRC_ROWS), and the backward's T when
# its dX programs run in the same launch, are rings of whole image groups: group g's writers wait
# until group g - ring's readers are done with the slot.  A ring
# spans the groups in flight (one CTA an SM: SMs / (GROUP + TILES) groups' programs) and one
# more, so a route program finds its slot free as the oldest group finishes; a ring over half the
# 50 MB L2 of an H100 / H200 would not stay on chip while x and y stream past, and the copy is then
# the size of x (B images).  In L2 the copy costs L2 traffic, not DRAM traffic.  Untested on a GPU
# so far: PMOE_RING_BYTES (bytes; 0: no ring, always B images) overrides the cap for a process,
# read at each launch (a bad value is a ValueError there, not at import), and RING_BYTES, when
# set, overrides both (bench/gpu_check.py's ring section times the layer with and without rings).
RING_BYTES_DEFAULT = 24 << 20
RING_BYTES: Optional[int] = None


def _ring_bytes_from_env() -> int:
    text = os.environ.get("PMOE_RING_BYTES")
    if text is None or not text.strip():
        return RING_BYTES_DEFAULT
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"PMOE_RING_BYTES={text!r}: expected a whole number of bytes (0: no ring)") from None
    if value < 0:
        raise ValueError(f"PMOE_RING_BYTES={value}: must be >= 0 (0: no ring)")
    return value


# Whether the layer keeps its experts' pre-activations for the backward (pmoe.functional passes
# save_pre to the op where autograd records the call): the backward's tiles then read them instead
# of re-gathering their rows and re-running the GEMM, which reads each expert's weights again.
# The traffic model says so (10.5 MB read and written, 73 MB less L2 traffic at WRN-pMoE); gpu_check's pre
# section times both ways on a GPU by setting this to False.
SAVE_PRE = True


def ring_bytes() -> int:
    """The rings' cap: RING_BYTES if set, else PMOE_RING_BYTES, else RING_BYTES_DEFAULT."""
    return RING_BYTES if RING_BYTES is not None else _ring_bytes_from_env()


def ring_images(B: int, group: int, period: int, image_bytes: int, sms: int = 132) -> int:
    """Images a ring of image groups holds (see RING_BYTES, ring_bytes()): B, or whole groups.
    period: the tickets of one group (forward: GROUP route programs + TILES; backward: copies,
    tiles and dX programs); image_bytes: what one image takes in the ring."""
    groups = triton.cdiv(B, group)
    ring = max(2, triton.cdiv(sms, period) + 1)
    if ring >= groups or ring * group * image_bytes > ring_bytes():  # (a cap of 0: always B)
        return B
    return ring * group


def route_fits(n: int, k: int) -> bool:
    """Whether one route program can hold an image's scores (else the split route runs)."""
    return k <= 64 and max(16, _np2(n)) * max(16, _np2(k)) <= ROUTE_MAX_LANES


def expert_rows(l: int, block_r: int) -> tuple[int, int]:
    """(GROUP, L_CHUNK): whole images per tile when l <= block_r, else chunks of one image."""
    if l <= block_r:
        return block_r // l, l
    return 1, block_r


def forward_config(n: int, d: int, k: int, l: int, m: int, elt_bytes: int, sm: int = 90,
                   sum_combine: bool = False, map_patches: bool = False, pooled_pre: bool = False) -> ForwardConfig:
    """The forward's config for n patches of d features, k experts taking l each, m outputs each,
    elements of elt_bytes (2: bf16/fp16, 4: fp32), on a GPU of compute capability sm (90 = H100).
    At most the backward's rows (128 spill there) for the sum combine (sum_combine: its epilogues,
    fp32 atomics or the deterministic expert loop's read-modify-write, keep more live), for
    p x p patches gathered straight from a channels-last map (map_patches: 64-bit offsets a row
    and a column) and for the pooled epilogue that also stores the pre-activations (pooled_pre:
    its per-image sums keep the outputs live)."""
    bud = budget(elt_bytes, sm)
    n_pow2 = max(16, _np2(n))
    narrow = sum_combine or map_patches or pooled_pre
    block_r = min(bud.block_r, bud.rows_block_r) if narrow else bud.block_r
    if block_r > bud.rows_block_r and bud.fwd_dk:  # wider than the backward's: the forward's own K step, stages
        dk, stages = bud.fwd_dk, bud.fwd_stages
    else:
        dk, stages = block_dk(elt_bytes), bud.stages
    group, l_chunk = expert_rows(l, block_r)
    block_n, block_n2, has_n2 = column_blocks(m, bud.max_cols)
    return ForwardConfig(n_pow2=n_pow2, block_k=max(16, _np2(k)),
                         block_d=max(16, min(64, 4096 // n_pow2)),  # (n_pow2, block_d): <= 32 a thread
                         block_m=max(16, min(64, 2048 // n_pow2)),
                         block_r=block_r, group=group, l_chunk=l_chunk, block_n=block_n, block_n2=block_n2,
                         has_n2=has_n2, block_dk=dk, num_warps=bud.fwd_warps, num_stages=stages)


def block_dk(elt_bytes: int) -> int:
    """Features per K step of an expert tile: 128 bytes of each row."""
    return 64 if elt_bytes == 2 else 32


@dataclass(frozen=True)
class BackwardConfig:
    fwd: ForwardConfig  # the expert tiles of step 1 are the forward's (rows, columns, K steps)
    block_dt: int       # features per step of T = dPre @ W_s in the tiles
    # dX programs
    n_block: int        # patches per step (power of two; one step unless n is large)
    block_dx: int       # features per dX program
    # dW programs
    block_dw: int       # features per dW program
    block_rk: int       # rows per step of the split's reduction
    splits: int         # splits of the B*l rows per (expert, d block)
    num_warps: int


DX_MAX_LANES = 4096  # (patches, features) of a dX program: 32 fp32 accumulators a thread at 4 warps


def backward_config(B: int, n: int, d: int, k: int, l: int, m: int, elt_bytes: int, sm: int = 90,
                    sms: int = 132) -> BackwardConfig:
    """The backward's config (see forward_config); sms: the GPU's multiprocessors (132: H100
    SXM), so the dW programs fill a wave.  A dX program covers all n patches of one image and
    reads the image's inv (k*n ranks) once per d block, so its d blocks are as wide as the
    lanes allow (64 features of 64 patches a step, not 16 of 256: at the large shape a quarter
    of the inv traffic).  Its stores stay whole sectors: on an NCHW map 64 patches are runs of
    p * min(Wp, 64) positions along the map's rows, on a channels-last map 64 unfold-order
    features are p*p runs of 64 / p^2 channels (32 bytes at p = 2 in 16-bit)."""
    bud = budget(elt_bytes, sm)
    group, l_chunk = expert_rows(l, bud.rows_block_r)
    fwd = dataclasses.replace(forward_config(n, d, k, l, m, elt_bytes, sm), num_warps=bud.rows_warps,
                              block_r=bud.rows_block_r, group=group, l_chunk=l_chunk, block_dk=block_dk(elt_bytes),
                              num_stages=bud.stages)
    n_block = min(_np2(n), 64)
    cols = fwd.block_n + (fwd.block_n2 if fwd.has_n2 else 0)
    # dPre is re-read once per d block: wide dW blocks, as far as the accumulator allows
    block_dw = max(16, min(128 if cols >= 64 else 64, _prev_pow2(bud.dw_lanes // cols)))
    # splits: one wave of dW programs at least; each split writes a fp32 (m, d) partial per
    # expert, so more splits cost more traffic than they buy.  Independent of B (the traffic
    # model extrapolates launches traced at small B).
    splits = max(1, triton.cdiv(sms, k * triton.cdiv(d, block_dw)))
    return BackwardConfig(fwd=fwd, block_dt=bud.block_dt, n_block=n_block,
                          block_dx=max(16, min(64, DX_MAX_LANES // n_block)), block_dw=block_dw, block_rk=32,
                          splits=splits, num_warps=bud.dxdw_warps)

"""Small @triton.jit helpers shared by the pMoE kernels (inlined at every call site).

Patch addressing: patch j of image b is the p x p window at grid cell (j // Wp, j % Wp) of a
(B, C, H, W) map with arbitrary strides; its feature c (in F.unfold's (C, p, p) order) sits at
    b*sB + ci*sC + (ph*p + py)*sH + (pw*p + px)*sW,   ci, py, px = c // p^2, (c // p) % p, c % p.
The offset splits into a per-row part (b, j) and a per-column part (c), so a (rows x cols) tile
costs one broadcast add: an implicit-GEMM gather, no unfolded copy of the input is ever made.
All offsets are int64: B*C*H*W can pass 2^31 elements.
"""
import os

import torch
import triton
import triton.language as tl

from .modes import ACT_GELU, ACT_IDENTITY, ACT_RELU, ACT_SILU

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_LOW_MASK = tl.constexpr(2147483647)  # the patch index lives in the low 31 bits of a selection key


def _interpreter_fixes():
    """Three defects of Triton 3.6's interpreter (CPU testing only; compiled kernels are unaffected):
    - a scalar becomes a Python int through int(ndarray of shape (1,)), which NumPy >= 2.4
      rejects, so every runtime-bound `for ... in range(0, d, BLOCK)` fails: use .item();
    - tl.dot multiplies bfloat16 operands as their raw uint16 storage: widen them to fp32 first
      (exact, and the GPU's bf16 MMA also accumulates exact products in fp32);
    - fp32 -> bf16 casts truncate instead of rounding to nearest even (the GPU's cvt.rn): the
      scores are rounded to the input dtype before the selection, so this must be exact."""
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover
        return
    original = _interp._patch_lang_tensor
    if getattr(original, "_pmoe_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._pmoe_fixed = True
    _interp._patch_lang_tensor = patched

    create_dot = _interp.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = _interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view("float32")
        return _interp.TensorHandle(data.reshape(h.data.shape), tl.float32)

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    _interp.InterpreterBuilder.create_dot = create_dot_bf16

    convert_float = _interp._convert_float

    def convert_float_rtne(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode != _interp._ir.ROUNDING_MODE.RTZ:
            import numpy as np

            u = np.ascontiguousarray(data).view(np.uint32).astype(np.uint64)
            rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            nan = (u & 0x7FFFFFFF) > 0x7F800000
            return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)
        return convert_float(data, input_dtype, output_dtype, rounding_mode)

    _interp._convert_float = convert_float_rtne


if INTERPRET:
    _interpreter_fixes()


@triton.jit
def patch_row_offsets(b, j, Wp, p, sxb, sxh, sxw):
    """int64 offset of the top-left element of patch j of image b (vectors of the same shape).
    Index math in int32 (j < n < 2^31; 64-bit division is emulated and costs registers), only
    the products with strides in int64."""
    j = j.to(tl.int32)
    ph = j // Wp
    pw = j - ph * Wp
    return b.to(tl.int64) * sxb + (ph * p).to(tl.int64) * sxh + (pw * p).to(tl.int64) * sxw


@triton.jit
def patch_col_offsets(c, p, sxc, sxh, sxw):
    """int64 offset of feature c (unfold order (C, p, p)) inside a patch (int32 index math)."""
    c = c.to(tl.int32)
    pp = p * p
    ci = c // pp
    rem = c - ci * pp
    py = rem // p
    px = rem - py * p
    return ci.to(tl.int64) * sxc + py.to(tl.int64) * sxh + px.to(tl.int64) * sxw


@triton.jit
def selection_keys(score, j, valid):
    """int64 keys whose descending order is SPEC's selection order.

    High 32 bits: an order-preserving integer image of the fp32 score (NaN canonicalised to one
    positive NaN, which ranks above +inf like torch.sort; -0.0 mapped to +0.0 so they tie).
    Low 31 bits: 2^31-1-j, so among equal scores the lower patch index sorts first.
    Invalid (padding) lanes get INT64_MIN and sort last.
    """
    u = score.to(tl.int32, bitcast=True)
    mag = u & 0x7FFFFFFF
    u = tl.where(mag > 0x7F800000, 0x7FC00000, u)
    u = tl.where(mag == 0, 0, u)
    ordered = tl.where(u < 0, u ^ 0x7FFFFFFF, u)  # negative floats: larger magnitude -> smaller
    key = (ordered.to(tl.int64) << 32) | (j.to(tl.int64) ^ _LOW_MASK)  # = 2^31-1-j, tensor first
    return tl.where(valid, key, -9223372036854775807 - 1)


def selection_keys_torch(scores: torch.Tensor) -> torch.Tensor:
    """selection_keys in torch ops for a (..., n) fp32 score tensor (every patch valid): the
    same int64 keys bit for bit (tests/test_launch.py compares the two), used by
    the top-l fallback for rows too long to sort on chip (op.py)."""
    n = scores.shape[-1]
    u = scores.contiguous().view(torch.int32)
    mag = u & 0x7FFFFFFF
    u = torch.where(mag > 0x7F800000, torch.full_like(u, 0x7FC00000), u)
    u = torch.where(mag == 0, torch.zeros_like(u), u)
    ordered = torch.where(u < 0, u ^ 0x7FFFFFFF, u)
    j = torch.arange(n, device=scores.device, dtype=torch.int64)
    return (ordered.to(torch.int64) << 32) | (2147483647 - j)


def key_patch_torch(key: torch.Tensor) -> torch.Tensor:
    """key_patch in torch ops."""
    return 2147483647 - (key & 2147483647)


def key_score_torch(key: torch.Tensor) -> torch.Tensor:
    """key_score in torch ops (the canonical NaN, +0.0 for -0.0)."""
    ordered = (key >> 32).to(torch.int32)
    u = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return u.view(torch.float32)


@triton.jit
def key_patch(key):
    """Patch index of a selection key."""
    return (key & _LOW_MASK) ^ _LOW_MASK  # = 2^31-1 - low bits (tensor operand first)


@triton.jit
def key_score(key):
    """fp32 score of a selection key (the canonical NaN, +0.0 for -0.0)."""
    ordered = (key >> 32).to(tl.int32)
    u = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return u.to(tl.float32, bitcast=True)


@triton.jit
def activation(x, ACT: tl.constexpr):
    """relu / exact-erf gelu / silu / identity, on fp32."""
    if ACT == ACT_RELU:
        return tl.maximum(x, 0.0)
    elif ACT == ACT_GELU:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == ACT_SILU:
        return x / (1.0 + tl.exp(-x))
    elif ACT == ACT_IDENTITY:
        return x
    else:
        tl.static_assert(False, "unknown activation code")


@triton.jit
def activation_grad(x, ACT: tl.constexpr):
    """d act / d x, matching torch's autograd (relu'(0) = 0)."""
    if ACT == ACT_RELU:
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        return cdf + x * pdf
    elif ACT == ACT_SILU:
        sig = 1.0 / (1.0 + tl.exp(-x))
        return sig * (1.0 + x * (1.0 - sig))
    elif ACT == ACT_IDENTITY:
        return tl.full(x.shape, 1.0, tl.float32)
    else:
        tl.static_assert(False, "unknown activation code")


# ---------------------------------------------------------------------------------------------
# Ticket ordering inside one launch (forward.py, backward.py).  sync: int32 counters, zero when a
# launch starts and zero again when it ends (the last program to finish resets them, so a cached
# buffer serves every launch on its stream: launch.sync_counters):
#     sync[0] tickets taken   sync[1] programs finished   sync[2 + g] group g's producers done


@triton.jit
def take_ticket(sync_ptr):
    """This program's ticket: the order in which programs actually started."""
    return tl.atomic_add(sync_ptr, 1, sem="relaxed")


@triton.jit
def signal_group(sync_ptr, g):
    """One producer of group g is done: all its threads' stores happen before the release."""
    tl.debug_barrier()
    tl.atomic_add(sync_ptr + 2 + g, 1, sem="release")


@triton.jit
def wait_group(sync_ptr, g, producers):
    """Spin until group g's `producers` are done (acquire), then let every thread go on.  A
    program waits only on programs with smaller tickets, which already started: the smallest
    unfinished ticket never waits, so no deadlock whatever order the GPU starts programs in."""
    done = tl.atomic_add(sync_ptr + 2 + g, 0, sem="acquire")
    while done < producers:
        done = tl.atomic_add(sync_ptr + 2 + g, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def wait_ring_slot(sync_ptr, g, GROUP, ring, users):
    """Before group g writes its slot of a ring of `ring` images (whole groups of GROUP; image b in
    slot b % ring), wait until the slot's previous group, g - ring / GROUP, has all its `users`
    (writers and readers) counted done on sync_ptr's group counters.  The first lap (g * GROUP <
    ring: every group when ring = B) does not wait."""
    if g * GROUP >= ring:
        wait_group(sync_ptr, g - ring // GROUP, users)


@triton.jit
def finish_ticket(sync_ptr, programs, groups):
    """Count this program finished; the last one zeroes the counters for the next launch."""
    tl.debug_barrier()
    finished = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel")
    if finished == programs - 1:
        for i0 in range(0, 2 + groups, 256):
            i = i0 + tl.arange(0, 256)
            tl.store(sync_ptr + i, tl.zeros((256,), dtype=tl.int32), mask=i < 2 + groups)

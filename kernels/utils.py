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

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# constexpr codes (ints compile faster than string constexprs and print well in the report)
ACT_CODES = {"relu": 0, "gelu": 1, "silu": 2, "identity": 3}
GATE_CODES = {"softmax": 0, "indicator": 1, "softmax_all": 2}
COMBINE_CODES = {"concat": 0, "sum": 1}

_LOW_MASK = tl.constexpr(2147483647)  # the patch index lives in the low 31 bits of a selection key


def _interpreter_fixes():
    """Two bugs of Triton 3.6's interpreter (CPU testing only; compiled kernels are unaffected):
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


def pick_configs(configs):
    """Under the interpreter run one (the first, a small) config: the autotuner would otherwise
    time every config in Python, and with one config it does not benchmark at all."""
    return configs[:1] if INTERPRET else configs


def prune_fp32_pre_hopper(configs, named_args, **kwargs):
    """Autotune pruning: fp32 dots (tf32x3) need more registers with sm_80's mma.sync than with
    sm_90's wgmma, and only each kernel's first (smallest) config compiles without spills there;
    so fp32 on a pre-Hopper GPU autotunes over that one.  The first argument carries the data
    dtype in every autotuned kernel.  compile_report.py applies the same rule."""
    t = next(iter(named_args.values()))
    if t.dtype == torch.float32 and t.is_cuda and torch.cuda.get_device_capability(t.device)[0] < 9:
        return configs[:1]
    return configs


PRUNE = {"early_config_prune": prune_fp32_pre_hopper}


def fixed_config(kernel) -> "triton.Config":
    """The one config deterministic mode launches an autotuned kernel with: its list's first.

    Configs with different tiles split reductions differently (and may pick different MMA
    instructions), so the timing-chosen winner could change result bits between processes or
    call histories; a fixed choice keeps deterministic runs bit-identical.  The first config is
    the smallest, the one that compiles without spills on every arch and dtype (the one
    prune_fp32_pre_hopper keeps, the one pick_configs keeps under the interpreter)."""
    return kernel.configs[0]


class FixedLaunch:
    """`FixedLaunch(autotuned)[grid](*args, **kwargs)`: launch the kernel under its autotuner with
    fixed_config, bypassing Autotuner.run (no benchmarking, no cache lookup).  Exactly what the
    autotuner itself does once it has chosen: fn.run(*args, **kwargs, **config.all_kwargs());
    the interpreter drops the launch options (num_warps, ...) it does not use."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        cfg = fixed_config(self.kernel)

        def launch(*args, **kwargs):
            return self.kernel.fn[grid](*args, **kwargs, **cfg.all_kwargs())

        return launch


def tuned(kernel, deterministic: bool):
    """The autotuned kernel, or in deterministic mode its FixedLaunch."""
    return FixedLaunch(kernel) if deterministic else kernel


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
    same int64 keys bit for bit (tests/test_kernels_gpu_readiness.py compares the two), used by
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
    if ACT == 0:
        return tl.maximum(x, 0.0)
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        return x / (1.0 + tl.exp(-x))
    else:
        return x


@triton.jit
def activation_grad(x, ACT: tl.constexpr):
    """d act / d x, matching torch's autograd (relu'(0) = 0)."""
    if ACT == 0:
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        return cdf + x * pdf
    elif ACT == 2:
        sig = 1.0 / (1.0 + tl.exp(-x))
        return sig * (1.0 + x * (1.0 - sig))
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def expert_preact(x_ptr, w_ptr, b_ptr, s, row_off, row_ok, mm, m_ok, d, p,
                  sxc, sxh, sxw, swk, swm, swd, sbk, sbm,
                  HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """(BLOCK_R, BLOCK_M) fp32 pre-activations W_s x_j + b_s of gathered patch rows.

    row_off: (BLOCK_R,) patch_row_offsets of the rows; mm: (BLOCK_M,) output channels of expert s.
    """
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        c = d0 + tl.arange(0, BLOCK_D)
        c_ok = c < d
        col_off = patch_col_offsets(c, p, sxc, sxh, sxw)
        xt = tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + s * swk + mm[None, :].to(tl.int64) * swm + c[:, None].to(tl.int64) * swd,
                     mask=c_ok[:, None] & m_ok[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PREC)
    if HAS_BIAS:
        bias = tl.load(b_ptr + s * sbk + mm * sbm, mask=m_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    return acc

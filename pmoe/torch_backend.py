"""The vectorised PyTorch path: the CPU implementation and the baseline the kernels must beat.

Forward: the patch rows (one copy of the input, in (p, p, C) feature order, by channel blocks
for p = 1 on an NCHW CPU map; none for a channels-last input with p = 1), one batched matmul for
all routing scores, one top-k (or sort) for the selection, then each expert's GEMM over its B*l
chosen rows of the whole batch, gathered with one index_select, and one scatter of the gated
results into the output (pooled: one sum over the chosen rows), which comes out in the input's
memory format (_Call.map_out).  No Python loop over images or patches.  On CPU (float32,
bfloat16, m >= 32) the experts run one at a time as oneDNN 1x1 convolutions, whose AVX-512
kernels run on every x86 vendor (MKL's sgemm, behind bmm, falls back to slower code on some),
each expert's gathered rows used while in cache; otherwise, and on an
Intel CPU with more than one thread or under torch.compile (float32), or a CPU with bf16 GEMM
instructions (bfloat16), all experts run in one bmm (see _onednn).  Compiled, the row additions
are one custom op (_add_rows).

Backward: a custom autograd.Function (_RoutedExperts) with a hand-written backward.  It keeps the
patch rows, the chosen rows' numbers, the gates and the experts' pre-activations (B*k*l*m
values); the gathered rows (B*k*l*d) are gathered again instead of kept.  The gate's gradient
reaches the scores only at the chosen patches, so the router's share of the input gradient is
added to each expert's row gradients before their one index_add into the input gradient, and
the router's gradient is a sum over the chosen rows: no (B*n, d) matmul for the routing backward
("softmax_all" also has a gradient through its normaliser, over all n scores: that part stays
with autograd).  A gradient that arrives in NCHW memory (the output of an NCHW map is NCHW) is
gathered from where it lies instead of being transposed first.  Double backward recomputes the
layer with differentiable ops (_composite) and differentiates that.

Nothing depends on the batch size but tensor shapes, so torch.export holds for a dynamic batch.

Profiling (pmoe.profiling, off by default): the forward phases run inside ranges pmoe.scores,
pmoe.select, pmoe.experts, pmoe.combine (pmoe.pool); the backward runs inside
pmoe.backward.<phase>, the autograd nodes of the routing normaliser through node hooks (see
_backward_ranges).  Off, nothing is hooked and each range is the shared no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import profiling
from .activations import activation_backward, get_activation
from .profiling import nvtx_range
from .routing import Routing, gate_values, gate_values_backward, select_top_l
from .vocab import Options


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast compute dtype active for this device type, or None when autocast is off
    (or the device type, e.g. "meta", has no autocast at all)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:  # "unknown device type for autocast"
        pass
    return None


def routing_scores(xp: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """(B, n, d), (k, d) -> (B, k, n) scores <w_s, x_j>.

    Under autocast the scores are computed in the higher of the input and router precisions
    (fp32 for fp32 routers), not in the autocast dtype: the top-l choice is a discontinuous
    function of the scores, and rounding them to bf16 (8 significant bits) would flip the
    choice between close patches and make the selection differ from the fp32 model's.  The
    routing matmul is a small part of the layer's cost (k/m of a dense layer's FLOPs, SPEC §4);
    it is the "selective precision" trade-off of Switch Transformer routers.
    """
    if autocast_dtype(xp.device.type) is not None:
        dt = torch.promote_types(xp.dtype, router.dtype)
        with torch.autocast(xp.device.type, enabled=False):
            return _scores(xp.to(dt), router.to(dt))
    return _scores(xp, router)


def _scores(xp: torch.Tensor, router: torch.Tensor) -> torch.Tensor:
    """router @ xp^T per image, one bmm: (B, k, n) comes out contiguous for the selection, with
    the k router rows as each GEMM's short side.  Not matmul, which folds the batch into one
    (B*n, d) x (d, k) mm: 1.6x slower on CPU at WRN-pMoE's shape (0.77 against 0.47 ms)."""
    return torch.bmm(router.unsqueeze(0).expand(xp.shape[0], *router.shape), xp.transpose(1, 2))


def patches_from_map(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, n, C*p*p): non-overlapping p x p windows, row-major over the grid, each
    flattened in (C, p, p) order -- the order of F.unfold and of a conv weight."""
    B, C, H, W = x.shape
    hp, wp = H // p, W // p
    return x.reshape(B, C, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).reshape(B, hp * wp, C * p * p)


def patches_from_map_hwc(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, n, p*p*C): the windows of patches_from_map with each one's features in
    (p, p, C) order.  The copy then moves runs of C contiguous channels (of the NHWC view)
    instead of runs of p pixels, several times faster on CPU for small p; no copy at all for a
    channels-last x with p = 1 (and for p = 1 on an NCHW map, a view whose copy is left to the
    caller, except on CPU: see _nchw_rows_blocked).  Use with features_hwc on the router and
    weights: dot products do not depend on the order.

    The gradient comes back in x's memory format, as the fused kernels' dX and nn.Conv2d's input
    gradient do.  The plain ops' gradient is the rows' memory seen as a map, i.e. channels-last:
    right for a channels-last x, but for an NCHW x (_NCHWRows writes it NCHW in one copy) it sent
    BatchNorm's and the convolution's CPU backward of an NCHW network down their mixed-layout
    paths (the flagship's training step: 1.07x its dense twin's, 0.99x with the NCHW gradient),
    or cost a leaf input's AccumulateGrad one more copy."""
    if x.requires_grad and torch.is_grad_enabled() and not x.is_contiguous(memory_format=torch.channels_last):
        return _NCHWRows.apply(x, p)
    return _rows(x, p)


def channels_last(x: torch.Tensor) -> bool:
    """Whether the map x is channels-last and not NCHW as well (C = 1, or a 1x1 map, is both:
    NCHW wins there, as in nn.Conv2d): the layout the layer's output follows (_Call.map_out)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _rows(x: torch.Tensor, p: int) -> torch.Tensor:
    """patches_from_map_hwc's rows, without its gradient's layout."""
    B, C, H, W = x.shape
    if p == 1 and _nchw_rows_blocked(x):
        return _nchw_rows(x)
    hp, wp = H // p, W // p
    return x.permute(0, 2, 3, 1).reshape(B, hp, p, wp, p, C).permute(0, 1, 3, 2, 4, 5).reshape(B, hp * wp, p * p * C)


_ROWS_BLOCK_BYTES = 32768  # the strided reads of one channel block of an NCHW->rows copy: about L1d


def _rows_channel_block(n: int, elt: int) -> int:
    """Channels per block of _nchw_rows: a block's source, n pixels of each channel, about
    _ROWS_BLOCK_BYTES (a power of two in [32, 256])."""
    return max(32, min(256, 1 << max(0, (_ROWS_BLOCK_BYTES // (n * elt)).bit_length() - 1)))


def _nchw_rows_blocked(x: torch.Tensor) -> bool:
    """Whether the 1x1 patch rows of x, (B, H*W, C), are copied channel block by channel block
    (_nchw_rows) rather than by one copy of the transposed view: an NCHW-contiguous CPU map of
    more than one image and pixel (else the rows are a view) with more channels than a block, run
    eagerly (torch.compile and torch.export make their own transposition: the plain view).

    ATen's copy of a transposed (C, n) -> (n, C) view walks the source channel by channel at a
    stride of n elements, and for hundreds of channels the lines it touches do not stay in
    cache; a block of channels that fits L1 is read once.  Measured on the 2-core Intel Xeon
    (float32, bench layers and flagship-like maps, each copy alone): WRN-pMoE's input, (64, 640,
    8, 8), 3.2-3.4 ms one copy against 1.6-1.9 ms in blocks of 128 on one thread, 1.6 against
    0.8-0.9 ms on two; (32, 512, 16, 16) 4.9 against 2.7-3.0 ms; (16, 256, 32, 32) 4.3 against
    3.0 ms; (8, 2048, 8, 8) 1.3 against 0.7 ms.  Not for p > 1: blocking the p x p windows' copy
    of the large bench layer (C = 256, p = 2) gained nothing that held up (3.6-4.4 ms either way)."""
    if (x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous() or x.stride(1) == 1
            or x.numel() == 0 or x.shape[0] == 1 or torch.compiler.is_compiling()):
        return False  # (one pixel, or one image: the (B*n, C) rows are a view, transposed or not)
    return x.shape[1] > _rows_channel_block(x.shape[2] * x.shape[3], x.element_size())


def _nchw_rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W), NCHW-contiguous -> its 1x1 patch rows (B, H*W, C), contiguous, copied
    channel block by channel block (see _nchw_rows_blocked)."""
    B, C, H, W = x.shape
    src = x.view(B, C, H * W).transpose(1, 2)
    out = x.new_empty((B, H * W, C))
    step = _rows_channel_block(H * W, x.element_size())
    for c0 in range(0, C, step):
        out[:, :, c0:c0 + step].copy_(src[:, :, c0:c0 + step])
    return out


class _NCHWRows(torch.autograd.Function):
    """The patch rows of a map that is not channels-last (_rows), whose gradient is written
    NCHW-contiguous: one copy of the rows' gradient, transposed back, differentiable again."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.shape, ctx.p = x.shape, p
        return _rows(x, p)

    @staticmethod
    def backward(ctx, grad):
        B, C, H, W = ctx.shape
        p = ctx.p
        src = grad.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
        return src.contiguous().view(B, C, H, W), None


def features_hwc(t: torch.Tensor, C: int, p: int) -> torch.Tensor:
    """(..., C*p*p) in unfold order -> (..., p*p*C), the order of patches_from_map_hwc.
    Differentiable; a no-op for p = 1 or C = 1, where the two orders coincide."""
    if p == 1 or C == 1:
        return t
    return t.unflatten(-1, (C, p, p)).movedim(-3, -1).flatten(-3)


def gather_rows(x2d: torch.Tensor, rows: torch.Tensor, per_expert: bool = False) -> torch.Tensor:
    """(N, d) rows picked by (k, R) row numbers -> (k, R, d), differentiable (used by _composite).

    One index_select by default.  Its backward adds into the input gradient with index_add, and
    a patch taken by several experts is a repeated row: on CUDA that is a race between atomics,
    so the summation order (the low bits) varies run to run.  per_expert=True gathers from a
    k-fold broadcast instead: within one expert the rows are distinct, so the backward scatter has
    no collisions, and the k expert gradients are summed by a fixed-order reduction.  The cost is
    a (k, N, d) buffer in the backward.
    """
    k, R = rows.shape
    N, d = x2d.shape
    if per_expert:
        return x2d.unsqueeze(0).expand(k, N, d).gather(1, rows.unsqueeze(-1).expand(k, R, d))
    return x2d.index_select(0, rows.reshape(-1)).view(k, R, d)


def _backward_ranges(outputs: list, inputs: list, name: str) -> None:
    """Profiling only: run every autograd node that produced `outputs` from `inputs` inside a
    pmoe.profiling range `name` during backward.

    A pre-hook on each node opens the range and a post-hook closes it, so the ranges always pair
    and nest, even when autograd prunes part of the graph (torch.autograd.grad of one input) or
    interleaves other nodes; a phase of several nodes shows as several adjacent ranges of one
    name.  The walk stops at the inputs' nodes and at leaves (AccumulateGrad)."""
    stop = {t.grad_fn for t in inputs if t is not None and t.grad_fn is not None}
    todo = [t.grad_fn for t in outputs if t is not None and t.grad_fn is not None]
    seen = set()
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            continue
        _hook_range(node, name)
        todo.extend(next_node for next_node, _ in node.next_functions)


def _hook_range(node, name: str) -> None:
    opened = []  # per node: a retained graph may run it again, never concurrently with itself

    def pre(grad_outputs):
        opened.append(nvtx_range(name))
        opened[-1].__enter__()

    def post(grad_inputs, grad_outputs):
        opened.pop().__exit__(None, None, None)

    node.register_prehook(pre)
    node.register_hook(post)


# ---------------------------------------------------------------- the expert GEMMs


def cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("vendor_id" -> "GenuineIntel", "flags", "model
    name"), "" where there is none (not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return ""


_MKLDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile cannot trace the query
_INTEL = cpuinfo("vendor_id") == "GenuineIntel"  # MKL's sgemm (float32 bmm) runs its fast code
_BF16_GEMM = bool({"amx_bf16", "avx512_bf16"} & set(cpuinfo("flags").split()))  # bf16 bmm in hardware
_ONEDNN_MIN_M = 32  # oneDNN's 1x1 kernels block output channels by 16 to 64
_ONEDNN_MIN_WEIGHT = 32768  # d*m per expert: below it, oneDNN's setup per call outweighs its speed


def _threads() -> int:
    """torch's CPU thread count.  Callers must not ask while torch.compile or torch.export trace:
    they cannot trace the query (_float32_bmm does not)."""
    return torch.get_num_threads()


def _float32_bmm() -> bool:
    """Whether big float32 experts run as one bmm (see _onednn): on an Intel CPU under
    torch.compile, or eagerly with more than one thread; torch.export traces the eager one-thread
    route (an exported program runs without inductor, and cannot read the thread count)."""
    if torch.compiler.is_exporting():
        return False
    return _INTEL and (torch.compiler.is_compiling() or _threads() > 1)


def _onednn(t: torch.Tensor, m: int, d: int) -> bool:
    """Whether the expert GEMMs on t, (d -> m) each, run one expert at a time as 1x1 convolutions
    (oneDNN) rather than all at once as one bmm.

    Small experts (m < 32 or d*m < 32768, such as m = 20 or 64 with d = 128) always run as one
    bmm: oneDNN's setup per call, and the per-expert ops around it, cost more than it saves.
    Big ones (the WRN-pMoE and large bench layers), in float32 or bfloat16 on CPU, run as oneDNN
    convolutions, whose AVX-512 kernels run on every x86 vendor, where MKL's sgemm (behind bmm)
    may not (on an AMD EPYC it ran at half the speed).  Except, measured on an Intel Xeon with
    AMX (WRN-pMoE and large, forward and forward+backward, both routes timed in the benchmark's
    rounds beside the dense conv):
    - on an Intel CPU with more than one thread, in float32: one bmm ran 0.85-0.97x the
      per-expert route's time at 2 threads (0.75-0.95x with OMP_WAIT_POLICY=PASSIVE, the two
      routes alternated), since each of the per-expert route's five parallel ops per expert
      (gather, GEMM, activation, gate, placement) wakes the threads; on one thread it ran
      0.95-1.14x, so oneDNN stays there eagerly;
    - on an Intel CPU under torch.compile (not torch.export), at any thread count, in float32:
      inductor fuses the row numbers, gates and gather into one loop before the one bmm and the
      activation, gate and placement into one after it (the per-expert route needs them per
      expert); compiled, the bmm route ran 0.6-0.9x the compiled oneDNN route's time
      (WRN-pMoE and large, forward and forward+backward, 1 and 2 threads; each route's time
      over the dense conv's in its own interleaved run, a one-off script);
    - in bfloat16 on a CPU with bf16 GEMM instructions (AMX or AVX512-BF16): bmm (oneDNN's
      matmul) ran the GEMMs in half the convolutions' time on AMX.
    Decided by device, dtype, the CPU, the thread count (eagerly), whether torch.compile or
    torch.export traces, and the parameter shapes, never by the batch, so that an exported graph
    holds for every batch size (the backward follows the forward's blocks whatever the thread
    count is then: _forward_blocks)."""
    big = (_MKLDNN and t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)
           and m >= _ONEDNN_MIN_M and d * m >= _ONEDNN_MIN_WEIGHT)
    if t.dtype == torch.bfloat16:
        return big and not _BF16_GEMM
    return big and not _float32_bmm()


def _as_nhwc(rows: torch.Tensor, l: int) -> torch.Tensor:
    """(R, c) rows, R = B*l, as a channels-last (B, c, l, 1) map: the same memory, no copy.  One
    image per batch entry is the blocking oneDNN's 1x1 kernels run fastest with."""
    R, c = rows.shape
    return rows.view(R // l, l, 1, c).permute(0, 3, 1, 2)


# Experts of at most this many neurons run their forward GEMM on CPU as w @ xg^T, R columns,
# and transpose the small (kb, m, R) result: MKL's bmm (torch 2.13, 2-core Intel Xeon, float32)
# runs xg @ w^T with N = m of a few columns slowly.  The paper's k = 8, l = 6 MNIST layer, (8, 120,
# 784) @ (8, 784, 5): 181 -> 134 us on one thread, 89 -> 42 on two; its forward over the dense
# conv's 2.29 -> 2.14 and 2.18 -> 2.02 (interleaved runs).  At m = 16 (4, 1024, 512) it was 1.5x
# slower, and the backward's products (dX, dW) were slower in this form at every m tried (5-160).
_THIN_M = 8


def expert_gemm(xg: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], l: int) -> torch.Tensor:
    """A block of kb experts' GEMMs over their rows of the whole batch: xg (kb, R, d) gathered
    rows (R = B*l), w (kb, m, d), b (kb, m) or None -> pre-activations (kb, R, m) = xg @ w^T + b.
    One bmm (w @ xg^T for experts of at most _THIN_M neurons on CPU); a 1x1 convolution for a
    one-expert block on the oneDNN route."""
    kb, R, _ = xg.shape
    m = w.shape[1]
    if kb == 1 and _onednn(xg, m, xg.shape[2]):
        out = F.conv2d(_as_nhwc(xg[0], l), w[0].view(m, -1, 1, 1), None if b is None else b[0])
        return out.permute(0, 2, 3, 1).reshape(1, R, m)
    if m <= _THIN_M and xg.device.type == "cpu":  # (kb, m, R), transposed back: see _THIN_M
        xt = xg.transpose(1, 2)
        pre = torch.bmm(w, xt) if b is None else torch.baddbmm(b.unsqueeze(2), w, xt)
        return pre.transpose(1, 2).contiguous()
    wt = w.transpose(1, 2)
    return torch.bmm(xg, wt) if b is None else torch.baddbmm(b.unsqueeze(1), xg, wt)



def expert_gemm_backward(dpre: torch.Tensor, xg: Optional[torch.Tensor], w: torch.Tensor, l: int, need_dx: bool,
                         need_dw: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The gradients of expert_gemm's products: dpre (kb, R, m) -> (d xg (kb, R, d), d w (kb, m, d)),
    each None where not needed.  xg is read for d w only (None otherwise)."""
    kb, R, m = dpre.shape
    # a one-expert block of a forward that ran oneDNN may run as bmm here if the thread count
    # changed since: the same products, rounded differently
    if not (kb == 1 and _onednn(dpre, m, w.shape[2])):
        return (torch.bmm(dpre, w) if need_dx else None), (torch.bmm(dpre.transpose(1, 2), xg) if need_dw else None)
    x = xg[0] if need_dw else dpre.new_empty(R, w.shape[2])  # dgrad alone reads only the shape
    dx, dw, _ = torch.ops.aten.convolution_backward(
        _as_nhwc(dpre[0], l), _as_nhwc(x, l), w[0].view(m, -1, 1, 1), None, [1, 1], [0, 0], [1, 1], False,
        [0, 0], 1, [need_dx, need_dw, False])
    dx = dx.permute(0, 2, 3, 1).reshape(1, R, w.shape[2]) if need_dx else None
    return dx, (dw.view(w.shape) if need_dw else None)


# ---------------------------------------------------------------- gates, activations, combine


def _add_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, deterministic: bool) -> None:
    """dst[rows] += src, repeated rows summed (_add_rows_eager).

    Under torch.compile, on CPU or deterministic, through the custom op pmoe::add_rows (unless
    the sum is differentiated, as in double backward), so that inductor calls the ATen kernels:
    its own scatter-add adds element by element with atomics, in no fixed order across threads
    (so not deterministic), and on CPU slowly: 6.7 of the 24 ms of WRN-pMoE's compiled
    forward+backward at 2 threads (torch profiler).  Not under torch.export: an exported program
    keeps ATen ops only."""
    if (torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and (dst.device.type == "cpu" or deterministic) and not (dst.requires_grad or src.requires_grad)):
        torch.ops.pmoe.add_rows(dst, rows, src, deterministic)
    else:
        _add_rows_eager(dst, rows, src, deterministic)


def _add_rows_eager(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, deterministic: bool) -> None:
    """dst[rows] += src.  deterministic: by index_put_ with accumulate, which has a deterministic
    implementation on every device (CUDA's index_add_ uses atomics, and the global deterministic
    flag refuses it there)."""
    if deterministic:
        dst.index_put_((rows,), src, accumulate=True)
    else:
        dst.index_add_(0, rows, src)


@torch.library.custom_op("pmoe::add_rows", mutates_args=("dst",))
def _add_rows_op(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, deterministic: bool) -> None:
    """_add_rows_eager as one opaque op for torch.compile (see _add_rows)."""
    _add_rows_eager(dst, rows, src, deterministic)


@_add_rows_op.register_fake
def _(dst, rows, src, deterministic):
    return None


def _slots(rows: torch.Tensor, s0: int, k: int) -> torch.Tensor:
    """(kb, R) patch rows of experts s0.. -> their rows in the concat output viewed as (N*k, m)."""
    return rows * k + torch.arange(s0, s0 + rows.shape[0], device=rows.device).view(-1, 1)


def _new_output(h_like: torch.Tensor, N: int, B: int, k: int, m: int, o) -> torch.Tensor:
    """The buffer _put fills: unchosen rows of the map must read 0, the pooled forms are sums."""
    if o.pooled:
        return h_like.new_empty(B, k, m) if o.combine == "concat" else h_like.new_zeros(B, m)
    if o.combine == "concat":
        return h_like.new_zeros(B, k * m, o.n) if o.map_out else h_like.new_zeros(N * k, m)
    return h_like.new_zeros(N, m)


def _put(y: torch.Tensor, h: torch.Tensor, rows: torch.Tensor, s0: int, k: int, o) -> None:
    """Place a block of experts s0.. into the output buffer: h (kb, R, m) gated rows, rows (kb, R)."""
    kb, R, m = h.shape
    if o.pooled:
        per_expert = h.view(kb, R // o.l, o.l, m).sum(2)  # (kb, B, m)
        if o.combine == "concat":
            y[:, s0:s0 + kb].copy_(per_expert.transpose(0, 1))
        else:
            y.add_(per_expert.sum(0))
    elif o.combine == "concat" and o.map_out:  # (B, k, m, n): along n, in each of the block's channels
        B = R // o.l
        J = _patch_numbers(rows, o.n, o.l).unsqueeze(2).expand(B, kb, m, o.l)
        y.view(B, k, m, o.n)[:, s0:s0 + kb].scatter_(3, J, h.view(kb, B, o.l, m).permute(1, 0, 3, 2))
    elif o.combine == "concat":  # (patch, expert) pairs are unique: a copy places each row
        y.index_copy_(0, _slots(rows, s0, k).view(-1), h.view(-1, m))
    else:
        _add_rows(y, rows.reshape(-1), h.view(-1, m), o.deterministic)


def _finish(y: torch.Tensor, B: int, k: int, m: int, o) -> torch.Tensor:
    """The filled buffer as the layer's output: (B, n, k*m) / (B, n, m), pooled (B, k*m) / (B, m).
    With o.map_out a view of (B, out, n) memory: the concat buffer already is; the sum's rows,
    added up where experts share a patch, are copied there once."""
    out = k * m if o.combine == "concat" else m
    if o.pooled:
        return y.view(B, out)
    if not o.map_out:
        return y.view(B, o.n, out)
    if o.combine == "concat":
        return y.transpose(1, 2)
    return y.view(B, o.n, out).transpose(1, 2).contiguous().transpose(1, 2)


def _take(dy: torch.Tensor, rows: torch.Tensor, s0: int, k: int, o) -> torch.Tensor:
    """The gradient of _put with respect to h: dy (the output's shape) -> (kb, R, m)."""
    kb, R = rows.shape
    B = R // o.l
    m = dy.shape[-1] // k if o.combine == "concat" else dy.shape[-1]
    if o.pooled:
        per_expert = (dy.view(B, k, m)[:, s0:s0 + kb].transpose(0, 1) if o.combine == "concat"
                      else dy.view(1, B, m).expand(kb, B, m))
        return per_expert.unsqueeze(2).expand(kb, B, o.l, m).reshape(kb, R, m)
    if not dy.is_contiguous() and dy.transpose(1, 2).is_contiguous():
        return _take_from_map(dy, rows, s0, k, m, o)
    slots = _slots(rows, s0, k) if o.combine == "concat" else rows
    return dy.reshape(-1, m).index_select(0, slots.reshape(-1)).view(kb, R, m)


def _take_from_map(dy: torch.Tensor, rows: torch.Tensor, s0: int, k: int, m: int, o) -> torch.Tensor:
    """_take for a dy (B, n, out) whose memory is (B, out, n), the gradient an NCHW network sends
    back: gather along n from each channel's row, instead of first transposing all of dy (the
    slow, strided kind of copy) to gather rows."""
    kb, R = rows.shape
    B, n = dy.shape[:2]
    J = _patch_numbers(rows, n, o.l)
    src = dy.transpose(1, 2)  # (B, out, n), contiguous
    if o.combine == "concat":
        got = torch.gather(src.view(B, k, m, n)[:, s0:s0 + kb], 3, J.unsqueeze(2).expand(B, kb, m, o.l))
    else:
        got = torch.gather(src, 2, J.reshape(B, 1, kb * o.l).expand(B, m, kb * o.l)).view(B, m, kb, o.l).transpose(1, 2)
    return got.permute(1, 0, 3, 2).reshape(kb, R, m)  # (B, kb, m, l) -> (kb, B*l, m)


def _patch_numbers(rows: torch.Tensor, n: int, l: int) -> torch.Tensor:
    """(kb, B*l) row numbers (_patch_rows) -> (B, kb, l) the chosen patch numbers (a view)."""
    kb, R = rows.shape
    B = R // l
    return (rows.view(kb, B, l) - torch.arange(0, B * n, n, device=rows.device).view(1, B, 1)).transpose(0, 1)


def _patch_rows(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, k, l) chosen patch numbers -> (k, B*l) their row numbers in the (B*n, d) patch rows,
    grouped by expert (each expert's GEMM reads one contiguous block of the gathered rows)."""
    B, k, l = idx.shape
    rows = idx + torch.arange(0, B * n, n, device=idx.device).view(B, 1, 1)
    return rows.transpose(0, 1).contiguous().view(k, B * l)


# ---------------------------------------------------------------- the routed experts


def _compute_dtype(xr: torch.Tensor) -> torch.dtype:
    """The experts' dtype: the autocast dtype when autocast is on, else the input's."""
    return autocast_dtype(xr.device.type) or xr.dtype


@dataclass(frozen=True)
class _Call(Options):
    """The Options plus what one call's shapes add: n patches per image, and cp, (C, p) when the
    patch rows hold each patch's features in (p, p, C) order (patches_from_map_hwc) while router
    and weight are in unfold order, which the routed experts then permute themselves (and their
    gradients back), so that no permuted copy of a parameter is kept for backward; None when all
    are in one order.  map_out: the unpooled output's memory in (B, out, n) order, i.e. an NCHW
    map's (see pmoe_patches_torch)."""

    n: int = 0
    cp: Optional[tuple[int, int]] = None
    map_out: bool = False


def _ordered(t: torch.Tensor, cp: Optional[tuple[int, int]]) -> torch.Tensor:
    """A parameter in the patch rows' feature order (see _Call.cp)."""
    return t if cp is None else features_hwc(t, *cp)


def _unordered(t: torch.Tensor, cp: Optional[tuple[int, int]]) -> torch.Tensor:
    """The inverse of _ordered: (..., p*p*C) -> (..., C*p*p)."""
    if cp is None or cp[0] == 1 or cp[1] == 1:
        return t
    C, p = cp
    return t.unflatten(-1, (p, p, C)).movedim(-1, -3).flatten(-3)


def _blocks(t: torch.Tensor, k: int, m: int, d: int) -> list:
    """The experts in the blocks their GEMMs run in: one at a time on the oneDNN route (each
    expert's gathered rows, 1/k of the total, are used while they are still in cache and freed
    before the next expert's), else all k in one bmm."""
    return [(s, s + 1) for s in range(k)] if _onednn(t, m, d) else [(0, k)]


def _forward_blocks(pres: list) -> list:
    """The blocks the forward ran, from its pre-activations (one (kb, R, m) tensor a block): the
    backward follows them even if the route would differ now (the thread count changed)."""
    bounds, s0 = [], 0
    for pre in pres:
        bounds.append((s0, s0 + pre.shape[0]))
        s0 += pre.shape[0]
    return bounds


class _RoutedExperts(torch.autograd.Function):
    """Gates, expert GEMMs and combine for a given selection: (xr, router, weight, bias, sel, lse)
    -> (the layer's output, gates (B, k, l)).

    xr (B*n, d) patch rows; router (k, d); weight (k, m, d); bias (k, m) or None; sel (B, k, l)
    the chosen scores (values only: their gradient reaches xr and router here, as <w_s, x_j>);
    lse (B, k) the log-sum-exp of all scores for "softmax_all" (its gradient goes back through
    autograd), else None; idx (B, k, l) the chosen patch numbers; opts the _Call.
    Saved for backward: xr, the parameters, gates, row numbers, lse and the pre-activations
    (B*k*l*m values); the gathered rows (B*k*l*d) are gathered again.
    """

    @staticmethod
    def forward(ctx, xr, router, weight, bias, sel, lse, idx, opts):
        y, g, rows, pres = _experts_forward(xr, weight, bias, sel, lse, idx, opts)
        ctx.save_for_backward(xr, router, weight, bias, g, rows, lse, *pres)
        ctx.opts = opts
        ctx.mark_non_differentiable(g)
        return y, g

    @staticmethod
    def backward(ctx, dy, _dgates):
        xr, router, weight, bias, g, rows, lse, *pres = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate a differentiable recomputation
            return _composite_backward(ctx, dy, xr, router, weight, bias, lse, rows)
        dx, dr, dw, db, dlse = _experts_backward(dy, xr, router, weight, bias, g, rows, pres, ctx.opts,
                                                 ctx.needs_input_grad[:4])
        return dx, dr, dw, db, None, dlse, None, None


def _experts_forward(xr, weight, bias, sel, lse, idx, o: _Call):
    """_RoutedExperts' forward: -> (output, gates (B, k, l), rows (k, B*l), pre-activations: one
    (kb, B*l, m) tensor per block of experts)."""
    B, k, l = idx.shape
    N, R, m = xr.shape[0], B * l, weight.shape[1]
    g = gate_values(sel, o.gate, lse)
    rows = _patch_rows(idx, o.n)
    cdt = _compute_dtype(xr)
    w = _ordered(weight, o.cp).to(cdt)
    b = None if bias is None else bias.to(cdt)
    gk = g.transpose(0, 1).reshape(k, R, 1).to(cdt)
    act = get_activation(o.activation)
    y, pres = None, []
    for s0, s1 in _blocks(w, k, m, w.shape[2]):
        with nvtx_range("pmoe.experts"):
            xg = xr.index_select(0, rows[s0:s1].reshape(-1)).view(s1 - s0, R, xr.shape[1]).to(cdt)
            pre = expert_gemm(xg, w[s0:s1], None if b is None else b[s0:s1], l)
            h = act(pre)  # a new tensor (gated in place), except for identity: pre is kept
            h = h.mul_(gk[s0:s1]) if h is not pre else h * gk[s0:s1]
        with nvtx_range("pmoe.pool" if o.pooled else "pmoe.combine"):
            y = _new_output(h, N, B, k, m, o) if y is None else y
            _put(y, h, rows[s0:s1], s0, k, o)
        pres.append(pre)
    return _finish(y, B, k, m, o), g, rows, pres


def _experts_backward(dy, xr, router, weight, bias, g, rows, pres, o: _Call, needs):
    """_RoutedExperts' backward, block by block: -> (d xr, d router, d weight, d bias, d lse),
    None where not needed."""
    need_x, need_r, need_w, need_b = needs
    need_r = need_r and o.gate != "indicator"
    k = rows.shape[0]
    cdt = pres[0].dtype
    acc = torch.promote_types(xr.dtype, router.dtype)
    w, r_o = _ordered(weight, o.cp).to(cdt), _ordered(router, o.cp).to(acc)
    dy = dy.to(cdt)
    dx = xr.new_zeros(xr.shape, dtype=acc) if need_x else None
    parts = []  # per block: (d router, d weight, d bias, d lse)
    for (s0, s1), pre in zip(_forward_blocks(pres), pres):
        parts.append(_block_backward(dy, xr, r_o[s0:s1], w[s0:s1], pre, g[:, s0:s1], rows[s0:s1], s0, k, o, dx,
                                     need_r, need_w, need_b))
    dr, dw, db, dlse = zip(*parts)
    return (None if dx is None else dx.to(xr.dtype),
            _unordered(torch.cat(dr), o.cp).to(router.dtype) if need_r else None,
            _unordered(torch.cat(dw), o.cp).to(weight.dtype) if need_w else None,
            torch.cat(db).to(bias.dtype) if need_b else None,
            torch.cat(dlse, 1) if o.gate == "softmax_all" else None)


def _block_backward(dy, xr, router, w, pre, g, rows, s0, k, o: _Call, dx, need_r, need_w, need_b):
    """One block of experts s0.. (router, w, pre, g, rows their slices): adds its share to dx (in
    place, when dx is given) -> (d router, d weight, d bias, d lse), None where not needed.  The
    gathered rows are gathered again; the router's share of d xr (d sel times w_s, at the chosen
    rows only) is added to the block's row gradients before their one index_add."""
    kb, R = rows.shape
    with nvtx_range("pmoe.backward.pool" if o.pooled else "pmoe.backward.combine"):
        dh = _take(dy, rows, s0, k, o)
    with nvtx_range("pmoe.backward.select"):
        dpre, dsel, dlse = _gated_act_backward(dh, pre, g, o.gate, o.activation)
    with nvtx_range("pmoe.backward.experts"):
        xg = xr.index_select(0, rows.reshape(-1)).view(kb, R, xr.shape[1]) if (need_w or need_r) else None
        dxg, dw = expert_gemm_backward(dpre, None if xg is None else xg.to(pre.dtype), w, o.l, dx is not None, need_w)
    dr = None
    with nvtx_range("pmoe.backward.scores"):
        dsel = None if dsel is None else dsel.transpose(0, 1).reshape(kb, R, 1).to(router.dtype)
        if dx is not None:
            dxg = dxg.to(dx.dtype)
            if dsel is not None:
                dxg = dxg.baddbmm_(dsel, router.unsqueeze(1))
            _add_rows(dx, rows.reshape(-1), dxg.view(-1, dx.shape[1]), o.deterministic)
        if need_r:
            dr = torch.bmm(dsel.transpose(1, 2), xg.to(router.dtype)).squeeze(1)
    return dr, dw, (dpre.sum(1) if need_b else None), dlse


def _gated_act_backward(dh, pre, g, gate, activation):
    """From d h (kb, R, m), h = act(pre) * gate, g (B, kb, l): -> (d pre (kb, R, m), d sel
    (B, kb, l) or None, d lse (B, kb) or None)."""
    kb, R, _ = pre.shape
    B, _, l = g.shape
    dsel = dlse = None
    if gate != "indicator":
        dg = (dh * get_activation(activation)(pre)).sum(-1).view(kb, B, l).transpose(0, 1)
        dsel, dlse = gate_values_backward(dg.to(g.dtype), g, gate)
    dpre = activation_backward(activation, dh * g.transpose(0, 1).reshape(kb, R, 1).to(dh.dtype), pre)
    return dpre, dsel, dlse


def _composite(xr, router, weight, bias, lse, rows, o: _Call):
    """_RoutedExperts' forward in differentiable ops, selection given by rows (k, B*l): what
    double backward differentiates.  -> the layer's output."""
    k, R = rows.shape
    xg = gather_rows(xr, rows, per_expert=o.deterministic)  # (k, R, d)
    router, weight = _ordered(router, o.cp), _ordered(weight, o.cp)
    sel = (xg * router.to(xg.dtype).unsqueeze(1)).sum(-1).view(k, R // o.l, o.l).transpose(0, 1)
    g = gate_values(sel, o.gate, lse)
    cdt = _compute_dtype(xr)
    pre = torch.bmm(xg.to(cdt), weight.to(cdt).transpose(1, 2))
    if bias is not None:
        pre = pre + bias.to(cdt).unsqueeze(1)
    h = get_activation(o.activation)(pre) * g.transpose(0, 1).reshape(k, R, 1).to(cdt)
    B, m = R // o.l, h.shape[2]
    y = _new_output(h, xr.shape[0], B, k, m, o)
    _put(y, h, rows, 0, k, o)
    return _finish(y, B, k, m, o)


def _composite_backward(ctx, dy, xr, router, weight, bias, lse, rows):
    """Backward with create_graph=True: the gradients of _composite, themselves differentiable."""
    inputs = (xr, router, weight, bias, None, lse)
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need and t is not None]
    y = _composite(xr, router, weight, bias, lse, rows, ctx.opts)
    grads = iter(torch.autograd.grad(y, wanted, dy, allow_unused=True, create_graph=True))
    out = [next(grads) if need and t is not None else None for t, need in zip(inputs, ctx.needs_input_grad)]
    return (*out, None, None)


# ---------------------------------------------------------------- the layer


def _route(xp: torch.Tensor, router: torch.Tensor, l: int, gate: str):
    """Scores, selection and what the gates need: -> scores (B, k, n), idx (B, k, l), the chosen
    scores sel (B, k, l) (detached) and, for softmax_all, lse (B, k) (with its gradient)."""
    with nvtx_range("pmoe.scores"):
        with torch.set_grad_enabled(torch.is_grad_enabled() and gate == "softmax_all"):
            scores = routing_scores(xp, router)  # (B, k, n)
    with nvtx_range("pmoe.select"):
        idx = select_top_l(scores.detach(), l)  # (B, k, l)
        sel = torch.gather(scores.detach(), 2, idx)
        lse = torch.logsumexp(scores, dim=-1) if gate == "softmax_all" else None
    return scores, idx, sel, lse


def pmoe_patches_torch(xp: torch.Tensor, router: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       o: Options, cp: Optional[tuple[int, int]] = None,
                       map_out: bool = False) -> tuple[torch.Tensor, Routing]:
    """pMoE on a patch tensor (o.p is not read: the patches are given).

    xp: (B, n, d); router: (k, d); weight: (k, m, d); bias: (k, m) or None.  cp = (C, p): xp's
    features are in (p, p, C) order (patches_from_map_hwc) and router and weight in unfold order
    (C, p, p); None: all in one order.
    Returns y: (B, n, k*m) for "concat" or (B, n, m) for "sum", and the Routing.  With o.pooled,
    y summed over the n patches, (B, k*m) or (B, m), without the (B, n, out) map: unselected
    (patch, expert) pairs contribute exactly 0, so that is a sum of the gated expert rows over
    the l ranks, a reduction (no atomics, bit-stable on every device).
    Under autocast the scores, selection and gates are computed in the parameters' precision
    (see routing_scores) and the experts in the autocast dtype, which is y's dtype.
    o.deterministic: bit-identical results run to run on every device (on CPU they always are;
    on CUDA the row additions then avoid atomics).
    map_out: the unpooled y in (B, out, n) memory, returned as a (B, n, out) view of it: the order
    of an NCHW map, whose consumers then need no copy (pmoe.functional asks for it unless the
    input map is channels-last, so that y comes out in the input's memory format, as from
    nn.Conv2d).  A channels-last output sent an NCHW network's next BatchNorm backward down its
    slow mixed-layout CPU path.
    """
    B, n, d = xp.shape
    xr = xp.reshape(B * n, d)  # one copy, if any, for both the scores and the gather
    scores, idx, sel, lse = _route(xr.view(B, n, d), _ordered(router, cp), o.l, o.gate)
    # not asdict: its deep copy costs ~10 us a call
    call = _Call(*o.op_args(), n=n, cp=cp, map_out=map_out and not o.pooled)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xr, router, weight, bias, lse)):
        y, g = _RoutedExperts.apply(xr, router, weight, bias, sel, lse, idx, call)
    else:  # inference: no autograd node, nothing kept
        y, g, _, _ = _experts_forward(xr, weight, bias, sel, lse, idx, call)
    if profiling.is_enabled() and lse is not None and lse.requires_grad:
        _backward_ranges([scores], [xp, router], "pmoe.backward.scores")
        _backward_ranges([lse], [scores], "pmoe.backward.select")
    return y, Routing(idx, g, n)

"""The vectorised PyTorch path: the CPU implementation and the baseline the kernels must beat.

One matmul for all routing scores, one sort for the selection, one gather of the chosen rows,
one batched matmul for all experts, one scatter into the output (or, pooled, one sum over the
chosen rows).  No Python loop over images, experts or patches; autograd gives the backward.

Profiling (pmoe.profiling, off by default): the forward phases run inside ranges pmoe.scores,
pmoe.select, pmoe.experts, pmoe.combine (pmoe.pool); in backward, node hooks put each phase's
autograd nodes inside pmoe.backward.<phase> (see _backward_ranges).  Off, nothing is hooked and
each range is the shared no-op.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import profiling
from .activations import get_activation
from .profiling import nvtx_range
from .routing import Routing, gates_from_scores, select_top_l


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
            return torch.matmul(xp.to(dt), router.to(dt).t()).transpose(1, 2)
    return torch.matmul(xp, router.t()).transpose(1, 2)


def patches_from_map(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, n, C*p*p): non-overlapping p x p windows, row-major over the grid, each
    flattened in (C, p, p) order -- the order of F.unfold and of a conv weight."""
    B, C, H, W = x.shape
    hp, wp = H // p, W // p
    return x.reshape(B, C, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).reshape(B, hp * wp, C * p * p)


def patches_from_map_hwc(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, n, p*p*C): the windows of patches_from_map with each one's features in
    (p, p, C) order.  The copy then moves runs of C contiguous channels (of the NHWC view)
    instead of runs of p pixels: 5-6x faster on CPU for p = 2 (7.8 -> 1.3 ms at 64x16x32x32).
    Use with features_hwc on the router and weights: dot products do not depend on the order."""
    B, C, H, W = x.shape
    hp, wp = H // p, W // p
    return x.permute(0, 2, 3, 1).reshape(B, hp, p, wp, p, C).permute(0, 1, 3, 2, 4, 5).reshape(B, hp * wp, p * p * C)


def features_hwc(t: torch.Tensor, C: int, p: int) -> torch.Tensor:
    """(..., C*p*p) in unfold order -> (..., p*p*C), the order of patches_from_map_hwc.
    Differentiable; a no-op for p = 1, where the two orders coincide."""
    if p == 1:
        return t
    return t.unflatten(-1, (C, p, p)).movedim(-3, -1).flatten(-3)


def gather_rows(x2d: torch.Tensor, rows: torch.Tensor, per_expert: bool = False) -> torch.Tensor:
    """(N, d) rows picked by (k, R) row numbers -> (k, R, d).

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
    todo = [t.grad_fn for t in outputs if t.grad_fn is not None]
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


def gated_experts(xp: torch.Tensor, router: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  l: int, gate: str, activation: str, deterministic: bool = False):
    """Scores, selection, gates and the experts on their chosen patches: the layer up to combine.

    xp: (B, n, d); router: (k, d); weight: (k, m, d); bias: (k, m) or None.
    Returns h (k, B*l, m) = G * act(W_s x_j + b_s) with rows in (expert, image, rank) order,
    rows (k, B*l) int64: the chosen patches' row numbers in xp viewed as (B*n, d), and the Routing.
    """
    B, n, d = xp.shape
    k, m, _ = weight.shape
    act = get_activation(activation)

    with nvtx_range("pmoe.scores"):
        scores = routing_scores(xp, router)  # (B, k, n)
    with nvtx_range("pmoe.select"):
        idx = select_top_l(scores.detach(), l)  # (B, k, l)
        gates = gates_from_scores(scores, torch.gather(scores, 2, idx), gate)  # (B, k, l)

    with nvtx_range("pmoe.experts"):
        # Row numbers of the chosen patches in xp viewed as (B*n, d), laid out (k, B, l) so the
        # gathered rows are already grouped by expert for one bmm.
        rows = (idx + torch.arange(B, device=xp.device).view(B, 1, 1) * n).transpose(0, 1).reshape(k, B * l)
        xs = gather_rows(xp.reshape(B * n, d), rows, per_expert=deterministic and xp.is_cuda)
        h = torch.bmm(xs, weight.transpose(1, 2))  # (k, B*l, m); under autocast in its dtype
        if bias is not None:
            # cast: an fp32 bias must not promote an autocast bf16 result back to fp32 (nn.Conv2d
            # under autocast returns the autocast dtype with or without bias; so does this layer)
            h = h + bias.unsqueeze(1).to(h.dtype)
        h = act(h) * gates.transpose(0, 1).reshape(k, B * l, 1).to(h.dtype)
    if profiling.is_enabled() and torch.is_grad_enabled():
        params = [router, weight, bias]
        _backward_ranges([scores], [xp] + params, "pmoe.backward.scores")
        _backward_ranges([gates], [scores], "pmoe.backward.select")
        _backward_ranges([h], [xp, gates] + params, "pmoe.backward.experts")
    return h, rows, Routing(idx, gates.detach(), n)


def pmoe_patches_torch(
    xp: torch.Tensor,
    router: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    l: int,
    combine: str,
    gate: str,
    activation: str,
    deterministic: bool = False,
) -> tuple[torch.Tensor, Routing]:
    """pMoE on a patch tensor.

    xp: (B, n, d); router: (k, d); weight: (k, m, d); bias: (k, m) or None.
    Returns y: (B, n, k*m) for "concat" or (B, n, m) for "sum", and the Routing.
    Under autocast the scores, selection and gates are computed in the parameters' precision
    (see routing_scores) and the experts in the autocast dtype, which is y's dtype.
    """
    B, n, d = xp.shape
    k, m, _ = weight.shape
    if combine not in ("concat", "sum"):
        raise ValueError(f"unknown combine {combine!r}")
    h, rows, routing = gated_experts(xp, router, weight, bias, l, gate, activation, deterministic)

    with nvtx_range("pmoe.combine"):
        if combine == "concat":
            # (patch, expert) pairs are unique, so a copy (not an accumulation) places each row.
            expert = torch.arange(k, device=xp.device).view(k, 1)
            slots = rows * k + expert
            y = h.new_zeros(B * n * k, m).index_copy(0, slots.reshape(-1), h.reshape(-1, m))
            y = y.view(B, n, k * m)
        elif deterministic and xp.is_cuda:
            # CUDA index_add uses atomics; a per-expert buffer summed over k is bit-stable.
            expert = torch.arange(k, device=xp.device).view(k, 1)
            slots = rows * k + expert
            y = h.new_zeros(B * n * k, m).index_copy(0, slots.reshape(-1), h.reshape(-1, m))
            y = y.view(B, n, k, m).sum(2)
        else:
            y = h.new_zeros(B * n, m).index_add(0, rows.reshape(-1), h.reshape(-1, m)).view(B, n, m)
    if profiling.is_enabled() and torch.is_grad_enabled():
        _backward_ranges([y], [h], "pmoe.backward.combine")
    return y, routing


def pmoe_patches_pooled_torch(
    xp: torch.Tensor,
    router: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    l: int,
    combine: str,
    gate: str,
    activation: str,
    deterministic: bool = False,
) -> tuple[torch.Tensor, Routing]:
    """pmoe_patches_torch's output summed over the n patches, without the (B, n, out) map.

    Unselected (patch, expert) pairs contribute exactly 0, so the sum over patches is the sum of
    the gated expert rows over the l ranks (and over the k experts for "sum").
    Returns (B, k*m) for "concat" or (B, m) for "sum", and the Routing.  The pooling is a
    reduction (no atomics, bit-stable on every device); `deterministic` covers the gather's
    backward as in pmoe_patches_torch.
    """
    B = xp.shape[0]
    k, m, _ = weight.shape
    if combine not in ("concat", "sum"):
        raise ValueError(f"unknown combine {combine!r}")
    h, _, routing = gated_experts(xp, router, weight, bias, l, gate, activation, deterministic)
    with nvtx_range("pmoe.pool"):
        per_expert = h.view(k, B, l, m).sum(2)  # (k, B, m)
        y = per_expert.transpose(0, 1).reshape(B, k * m) if combine == "concat" else per_expert.sum(0)
    if profiling.is_enabled() and torch.is_grad_enabled():
        _backward_ranges([y], [h], "pmoe.backward.pool")
    return y, routing

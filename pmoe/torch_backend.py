"""The vectorised PyTorch path: the CPU implementation and the baseline the kernels must beat.

One matmul for all routing scores, one sort for the selection, one gather of the chosen rows,
one batched matmul for all experts, one scatter into the output.  No Python loop over images,
experts or patches; autograd gives the backward.
"""
from __future__ import annotations

from typing import Optional

import torch

from .activations import get_activation
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
    act = get_activation(activation)

    scores = routing_scores(xp, router)  # (B, k, n)
    idx = select_top_l(scores.detach(), l)  # (B, k, l)
    gates = gates_from_scores(scores, torch.gather(scores, 2, idx), gate)  # (B, k, l)

    # Row numbers of the chosen patches in xp viewed as (B*n, d), laid out (k, B, l) so the
    # gathered rows are already grouped by expert for one bmm.
    rows = (idx + torch.arange(B, device=xp.device).view(B, 1, 1) * n).transpose(0, 1).reshape(-1)
    xs = gather_rows(xp.reshape(B * n, d), rows.view(k, B * l), per_expert=deterministic and xp.is_cuda)
    h = torch.bmm(xs, weight.transpose(1, 2))  # (k, B*l, m); under autocast in its dtype
    if bias is not None:
        # cast: an fp32 bias must not promote an autocast bf16 result back to fp32 (nn.Conv2d
        # under autocast returns the autocast dtype with or without bias; so does this layer)
        h = h + bias.unsqueeze(1).to(h.dtype)
    h = act(h) * gates.transpose(0, 1).reshape(k, B * l, 1).to(h.dtype)

    if combine == "concat":
        # (patch, expert) pairs are unique, so a copy (not an accumulation) places each row.
        expert = torch.arange(k, device=xp.device).view(k, 1)
        slots = rows.view(k, B * l) * k + expert
        y = h.new_zeros(B * n * k, m).index_copy(0, slots.reshape(-1), h.reshape(-1, m))
        y = y.view(B, n, k * m)
    elif combine == "sum":
        if deterministic and xp.is_cuda:
            # CUDA index_add uses atomics; a per-expert buffer summed over k is bit-stable.
            expert = torch.arange(k, device=xp.device).view(k, 1)
            slots = rows.view(k, B * l) * k + expert
            y = h.new_zeros(B * n * k, m).index_copy(0, slots.reshape(-1), h.reshape(-1, m))
            y = y.view(B, n, k, m).sum(2)
        else:
            y = h.new_zeros(B * n, m).index_add(0, rows, h.reshape(-1, m)).view(B, n, m)
    else:
        raise ValueError(f"unknown combine {combine!r}")
    return y, Routing(idx, gates.detach(), n)

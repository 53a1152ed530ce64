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


def patches_from_map(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, n, C*p*p): non-overlapping p x p windows, row-major over the grid, each
    flattened in (C, p, p) order -- the order of F.unfold and of a conv weight."""
    B, C, H, W = x.shape
    hp, wp = H // p, W // p
    return x.reshape(B, C, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).reshape(B, hp * wp, C * p * p)


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
    """
    B, n, d = xp.shape
    k, m, _ = weight.shape
    act = get_activation(activation)

    scores = torch.matmul(xp, router.t()).transpose(1, 2)  # (B, k, n)
    idx = select_top_l(scores.detach(), l)  # (B, k, l)
    gates = gates_from_scores(scores, torch.gather(scores, 2, idx), gate)  # (B, k, l)

    # Row numbers of the chosen patches in xp viewed as (B*n, d), laid out (k, B, l) so the
    # gathered rows are already grouped by expert for one bmm.
    rows = (idx + torch.arange(B, device=xp.device).view(B, 1, 1) * n).transpose(0, 1).reshape(-1)
    xs = xp.reshape(B * n, d).index_select(0, rows).view(k, B * l, d)
    h = torch.bmm(xs, weight.transpose(1, 2))  # (k, B*l, m)
    if bias is not None:
        h = h + bias.unsqueeze(1)
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

"""The reference: naive and obviously correct, straight from SPEC §1.  Loops everywhere.

Used by the tests only (in float64), never by a user's code path.  It shares no code with the
backends beyond torch itself: selection, gates, experts and combine are all written out here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _act(name: str, t: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.clamp(t, min=0)
    if name == "gelu":
        return 0.5 * t * (1 + torch.erf(t / math.sqrt(2.0)))
    if name == "silu":
        return t / (1 + torch.exp(-t))
    if name == "identity":
        return t
    raise ValueError(name)


def reference_patches(
    xp: torch.Tensor,
    router: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    l: int,
    combine: str = "concat",
    gate: str = "softmax",
    activation: str = "relu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xp (B, n, d), router (k, d), weight (k, m, d), bias (k, m) ->
    y (B, n, k*m | m), indices (B, k, l) int64, gates (B, k, l)."""
    B, n, d = xp.shape
    k, m, _ = weight.shape
    out = k * m if combine == "concat" else m
    rows = [[xp.new_zeros(out) for _ in range(n)] for _ in range(B)]
    all_idx = torch.zeros(B, k, l, dtype=torch.int64)
    all_gates = []
    for b in range(B):
        gates_b = []
        for s in range(k):
            r = [torch.dot(router[s], xp[b, j]) for j in range(n)]
            r_val = [t.item() for t in r]
            # expert choice: the l largest scores, ties to the lower patch index
            chosen = sorted(range(n), key=lambda j: (-r_val[j], j))[:l]
            all_idx[b, s] = torch.tensor(chosen)
            sel = torch.stack([r[j] for j in chosen])
            if gate == "softmax":
                g = torch.exp(sel - sel.max()) / torch.exp(sel - sel.max()).sum()
            elif gate == "indicator":
                g = torch.ones_like(sel)
            elif gate == "softmax_all":
                allr = torch.stack(r)
                g = torch.exp(sel - allr.max()) / torch.exp(allr - allr.max()).sum()
            else:
                raise ValueError(gate)
            gates_b.append(g)
            for i, j in enumerate(chosen):
                pre = weight[s] @ xp[b, j]
                if bias is not None:
                    pre = pre + bias[s]
                h = g[i] * _act(activation, pre)
                if combine == "concat":
                    pad = [xp.new_zeros(m * s), h, xp.new_zeros(m * (k - s - 1))]
                    rows[b][j] = rows[b][j] + torch.cat(pad)
                else:
                    rows[b][j] = rows[b][j] + h
        all_gates.append(torch.stack(gates_b))
    y = torch.stack([torch.stack(rb) for rb in rows])
    return y, all_idx, torch.stack(all_gates)


def reference_conv2d(x, router, weight, bias, patch_size, l, combine="concat", gate="softmax", activation="relu"):
    """x (B, C, H, W), weight (k, m, C, p, p) -> y (B, out, H/p, W/p), indices, gates.
    Patches come from F.unfold, the definition SPEC cites."""
    B, C, H, W = x.shape
    p = patch_size
    xp = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, n, C*p*p)
    k, m = weight.shape[:2]
    y, idx, g = reference_patches(xp, router, weight.reshape(k, m, -1), bias, l, combine, gate, activation)
    return y.transpose(1, 2).reshape(B, -1, H // p, W // p), idx, g


def reference_hierarchical(x, group_router, router, weight, bias, l1, l2, combine="concat", activation="relu"):
    """HierarchicalPMoE (SPEC §6) by loops.  x (B, G, S, d), group_router (k1, d), router (k1, k2, d),
    weight (k1, k2, m, d), bias (k1, k2, m) or None ->
    y (B, G, S, k1*k2*m | m), group indices (B, k1, l1), group gates (B, k1, l1),
    segment indices (B, k1, l1, k2, l2) (within the group), segment gates (B, k1, l1, k2, l2)."""
    B, G, S, d = x.shape
    k1, k2, m, _ = weight.shape
    out = k1 * k2 * m if combine == "concat" else m
    rows = [[[x.new_zeros(out) for _ in range(S)] for _ in range(G)] for _ in range(B)]
    gidx = torch.zeros(B, k1, l1, dtype=torch.int64)
    sidx = torch.zeros(B, k1, l1, k2, l2, dtype=torch.int64)
    g1_all, g2_all = [], []

    def softmax(v):
        e = torch.exp(v - v.max())
        return e / e.sum()

    for b in range(B):
        g1_b, g2_b = [], []
        for t in range(k1):
            # level 1: the group summary is the mean of its S segments
            summary = [sum(x[b, g, j] for j in range(S)) / S for g in range(G)]
            r1 = [torch.dot(group_router[t], summary[g]) for g in range(G)]
            groups = sorted(range(G), key=lambda g: (-r1[g].item(), g))[:l1]
            gidx[b, t] = torch.tensor(groups)
            g1 = softmax(torch.stack([r1[g] for g in groups]))
            g1_b.append(g1)
            g2_t = []
            for i, g in enumerate(groups):
                g2_i = []
                for s in range(k2):
                    r2 = [torch.dot(router[t, s], x[b, g, j]) for j in range(S)]
                    segs = sorted(range(S), key=lambda j: (-r2[j].item(), j))[:l2]
                    sidx[b, t, i, s] = torch.tensor(segs)
                    g2 = softmax(torch.stack([r2[j] for j in segs]))
                    g2_i.append(g2)
                    for jj, j in enumerate(segs):
                        pre = weight[t, s] @ x[b, g, j]
                        if bias is not None:
                            pre = pre + bias[t, s]
                        h = g1[i] * g2[jj] * _act(activation, pre)
                        if combine == "concat":
                            e = t * k2 + s
                            h = torch.cat([x.new_zeros(m * e), h, x.new_zeros(m * (k1 * k2 - e - 1))])
                        rows[b][g][j] = rows[b][g][j] + h
                g2_t.append(torch.stack(g2_i))
            g2_b.append(torch.stack(g2_t))
        g1_all.append(torch.stack(g1_b))
        g2_all.append(torch.stack(g2_b))
    y = torch.stack([torch.stack([torch.stack(rg) for rg in rb]) for rb in rows])
    return y, gidx, torch.stack(g1_all), sidx, torch.stack(g2_all)

"""Two levels of expert-choice routing over a hierarchy of segments (SPEC §6).

    layer = pmoe.HierarchicalPMoE(in_features=d, out_features=m, num_group_experts=k1, top_groups=l1,
                                  num_experts=k2, top_l=l2)
    y, routing = layer(x, return_routing=True)   # x (B, G, S, d) -> y (B, G, S, m)
    pooled = layer.forward_pooled(x)             # y.sum((1, 2)) without the map: (B, m)

A document is G groups (paragraphs) of S segments (sentences), each a d-vector.  Level 1: each
of k1 top-level experts scores every group by its summary (the mean of its segments) and takes
its top-l1 groups, gated by a softmax over the chosen scores.  Level 2: inside each group a
top-level expert took, its k2 sub-experts run the flat pMoE layer (`pmoe.functional.pmoe`): each
takes its top-l2 segments of that group, gated by a softmax over those, and runs its GEMM on
them alone.  A segment's output is G1 * G2 * act(W x + b).

Reuse: level 2 *is* the fused op (`pmoe` / `pmoe_pooled`, any backend), called once per
top-level expert on the (B*l1, S, d) segments of the groups it took.  Level 1 reuses the layer's
routing functions (`pmoe.routing`) but not the fused op: its "expert" is the whole level-2 MoE,
not a GEMM on the group summary, so there is no expert GEMM to fuse with its routing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from . import functional as PF
from .layers import ROUTER_INIT_STD
from .routing import check_top_l, gates_from_scores, resolve_top_l, select_top_l
from .torch_backend import routing_scores


@dataclass
class HierarchicalRouting:
    """What both levels chose for one call.

    group_indices: (B, k1, l1) int64 group numbers each top-level expert took, best first.
    group_gates:   (B, k1, l1) their level-1 gates (softmax over the chosen scores).
    indices:       (B, k1, l1, k2, l2) int64 segment numbers within the group: sub-expert s of
                   top-level expert t took segments indices[b, t, i, s] of group group_indices[b, t, i].
    gates:         (B, k1, l1, k2, l2) their level-2 gates.
    num_groups, num_segments: G and S.
    """

    group_indices: torch.Tensor
    group_gates: torch.Tensor
    indices: torch.Tensor
    gates: torch.Tensor
    num_groups: int
    num_segments: int

    @torch.no_grad()
    def flat_indices(self) -> torch.Tensor:
        """(B, k1, k2, l1*l2) int64: each sub-expert's segments numbered g*S + j, the order of
        the (B, G*S, d) flattening that a flat layer sees."""
        flat = self.indices + self.group_indices[..., None, None] * self.num_segments  # (B, k1, l1, k2, l2)
        B, k1, l1, k2, l2 = flat.shape
        return flat.permute(0, 1, 3, 2, 4).reshape(B, k1, k2, l1 * l2)

    @torch.no_grad()
    def group_hits(self, group: torch.Tensor) -> torch.Tensor:
        """(B, k1) bool: whether top-level expert t took group `group[b]` (group: (B,) int64)."""
        return (self.group_indices == group.view(-1, 1, 1)).any(-1)

    @torch.no_grad()
    def segment_hits(self, group: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        """(B, k1, k2) bool: whether sub-expert (t, s) took segment `segment[b]` of group `group[b]`
        (both (B,) int64), i.e. whether that segment reached it through both levels."""
        target = (group * self.num_segments + segment).view(-1, 1, 1, 1)
        return (self.flat_indices() == target).any(-1)


def _check_l(name: str, value: Union[int, float]) -> Union[int, float]:
    """check_top_l with messages that name the argument (top_groups or top_l)."""
    try:
        return check_top_l(value)
    except (TypeError, ValueError) as e:
        raise type(e)(str(e).replace("top_l", name)) from None


def _resolve_l(name: str, value: Union[int, float], n: int, unit: str) -> int:
    """resolve_top_l with messages that name the argument and what it counts."""
    value = _check_l(name, value)
    if isinstance(value, int) and value > n:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= {n} ({unit} per document), got {value}")
    return resolve_top_l(value, n)


def _check_parameters(x, group_router, router, weight, bias) -> tuple[int, int, int]:
    """Shapes of the four parameters against x (B, G, S, d); -> (k1, k2, m)."""
    d = x.shape[3]
    if weight.dim() != 4 or weight.shape[3] != d:
        raise ValueError(f"weight must have shape (num_group_experts, num_experts, m, {d}), got {tuple(weight.shape)}")
    k1, k2, m = weight.shape[:3]
    if k1 < 1 or k2 < 1 or m < 1:
        raise ValueError(f"weight shape {tuple(weight.shape)} has an empty expert dimension")
    if tuple(group_router.shape) != (k1, d):
        raise ValueError(f"group_router must have shape ({k1}, {d}) (num_group_experts, d), got "
                         f"{tuple(group_router.shape)}")
    if tuple(router.shape) != (k1, k2, d):
        raise ValueError(f"router must have shape ({k1}, {k2}, {d}) (num_group_experts, num_experts, d), "
                         f"got {tuple(router.shape)}")
    if bias is not None and tuple(bias.shape) != (k1, k2, m):
        raise ValueError(f"bias must have shape ({k1}, {k2}, {m}), got {tuple(bias.shape)}")
    return k1, k2, m


def _check(x, group_router, router, weight, bias, top_groups, top_l, combine, activation, backend):
    """Every check, before anything is computed; -> (l1, l2)."""
    PF.check_options(combine, "softmax", activation, backend)
    PF._check_tensors(x, group_router, weight, bias)
    PF._check_tensors(x, router, weight, bias)
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (B, G, S, d): G groups of S segments, got shape {tuple(x.shape)}")
    B, G, S, d = x.shape
    if G == 0 or S == 0 or d == 0:
        raise ValueError(f"input has an empty group, segment or feature axis: shape {tuple(x.shape)}")
    _check_parameters(x, group_router, router, weight, bias)
    PF._choose_backend(backend, x)  # raises for an unusable explicit backend
    return _resolve_l("top_groups", top_groups, G, "groups"), _resolve_l("top_l", top_l, S, "segments per group")


def _route_groups(x: torch.Tensor, group_router: torch.Tensor, l1: int):
    """Level 1: group summaries (B, G, d) = mean over segments, scores (B, k1, G), each top-level
    expert's top-l1 groups (B, k1, l1) and their softmax gates (B, k1, l1)."""
    scores = routing_scores(x.mean(2), group_router)
    idx = select_top_l(scores.detach(), l1)
    return idx, gates_from_scores(scores, torch.gather(scores, 2, idx), "softmax")


def _level2(x, gidx, g1, t, router, weight, bias, l2, opts, pooled):
    """Top-level expert t: its sub-experts on the segments of its chosen groups, times G1.
    Returns (pooled (B, out2) | the (B*G, S, out2) map, zero outside t's groups), the Routing."""
    B, G, S, d = x.shape
    l1 = gidx.shape[2]
    rows = (gidx[:, t] + torch.arange(B, device=x.device).view(B, 1) * G).reshape(B * l1)
    xt = x.reshape(B * G, S, d).index_select(0, rows)  # (B*l1, S, d): the groups t took
    yt, routing = PF.pmoe(xt, router[t], weight[t], None if bias is None else bias[t], top_l=l2,
                          return_routing=True, gate="softmax", pooled=pooled, **opts)
    gate = g1[:, t].reshape(B * l1, *([1] * (yt.dim() - 1))).to(yt.dtype)
    yt = yt * gate
    if pooled:
        return yt.view(B, l1, yt.shape[-1]).sum(1), routing  # not -1: ambiguous for B = 0
    # each of t's groups is distinct, so a copy places every row
    return yt.new_zeros(B * G, S, yt.shape[-1]).index_copy(0, rows, yt), routing


def _run(x, group_router, router, weight, bias, l1, l2, combine, activation, backend, deterministic, pooled):
    B, G, S, _ = x.shape
    k1, k2 = weight.shape[:2]
    gidx, g1 = _route_groups(x, group_router, l1)
    opts = dict(combine=combine, activation=activation, backend=backend, deterministic=deterministic)
    parts, idx2, g2 = [], [], []
    for t in range(k1):
        y_t, r_t = _level2(x, gidx, g1, t, router, weight, bias, l2, opts, pooled)
        parts.append(y_t)
        idx2.append(r_t.indices.view(B, l1, k2, l2))
        g2.append(r_t.gates.view(B, l1, k2, l2))
    y = torch.stack(parts, dim=-2)  # (B, k1, out2) | (B*G, S, k1, out2)
    y = y.flatten(-2) if combine == "concat" else y.sum(-2)
    if not pooled:
        y = y.view(B, G, S, y.shape[-1])
    routing = HierarchicalRouting(gidx, g1.detach(), torch.stack(idx2, 1), torch.stack(g2, 1), G, S)
    return y, routing


def hierarchical_pmoe(
    x: torch.Tensor,
    group_router: torch.Tensor,
    router: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    top_groups: Union[int, float],
    top_l: Union[int, float],
    combine: str = "concat",
    activation: str = "relu",
    backend: str = "auto",
    deterministic: bool = False,
    return_routing: bool = False,
    pooled: bool = False,
):
    """Hierarchical pMoE on a (B, G, S, d) tensor (SPEC §6).

    group_router: (k1, d); router: (k1, k2, d); weight: (k1, k2, m, d); bias: (k1, k2, m) or None.
    top_groups (l1, of the G groups) and top_l (l2, of the S segments of a group): a count or a
    fraction.  Returns y (B, G, S, k1*k2*m) for "concat" (block t*k2 + s is sub-expert (t, s);
    exactly 0 where it took nothing), (B, G, S, m) for "sum", and with return_routing the
    HierarchicalRouting.  Gates are softmax over the chosen scores at both levels.
    pooled: see hierarchical_pmoe_pooled.
    """
    l1, l2 = _check(x, group_router, router, weight, bias, top_groups, top_l, combine, activation, backend)
    y, routing = _run(x, group_router, router, weight, bias, l1, l2, combine, activation, backend, deterministic,
                      pooled)
    return (y, routing) if return_routing else y


def hierarchical_pmoe_pooled(x: torch.Tensor, group_router: torch.Tensor, router: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, **options):
    """``hierarchical_pmoe(x, ...).sum((1, 2))``, (B, k1*k2*m | m), without the (B, G, S, out)
    map: level 2 runs pooled.  Same arguments and checks as hierarchical_pmoe (it is
    hierarchical_pmoe(..., pooled=True))."""
    return hierarchical_pmoe(x, group_router, router, weight, bias, pooled=True, **options)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


class HierarchicalPMoE(nn.Module):
    """Two-level expert-choice routing: x (B, G, S, in_features) -> y (B, G, S, out_features).

    num_group_experts (k1) top-level experts each take their top_groups (l1) groups by the score
    of the group's mean segment; inside each, its num_experts (k2) sub-experts each take their
    top_l (l2) segments and run a GEMM on them (SPEC §6).  Parameters: group_router (k1, d),
    router (k1, k2, d), weight (k1, k2, m_s, d) with m_s = out_features / (k1*k2) for "concat"
    and out_features for "sum", bias (k1, k2, m_s) or None.
    """

    def __init__(self, in_features: int, out_features: int, num_group_experts: int, top_groups: Union[int, float],
                 num_experts: int, top_l: Union[int, float], combine: str = "concat", bias: bool = False,
                 activation: str = "relu", backend: str = "auto", deterministic: bool = False,
                 device=None, dtype=None):
        super().__init__()
        PF.check_options(combine, "softmax", activation, backend)
        for name, v in (("in_features", in_features), ("out_features", out_features),
                        ("num_group_experts", num_group_experts), ("num_experts", num_experts)):
            _positive_int(name, v)
        k1, k2 = num_group_experts, num_experts
        if combine == "concat" and out_features % (k1 * k2):
            raise ValueError(f"combine='concat' splits the {out_features} outputs evenly over the {k1}x{k2} "
                             f"sub-experts: out_features must be divisible by {k1 * k2}")
        self.in_features, self.out_features = in_features, out_features
        self.top_groups, self.top_l = _check_l("top_groups", top_groups), _check_l("top_l", top_l)  # G, S are known at forward
        self.combine, self.activation, self.backend, self.deterministic = combine, activation, backend, deterministic
        m = out_features // (k1 * k2) if combine == "concat" else out_features
        fk = {"device": device, "dtype": dtype}
        self.group_router = nn.Parameter(torch.empty(k1, in_features, **fk))
        self.router = nn.Parameter(torch.empty(k1, k2, in_features, **fk))
        self.weight = nn.Parameter(torch.empty(k1, k2, m, in_features, **fk))
        self.bias = nn.Parameter(torch.empty(k1, k2, m, **fk)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Routers ~ N(0, ROUTER_INIT_STD^2) (near-uniform early routing, as the flat layer);
        experts uniform with bound 1/sqrt(in_features)."""
        nn.init.normal_(self.group_router, std=ROUTER_INIT_STD)
        nn.init.normal_(self.router, std=ROUTER_INIT_STD)
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _args(self) -> tuple:
        return self.group_router, self.router, self.weight, self.bias

    def _opts(self) -> dict:
        return dict(top_groups=self.top_groups, top_l=self.top_l, combine=self.combine, activation=self.activation,
                    backend=self.backend, deterministic=self.deterministic)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        return hierarchical_pmoe(x, *self._args(), return_routing=return_routing, **self._opts())

    def forward_pooled(self, x: torch.Tensor, return_routing: bool = False):
        """``self(x).sum((1, 2))`` without the (B, G, S, out) map: (B, out_features) [, routing]."""
        return hierarchical_pmoe_pooled(x, *self._args(), return_routing=return_routing, **self._opts())

    def extra_repr(self) -> str:
        k1, k2 = self.weight.shape[:2]
        return (f"{self.in_features}, {self.out_features}, num_group_experts={k1}, top_groups={self.top_groups}, "
                f"num_experts={k2}, top_l={self.top_l}, combine={self.combine!r}, bias={self.bias is not None}, "
                f"activation={self.activation!r}, backend={self.backend!r}")

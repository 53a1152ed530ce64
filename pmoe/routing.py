"""Routing: expert-choice top-l selection with SPEC's tie rule, gates, and routing statistics.

Shared by every backend: the torch path calls these directly, the Triton kernels reproduce
them on-chip and are tested against them.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .vocab import check


def check_top_l(top_l: Union[int, float]) -> Union[int, float]:
    """Validate top_l without knowing n: an int count >= 1 or a float fraction in (0, 1].
    Numpy/other integral and real scalars are accepted and returned as int/float."""
    if isinstance(top_l, bool) or not isinstance(top_l, numbers.Real):
        raise TypeError(f"top_l must be an int count or a float fraction, got {type(top_l).__name__}")
    if isinstance(top_l, numbers.Integral):
        if top_l < 1:
            raise ValueError(f"top_l must be >= 1, got {top_l}")
        return int(top_l)
    top_l = float(top_l)
    if not 0.0 < top_l <= 1.0:  # also rejects NaN
        raise ValueError(f"top_l as a fraction must lie in (0, 1], got {top_l}")
    return top_l


def resolve_top_l(top_l: Union[int, float], n: int) -> int:
    """Number of patches each expert takes: an int count in [1, n], or a fraction of n in (0, 1]
    (rounded half up, at least 1)."""
    top_l = check_top_l(top_l)
    if isinstance(top_l, float):
        return max(1, min(n, int(math.floor(top_l * n + 0.5))))
    if top_l > n:
        raise ValueError(f"top_l must satisfy 1 <= top_l <= n = {n} (number of patches), got {top_l}")
    return top_l


@torch.no_grad()
def select_top_l(scores: torch.Tensor, l: int) -> torch.Tensor:
    """Indices of the ``l`` largest scores along the last dim, best first.

    scores: (..., n) -> (..., l) int64.  Ties go to the lower patch index.  NaN ranks above
    +inf (torch's sort order), so a NaN image still yields indices in [0, n); -0.0 and +0.0 are
    equal.  A stable descending sort (it keeps equal scores in index order); for n >= 32 and the
    float dtypes narrower than float64, the top-k of unique integer keys (_order_keys) instead,
    two to three times faster on CPU, with the same result.
    """
    if scores.dtype == torch.float64 or scores.shape[-1] < _TOPK_MIN_N:
        return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :l]
    return torch.topk(_order_keys(scores), l, dim=-1).indices


_TOPK_MIN_N = 32  # below this the keys' dozen small ops cost more than the sort they replace
_NAN_KEY = torch.iinfo(torch.int32).max


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """(..., n) float32/bfloat16/float16 scores -> (..., n) int64 keys, all distinct, whose
    descending order is the selection order: the high 32 bits are the float32 value's bits made
    monotone (flip the magnitude bits of negatives; -0.0 made +0.0; every NaN the largest key),
    the low 32 bits n-1-j, so that of equal scores the lower index ranks higher."""
    n = scores.shape[-1]
    s = torch.where(scores == 0, 0.0, scores.float())  # exact for bf16/f16; -0.0 -> +0.0
    bits = s.view(torch.int32)
    bits = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).masked_fill_(s.isnan(), _NAN_KEY)
    return (bits.long() << 32) | (n - 1 - torch.arange(n, device=scores.device))


def gate_values(selected_scores: torch.Tensor, gate: str, lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gates of the chosen patches from their scores (B, k, l) (SPEC §1): softmax over the l
    chosen; indicator: ones; softmax_all: exp(score - lse) with lse (B, k) the log-sum-exp of all
    n scores, i.e. normalised over all n and not renormalised.  The torch side's one gate formula."""
    if gate == "softmax":
        return torch.softmax(selected_scores, dim=-1)
    if gate == "indicator":
        return torch.ones_like(selected_scores)
    check("gate", gate)
    return torch.exp(selected_scores - lse.unsqueeze(-1))


def gate_values_backward(dg: torch.Tensor, g: torch.Tensor, gate: str):
    """gate_values' backward: dg, g (B, k, l) -> (d selected_scores (B, k, l) or None, d lse
    (B, k) or None)."""
    if gate == "softmax":
        return g * (dg - (g * dg).sum(-1, keepdim=True)), None
    if gate == "softmax_all":
        gdg = g * dg
        return gdg, -gdg.sum(-1)
    return None, None


def gates_from_scores(scores: torch.Tensor, selected_scores: torch.Tensor, gate: str) -> torch.Tensor:
    """gate_values given all the scores (B, k, n): the log-sum-exp, where needed, taken here."""
    lse = torch.logsumexp(scores, dim=-1) if gate == "softmax_all" else None
    return gate_values(selected_scores, gate, lse)


@dataclass
class Routing:
    """What the router chose for one call.

    indices: (B, k, l) int64 patch numbers (row-major over the patch grid), best score first.
    gates:   (B, k, l) gate value of each chosen patch.
    num_patches: n, the number of patches per image.
    """

    indices: torch.Tensor
    gates: torch.Tensor
    num_patches: int

    @property
    def num_experts(self) -> int:
        return self.indices.shape[1]

    @property
    def top_l(self) -> int:
        return self.indices.shape[2]

    @torch.no_grad()
    def position_counts(self) -> torch.Tensor:
        """(n,) int64: how many (image, expert) choices landed on each patch position, summed over
        the batch.  A position that draws far more than the mean ``B*k*l/n`` is a routing hot spot."""
        counts = torch.zeros(self.num_patches, dtype=torch.int64, device=self.indices.device)
        flat = self.indices.reshape(-1)
        return counts.index_add_(0, flat, torch.ones_like(flat))

    @torch.no_grad()
    def patch_load(self) -> torch.Tensor:
        """(B, n) int64: how many experts took patch j of image b, in [0, k].

        With expert choice this, not the expert load, is what varies: a patch can be taken by
        several experts or by none."""
        B = self.indices.shape[0]
        load = torch.zeros(B, self.num_patches, dtype=torch.int64, device=self.indices.device)
        # reshape(B, k*l), not (B, -1): -1 is ambiguous for an empty batch
        flat = self.indices.reshape(B, self.num_experts * self.top_l)
        return load.scatter_add_(1, flat, torch.ones_like(flat))

    @torch.no_grad()
    def expert_load(self) -> torch.Tensor:
        """(k,) int64: number of patches each expert processed over the batch.

        With expert choice every expert takes exactly l patches from every image, so this is
        always ``B*l`` for every expert: the layer needs no load-balancing loss and no capacity
        factor, and drops no tokens for capacity reasons.  Kept so that logging code written for
        token-choice MoE finds the usual number."""
        B, k, l = self.indices.shape
        return torch.full((k,), B * l, dtype=torch.int64, device=self.indices.device)

    @torch.no_grad()
    def coverage(self) -> torch.Tensor:
        """(B, n) bool: whether any expert took patch j of image b."""
        return self.patch_load() > 0

    @torch.no_grad()
    def unrouted_fraction(self) -> float:
        """Fraction of the B*n patches that no expert chose (0 for an empty batch)."""
        cov = self.coverage()
        return 0.0 if cov.numel() == 0 else 1.0 - cov.double().mean().item()

    @torch.no_grad()
    def gate_entropy(self) -> float:
        """Mean over (image, expert) of the entropy (nats) of the expert's gates over its l patches,
        each renormalised to sum 1 first (so "softmax_all" gates are comparable); log(l) means
        uniform gates (always so for "indicator"), 0 means one patch carries all the weight.
        0 for an empty batch; NaN if a gate is NaN (a NaN input: see docs/ROBUSTNESS.md)."""
        g = self.gates.double()
        if g.numel() == 0:
            return 0.0
        p = g / g.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        # 0 * log(0) = 0: xlogy gives exactly that, a clamp inside the log would not for p = 0
        return float(-torch.special.xlogy(p, p).sum(-1).mean())

    def stats(self) -> dict:
        """A small dict of floats for logging.

        unrouted_fraction: patches no expert took; position_max_over_mean: the busiest patch
        position's count over the mean count (1 = positions used evenly, 0 for an empty batch);
        max_experts_per_patch_mean: over images, the most experts any one patch drew (1..k);
        gate_entropy and its uniform value log(l).  Per-expert load is not reported: it is B*l
        for every expert by construction (see expert_load)."""
        counts = self.position_counts().double()
        load = self.patch_load()
        return {
            "unrouted_fraction": self.unrouted_fraction(),
            "position_max_over_mean": float(counts.max() / counts.mean()) if counts.sum() > 0 else 0.0,
            "max_experts_per_patch_mean": float(load.max(1).values.double().mean()) if load.shape[0] else 0.0,
            "gate_entropy": self.gate_entropy(),
            "gate_entropy_uniform": math.log(self.top_l) if self.top_l > 0 else 0.0,
        }

"""Routing: expert-choice top-l selection with SPEC's tie rule, gates, and routing statistics.

Shared by every backend: the torch path calls these directly, the Triton kernels reproduce
them on-chip and are tested against them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

GATES = ("softmax", "indicator", "softmax_all")


def resolve_top_l(top_l: Union[int, float], n: int) -> int:
    """Number of patches each expert takes: an int count in [1, n], or a fraction of n in (0, 1]
    (rounded half up, at least 1)."""
    if isinstance(top_l, bool) or not isinstance(top_l, (int, float)):
        raise TypeError(f"top_l must be an int count or a float fraction, got {type(top_l).__name__}")
    if isinstance(top_l, float):
        if not (0.0 < top_l <= 1.0) or math.isnan(top_l):
            raise ValueError(f"top_l as a fraction must lie in (0, 1], got {top_l}")
        return max(1, min(n, int(math.floor(top_l * n + 0.5))))
    if not 1 <= top_l <= n:
        raise ValueError(f"top_l must satisfy 1 <= top_l <= n = {n} (number of patches), got {top_l}")
    return int(top_l)


@torch.no_grad()
def select_top_l(scores: torch.Tensor, l: int) -> torch.Tensor:
    """Indices of the ``l`` largest scores along the last dim, best first.

    scores: (..., n) -> (..., l) int64.  Ties go to the lower patch index (a stable descending
    sort keeps equal scores in index order).  NaN ranks above +inf (torch's sort order), so a
    NaN image still yields indices in [0, n); -0.0 and +0.0 are equal.
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :l]


def gates_from_scores(scores: torch.Tensor, selected_scores: torch.Tensor, gate: str) -> torch.Tensor:
    """Gate values of the selected patches.

    scores: (B, k, n) all routing scores; selected_scores: (B, k, l) the chosen ones.
    softmax: normalised over the l chosen; indicator: ones; softmax_all: normalised over all n,
    then the chosen ones kept without renormalising.
    """
    if gate == "softmax":
        return torch.softmax(selected_scores, dim=-1)
    if gate == "indicator":
        return torch.ones_like(selected_scores)
    if gate == "softmax_all":
        # log-sum-exp over all n keeps this exact for large scores
        return torch.exp(selected_scores - torch.logsumexp(scores, dim=-1, keepdim=True))
    raise ValueError(f"unknown gate {gate!r}; expected one of {GATES}")


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
        """(n,) how many (image, expert) choices landed on each patch position."""
        counts = torch.zeros(self.num_patches, dtype=torch.int64, device=self.indices.device)
        return counts.index_add_(0, self.indices.reshape(-1), torch.ones_like(self.indices.reshape(-1)))

    @torch.no_grad()
    def coverage(self) -> torch.Tensor:
        """(B, n) bool: whether any expert took patch j of image b."""
        B = self.indices.shape[0]
        taken = torch.zeros(B, self.num_patches, dtype=torch.bool, device=self.indices.device)
        return taken.scatter_(1, self.indices.reshape(B, -1), True)

    @torch.no_grad()
    def unrouted_fraction(self) -> float:
        """Fraction of patches that no expert chose (0 for an empty batch)."""
        cov = self.coverage()
        return 0.0 if cov.numel() == 0 else 1.0 - cov.float().mean().item()

    @torch.no_grad()
    def gate_entropy(self) -> float:
        """Mean entropy (nats) of each expert's gate distribution over its l patches, normalised
        to sum 1 first; log(l) means uniform gates, 0 means one patch carries all the weight."""
        g = self.gates.float()
        if g.numel() == 0:
            return 0.0
        p = g / g.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())

    def stats(self) -> dict:
        """A small dict for logging: per-expert load is l by construction (expert choice), so the
        health signals are coverage, position imbalance and gate entropy."""
        counts = self.position_counts().float()
        return {
            "unrouted_fraction": self.unrouted_fraction(),
            "position_max_over_mean": float(counts.max() / counts.mean()) if counts.sum() > 0 else 0.0,
            "gate_entropy": self.gate_entropy(),
            "gate_entropy_uniform": math.log(self.top_l) if self.top_l > 0 else 0.0,
        }

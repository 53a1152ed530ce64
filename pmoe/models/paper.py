"""The paper's two-layer networks (SPEC §2): the pMoE classifier and the single-expert CNN.

Both return one logit per image, (B,), for binary tasks with labels +-1 (label 1 <-> +1); the
second-layer weights `a` are a fixed buffer, not a parameter, as in the paper's analysis.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn

from ..data.base import image_to_patches
from ..layers import PMoEConv2d

HEADS = ("sign", "gaussian")


def _check_positive(**values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def fixed_head(kind: str, groups: int, per_group: int) -> torch.Tensor:
    """(groups*per_group,) second-layer weights.

    "gaussian": i.i.d. N(0, 1) (drawn from torch's global RNG; the paper's joint training).
    "sign": +1 for the first half of the groups, -1 for the second half (the paper's separate
    training, groups = experts: expert 0 serves class +1, expert 1 class -1); with one group
    (the CNN) the halves are taken over the units instead.
    """
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; expected one of {HEADS}")
    if kind == "gaussian":
        return torch.randn(groups * per_group)
    units, count = (groups, per_group) if groups > 1 else (per_group, 1)
    if units % 2:
        raise ValueError(f'head="sign" splits {"experts" if groups > 1 else "neurons"} into a +1 and a -1 '
                         f"half: need an even number, got {units}")
    signs = torch.cat([torch.ones(units // 2), -torch.ones(units // 2)])
    return signs.repeat_interleave(count)


class PMoEClassifier(nn.Module):
    """f(x) = sum_s sum_r a_{r,s} (1/l) sum_{j in J_s} G[s,j] ReLU(<w_{r,s}, x_j>)   (SPEC §2).

    x: (B, C, H, W) -> logit (B,).  The pMoE layer is `pmoe.PMoEConv2d` (concat, no bias, ReLU)
    with out_channels = num_experts * neurons_per_expert; `head` is the fixed vector a, a buffer
    of shape (num_experts * neurons_per_expert,).  Defaults: the paper's joint-training setup
    (k=8, l=6, 5 neurons, Gaussian head, softmax gate).
    """

    def __init__(self, in_channels: int, patch_size: int, num_experts: int = 8, top_l: Union[int, float] = 6,
                 neurons_per_expert: int = 5, head: str = "gaussian", gate: str = "softmax",
                 backend: str = "auto"):
        super().__init__()
        _check_positive(num_experts=num_experts, neurons_per_expert=neurons_per_expert)
        self.patch_size = patch_size
        self.moe = PMoEConv2d(in_channels, num_experts * neurons_per_expert, patch_size, num_experts, top_l,
                              combine="concat", gate=gate, bias=False, activation="relu", backend=backend)
        self.register_buffer("head", fixed_head(head, num_experts, neurons_per_expert))

    def router_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, n, d): the patch vectors the routers score."""
        return image_to_patches(x, self.patch_size)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        # the layer's output summed over patches, (B, k*m), without its (B, k*m, H/p, W/p) map
        # (zero off the chosen patches): the pooled kernels never write it, nor its gradient
        pooled, routing = self.moe.forward_pooled(x, return_routing=True)
        logit = (pooled / routing.top_l) @ self.head
        return (logit, routing) if return_routing else logit


class CNNClassifier(nn.Module):
    """The single-expert baseline: f(x) = sum_r a_r (1/n) sum_j ReLU(<w_r, x_j>)   (SPEC §2).

    x: (B, C, H, W) -> logit (B,).  One p x p conv with stride p (every patch, no router, no
    bias), ReLU, mean over the n patches, fixed head a (buffer, (neurons,)); "sign" by default:
    half the neurons +1, half -1.
    """

    def __init__(self, in_channels: int, patch_size: int, neurons: int = 40, head: str = "sign"):
        super().__init__()
        _check_positive(in_channels=in_channels, patch_size=patch_size, neurons=neurons)
        self.patch_size = patch_size
        self.conv = nn.Conv2d(in_channels, neurons, patch_size, stride=patch_size, bias=False)
        self.register_buffer("head", fixed_head(head, 1, neurons))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"input must be (B, C, H, W) with H, W multiples of {self.patch_size}, "
                             f"got shape {tuple(x.shape)}")
        return torch.relu(self.conv(x)).mean((2, 3)) @ self.head

"""The flagship pMoE network and its dense single-expert twin, for the compute and training-time
benchmarks (bench/compute_savings.py, bench/train_time.py, bench/profile.py).

    net = FlagshipPMoE(in_channels=1, num_classes=2)     # 32x32 digits-patch images
    twin = FlagshipDense(in_channels=1, num_classes=2)   # same widths, one expert, every patch
    net = FlagshipPMoE(in_channels=3, num_classes=10)    # CIFAR-sized 3x32x32

Layout (widths w0, w1, w2 by default 16, 64, 128; 32x32 input):

    stem   3x3 conv in -> w0, BN, ReLU                     32x32   dense in both (cheap: C_in is small)
    stage  patch layer w0 -> w1, p = 2, then BN            -> 16x16 n = 256 patches
    stage  patch layer w1 -> w2, p = 2, then BN            -> 8x8   n = 64 patches
    head   global average pooling, linear w2 -> classes

The patch layers carry nearly all the FLOPs.  In FlagshipPMoE each is a pMoEConv2d (k experts,
concat, each takes the top `top_l` fraction of the patches, ReLU); in FlagshipDense it is the
same p x p stride-p conv (+ ReLU) over every patch with all the neurons, i.e. one expert that
sees all n patches.  The pMoE layers sit where the heavy convs are, as V-MoE puts experts where
the MLPs are.  Per patch layer, pMoE costs l/n + k/m of the dense conv (SPEC §4): with the
defaults 0.25 + 4/16 and 0.25 + 4/32.  The BN after each patch layer restores the scale the
softmax gate (about 1/l per patch) takes away.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from ..layers import PMoEConv2d

TopL = Union[int, float]


class Contiguous(nn.Module):
    """The pMoE layer returns a channels-last view (each patch's channels are contiguous); the
    rest of this network is NCHW.  Without this copy, BatchNorm's backward on CPU gets an NCHW
    gradient for a channels-last input and takes a slow mixed-layout path (10-15x slower on
    torch 2.13 CPU, which made the whole training step about 2x slower)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


class Flagship(nn.Module):
    """x (B, in_channels, H, W) -> logits (B, num_classes); H, W divisible by prod(patch_sizes).

    widths: (w0, w1, ..., wS): the stem's width, then one patch stage per further width.
    patch_sizes: one per stage.  top_l: a fraction of n or a count, one for all stages or one per
    stage.  dense=True builds the single-expert twin (num_experts, top_l, gate, backend unused).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, widths: Sequence[int] = (16, 64, 128),
                 patch_sizes: Sequence[int] = (2, 2), num_experts: int = 4,
                 top_l: Union[TopL, Sequence[TopL]] = 0.25, gate: str = "softmax", backend: str = "auto",
                 dense: bool = False):
        super().__init__()
        widths, patch_sizes = list(widths), list(patch_sizes)
        if len(widths) != len(patch_sizes) + 1:
            raise ValueError(f"need one width per stage plus the stem's: got widths {widths} for "
                             f"{len(patch_sizes)} patch sizes")
        stages = len(patch_sizes)
        top_ls = list(top_l) if isinstance(top_l, (list, tuple)) else [top_l] * stages
        if len(top_ls) != stages:
            raise ValueError(f"top_l must be one value or one per stage ({stages}), got {top_l!r}")
        self.dense = dense
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers = []
        for cin, cout, p, l in zip(widths[:-1], widths[1:], patch_sizes, top_ls):
            if dense:
                patch = nn.Sequential(nn.Conv2d(cin, cout, p, stride=p, bias=False), nn.ReLU())
            else:
                patch = nn.Sequential(PMoEConv2d(cin, cout, p, num_experts, l, combine="concat", gate=gate,
                                                 bias=False, activation="relu", backend=backend), Contiguous())
            layers.append(nn.Sequential(patch, nn.BatchNorm2d(cout)))
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.fc(h.mean((2, 3)))


class FlagshipPMoE(Flagship):
    """The pMoE flagship (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs["dense"] = False
        super().__init__(*args, **kwargs)


class FlagshipDense(Flagship):
    """The dense single-expert twin: same widths, every patch through all the neurons."""

    def __init__(self, *args, **kwargs):
        kwargs["dense"] = True
        super().__init__(*args, **kwargs)


def flagship_pair(**kwargs) -> tuple[FlagshipPMoE, FlagshipDense]:
    """(pMoE network, dense twin) built with the same arguments."""
    return FlagshipPMoE(**kwargs), FlagshipDense(**kwargs)

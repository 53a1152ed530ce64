"""The flagship pMoE network and its dense single-expert twin, for the compute and training-time
benchmarks (bench/compute_savings.py, bench/train_time.py, bench/profile_layer.py).

    net = FlagshipPMoE(in_channels=1, num_classes=2)     # 32x32 digits-patch images
    twin = FlagshipDense(in_channels=1, num_classes=2)   # same widths, one expert, every patch
    net = FlagshipPMoE(in_channels=3, num_classes=10)    # CIFAR-sized 3x32x32

Layout (widths w0, w1, w2 by default 16, 32, 256; 32x32 input):

    stem   3x3 conv in -> w0, BN, ReLU                     32x32   dense in both (cheap: C_in is small)
    stage  patch conv w0 -> w1, p = 2, ReLU, BN            -> 16x16 dense in both by default
    stage  patch layer w1 -> w2, p = 2, then BN            -> 8x8   n = 64 patches: the pMoE stage
    head   global average pooling, linear w2 -> classes

The last patch stage carries most of the FLOPs (about 76% of the dense twin's).  In FlagshipPMoE
it is a PMoEConv2d (k = 4 experts, concat, each takes the top `top_l` fraction of the n = 64
patches, l = 16 by default, ReLU) -- the paper's CIFAR-10 placement and sizes (SPEC §3: n = 64,
k = 4, l = 16 after the last stage), and where V-MoE puts experts: in place of the late heavy
layers.  In FlagshipDense it is the same p x p stride-p conv (+ ReLU) over every patch with all the
neurons, i.e. one expert that sees all n patches.  Per pMoE stage the cost is l/n + k/m of the
dense conv (SPEC §4): 0.25 + 4/64 with the defaults, so 0.44 of the dense network's inference
FLOPs in all.  `moe_stages` picks the stages that are pMoE layers: an earlier flagship put pMoE in
both stages (0.32 of the FLOPs) and was 6 points less accurate than its twin on digits-patch
3 vs 5 (docs/RESULTS.md §4); routing the 256 small early patches loses too much.
The BN after each patch layer restores the scale the softmax gate (about 1/l per patch) takes away.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..layers import PMoEConv2d
from ..torch_backend import channels_last

TopL = Union[int, float]
DEFAULT_WIDTHS = (16, 32, 256)  # stem, dense patch stage, pMoE patch stage


class KeepLayout(nn.Module):
    """Runs `layer` and returns its output in the memory format of its input.  The PyTorch path
    already does (its output follows the input's format, as nn.Conv2d's does: then nothing is
    copied); the fused kernels return a channels-last view (each patch's channels contiguous),
    which an NCHW network must copy back: otherwise BatchNorm's backward on CPU gets an NCHW
    gradient for a channels-last input and takes a slow mixed-layout path (10-15x slower on torch
    2.13 CPU, which made the whole training step about 2x slower)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y.contiguous(memory_format=torch.channels_last if channels_last(x) else torch.contiguous_format)


class Flagship(nn.Module):
    """x (B, in_channels, H, W) -> logits (B, num_classes); H, W divisible by prod(patch_sizes).

    widths: (w0, w1, ..., wS): the stem's width, then one patch stage per further width.
    patch_sizes: one per stage.  moe_stages: one bool per stage, True for a pMoE stage (default:
    only the last).  top_l: a fraction of n or a count, one for all stages or one per stage (read
    for pMoE stages only).  dense=True builds the single-expert twin: every stage dense
    (moe_stages, num_experts, top_l, gate and backend unused).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, widths: Sequence[int] = DEFAULT_WIDTHS,
                 patch_sizes: Sequence[int] = (2, 2), num_experts: int = 4,
                 top_l: Union[TopL, Sequence[TopL]] = 0.25, gate: str = "softmax", backend: str = "auto",
                 moe_stages: Optional[Sequence[bool]] = None, dense: bool = False):
        super().__init__()
        widths, patch_sizes = list(widths), list(patch_sizes)
        if len(widths) != len(patch_sizes) + 1:
            raise ValueError(f"need one width per stage plus the stem's: got widths {widths} for "
                             f"{len(patch_sizes)} patch sizes")
        stages = len(patch_sizes)
        top_ls = list(top_l) if isinstance(top_l, (list, tuple)) else [top_l] * stages
        if len(top_ls) != stages:
            raise ValueError(f"top_l must be one value or one per stage ({stages}), got {top_l!r}")
        moe = [False] * (stages - 1) + [True] if moe_stages is None else [bool(m) for m in moe_stages]
        if len(moe) != stages:
            raise ValueError(f"moe_stages must have one entry per stage ({stages}), got {list(moe_stages)}")
        self.moe_stages = tuple(m and not dense for m in moe)
        self.dense = dense
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers = []
        for cin, cout, p, l, use_moe in zip(widths[:-1], widths[1:], patch_sizes, top_ls, self.moe_stages):
            if not use_moe:
                patch = nn.Sequential(nn.Conv2d(cin, cout, p, stride=p, bias=False), nn.ReLU())
            else:
                patch = KeepLayout(PMoEConv2d(cin, cout, p, num_experts, l, combine="concat", gate=gate,
                                              bias=False, activation="relu", backend=backend))
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

"""CIFAR-style Wide-ResNet (Zagoruyko & Komodakis 2016) and the authors' WRN-pMoE (SPEC §3).

WRN-d-w: a 3x3 stem conv to `base_width` channels, then three stages of (d-4)/6 pre-activation
basic blocks with widths base_width*w*(1, 2, 4) and strides (1, 2, 2), so a 32x32 input ends
at 8x8 with a 3x3 conv.  WRN-28-10 ends with 640 channels: the authors' network.  The default
here, WRN-16-4 (256 channels), is a size a CPU can train.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import PMoEConv2d


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus the input
    (through a 1x1 conv with the same stride when the shape changes).  (B, cin, H, W) ->
    (B, cout, H/stride, W/stride)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # like the reference WRN, the projection shortcut takes the pre-activated input
        skip = x if self.shortcut is None else self.shortcut(o)
        o = F.relu(self.bn2(self.conv1(o)))
        if self.dropout > 0:
            o = F.dropout(o, self.dropout, self.training)
        return self.conv2(o) + skip


class WideResNet(nn.Module):
    """x (B, in_channels, H, W) -> logits (B, num_classes).

    `features(x)` is the last stage's output (B, out_channels, H/4, W/4), before the final
    BN-ReLU; the head is BN, ReLU, global average pooling, linear.
    """

    def __init__(self, depth: int = 16, widen_factor: int = 4, num_classes: int = 10, in_channels: int = 3,
                 base_width: int = 16, dropout: float = 0.0):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth!r}")
        for name, v in (("widen_factor", widen_factor), ("num_classes", num_classes),
                        ("in_channels", in_channels), ("base_width", base_width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        blocks = (depth - 4) // 6
        widths = [base_width * widen_factor * f for f in (1, 2, 4)]
        self.stem = nn.Conv2d(in_channels, base_width, 3, 1, 1, bias=False)
        layers, cin = [], base_width
        for width, stride in zip(widths, (1, 2, 2)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, width, stride if b == 0 else 1, dropout))
                cin = width
        self.stages = nn.Sequential(*layers)
        self.out_channels = cin
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Linear):
                nn.init.zeros_(mod.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.features(x)))
        return self.fc(h.mean((2, 3)))


class WRNPMoE(WideResNet):
    """Wide-ResNet whose head is the authors' pMoE block (SPEC §3):

        features (B, c, 8, 8) -> BN -> ReLU -> pMoE(1x1 patches, n = 64, k experts, top-l, each
        expert a 1x1 conv c -> c/k, no bias, no activation) concatenated to c channels -> BN ->
        ReLU -> average pooling -> linear.

    With WRN-28-10, c = 640, k = 4, l = 16: the authors' network.

    Where the expert's BN + ReLU sit: in the authors' code each expert is BN + ReLU + 1x1 conv
    applied to a masked copy of the whole map (unselected positions zeroed *before* the BN).
    Here an expert computes only on its selected patches, so it cannot hold a BN over the map
    of its own; instead one BN + ReLU, shared by the experts, normalises the whole map *before*
    the pMoE layer.  Consequences: (1) k BNs become one (the experts differ by their convs and
    routers only); (2) the routers score the normalised, rectified features -- the layer routes
    on its own input; (3) unselected positions are exactly 0 at the pMoE output (the authors'
    masked BN turns them into a learned per-expert constant).  The pMoE output's BN + ReLU and
    the pooling then run over all 64 positions, zeros included, as in the authors' network.
    The gate defaults to "softmax_all", what the authors' Wide-ResNet code computes.

    x (B, in_channels, H, W) -> logits (B, num_classes); forward(x, return_routing=True) also
    returns the pMoE layer's Routing.
    """

    def __init__(self, depth: int = 16, widen_factor: int = 4, num_classes: int = 10, in_channels: int = 3,
                 base_width: int = 16, dropout: float = 0.0, num_experts: int = 4,
                 top_l: Union[int, float] = 16, gate: str = "softmax_all", backend: str = "auto"):
        super().__init__(depth, widen_factor, num_classes, in_channels, base_width, dropout)
        c = self.out_channels
        self.expert_bn = nn.BatchNorm2d(c)
        self.moe = PMoEConv2d(c, c, 1, num_experts, top_l, combine="concat", gate=gate, bias=False,
                              activation="identity", backend=backend)
        # self.bn (inherited) is the BN after the concatenation

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        h = F.relu(self.expert_bn(self.features(x)))
        h, routing = self.moe(h, return_routing=True)
        logits = self.fc(F.relu(self.bn(h)).mean((2, 3)))
        return (logits, routing) if return_routing else logits

"""Drop-in modules: PMoEConv2d on feature maps, PMoE on patch/token tensors."""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

from . import functional as PF
from .routing import check_top_l

ROUTER_INIT_STD = 1e-3  # the paper starts routers tiny, so early routing is near-uniform


class _PMoEBase(nn.Module):
    """Parameters and init shared by both forms.  weight_tail is (C, p, p) or (d,)."""

    def __init__(self, d: int, weight_tail: tuple, out_features: int, num_experts: int,
                 top_l: Union[int, float], combine: str, gate: str, bias: bool, activation: str,
                 backend: str, deterministic: bool, device=None, dtype=None):
        super().__init__()
        PF.check_options(combine, gate, activation, backend)
        for name, v in (("num_experts", num_experts), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if combine == "concat" and out_features % num_experts:
            raise ValueError(
                f"combine='concat' splits the {out_features} outputs evenly over {num_experts} "
                f"experts: out_features must be divisible by num_experts"
            )
        top_l = check_top_l(top_l)  # n is unknown until forward, which checks top_l <= n
        self.num_experts, self.top_l = num_experts, top_l
        self.combine, self.gate, self.activation = combine, gate, activation
        self.backend, self.deterministic = backend, deterministic
        self.expert_features = out_features // num_experts if combine == "concat" else out_features
        fk = {"device": device, "dtype": dtype}
        self.router = nn.Parameter(torch.empty(num_experts, d, **fk))
        self.weight = nn.Parameter(torch.empty(num_experts, self.expert_features, *weight_tail, **fk))
        self.bias = nn.Parameter(torch.empty(num_experts, self.expert_features, **fk)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Router ~ N(0, ROUTER_INIT_STD^2); experts like nn.Conv2d's default (uniform with
        bound 1/sqrt(fan_in), fan_in = C*p*p)."""
        nn.init.normal_(self.router, std=ROUTER_INIT_STD)
        bound = 1.0 / math.sqrt(self.router.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _apply(self, fn, recurse=True):
        # Module.to(memory_format=torch.channels_last) converts every 4-D and 5-D tensor, and a
        # 5-D tensor cannot be channels-last, so it would raise on the (k, m, C, p, p) weight.
        # Convert that weight as the (k*m, C, p, p) conv weight it is, then view it back: the
        # layer reads any weight strides.
        def convert(t):
            try:
                return fn(t)
            except RuntimeError:
                if t.dim() != 5:
                    raise
                return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2])

        return super()._apply(convert, recurse)

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first: say plainly that TorchScript cannot compile the layer."""
        raise RuntimeError(
            f"{type(self).__name__} does not support TorchScript (torch.jit.script): its forward passes "
            f"options as keyword arguments to a custom op, which TorchScript cannot compile. Use "
            f"torch.compile, or torch.export for a graph to deploy (docs/ROBUSTNESS.md, 'Limits')."
        )

    def _opts(self) -> dict:
        return dict(top_l=self.top_l, combine=self.combine, gate=self.gate, activation=self.activation,
                    backend=self.backend, deterministic=self.deterministic)


class PMoEConv2d(_PMoEBase):
    """Patch-level routed MoE over non-overlapping p x p patches of a feature map (SPEC §1).

    Each of k experts picks its top-l patches per image by router score, gates them and runs a
    p x p conv (a GEMM on the patch vector) on those patches only.

    Shapes: x (B, C, H, W) -> y (B, out_channels, H/p, W/p).
    Parameters: router (k, C*p*p) in unfold order; weight (k, m_s, C, p, p) with
    m_s = out_channels // k ("concat") or out_channels ("sum"); bias (k, m_s) or None.
    """

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, num_experts: int,
                 top_l: Union[int, float], combine: str = "concat", gate: str = "softmax",
                 bias: bool = False, activation: str = "relu", backend: str = "auto",
                 deterministic: bool = False, device=None, dtype=None):
        for name, v in (("in_channels", in_channels), ("patch_size", patch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_channels, self.out_channels, self.patch_size = in_channels, out_channels, patch_size
        super().__init__(in_channels * patch_size * patch_size, (in_channels, patch_size, patch_size),
                         out_channels, num_experts, top_l, combine, gate, bias, activation, backend,
                         deterministic, device, dtype)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        return PF.pmoe_conv2d(x, self.router, self.weight, self.bias, patch_size=self.patch_size,
                              return_routing=return_routing, **self._opts())

    def forward_pooled(self, x: torch.Tensor, return_routing: bool = False):
        """``self(x).sum((2, 3))`` without making the output map: x (B, C, H, W) -> (B, out_channels)
        [, Routing].  For heads that sum- or average-pool the layer's output over all positions
        (the paper's classifier); see pmoe.functional.pmoe_conv2d_pooled.  A plain method, so the
        module's forward hooks do not run for it."""
        return PF.pmoe_conv2d(x, self.router, self.weight, self.bias, patch_size=self.patch_size,
                              return_routing=return_routing, pooled=True, **self._opts())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, patch_size={self.patch_size}, "
                f"num_experts={self.num_experts}, top_l={self.top_l}, combine={self.combine!r}, "
                f"gate={self.gate!r}, bias={self.bias is not None}, activation={self.activation!r}, "
                f"backend={self.backend!r}")


class PMoE(_PMoEBase):
    """The same layer on a patch/token tensor: x (B, n, in_features) -> y (B, n, out_features).

    A patch can be a token, a sentence piece or an n-gram window.  Parameters: router (k, d),
    weight (k, m_s, d), bias (k, m_s) or None.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int, top_l: Union[int, float],
                 combine: str = "concat", gate: str = "softmax", bias: bool = False,
                 activation: str = "relu", backend: str = "auto", deterministic: bool = False,
                 device=None, dtype=None):
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features, self.out_features = in_features, out_features
        super().__init__(in_features, (in_features,), out_features, num_experts, top_l, combine, gate,
                         bias, activation, backend, deterministic, device, dtype)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        return PF.pmoe(x, self.router, self.weight, self.bias, return_routing=return_routing, **self._opts())

    def forward_pooled(self, x: torch.Tensor, return_routing: bool = False):
        """``self(x).sum(1)`` without the (B, n, out) output: x (B, n, in) -> (B, out_features)
        [, Routing]; see pmoe.functional.pmoe_pooled.  Forward hooks do not run for it."""
        return PF.pmoe(x, self.router, self.weight, self.bias, return_routing=return_routing, pooled=True,
                       **self._opts())

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, num_experts={self.num_experts}, "
                f"top_l={self.top_l}, combine={self.combine!r}, gate={self.gate!r}, "
                f"bias={self.bias is not None}, activation={self.activation!r}, backend={self.backend!r}")

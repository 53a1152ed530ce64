"""What pMoE is timed and counted against, each built from a LayerShape.

    dense    nn.Conv2d(C, out, kernel=stride=p) + ReLU: one expert with all the neurons, every patch
    masking  the authors' approach: route, scale each patch by its gate (0 when unselected), then
             run the dense conv over every patch anyway, one group per expert, concatenated
    torch    pmoe.PMoEConv2d(backend="torch"): the vectorised PyTorch path
    triton   pmoe.PMoEConv2d(backend="triton"): the fused kernels (CUDA, or TRITON_INTERPRET=1 on CPU)
    compiled torch.compile(PMoEConv2d(backend="torch"), fullgraph=True, dynamic=False): the PyTorch
             path through inductor, an option a user takes (the CPU suite only: CPU_KINDS;
             compiled on first call; torch >= 2.13 keys inductor's cache on the thread count)
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import pmoe
from pmoe.activations import get_activation
from pmoe.routing import gates_from_scores, resolve_top_l, select_top_l
from pmoe.torch_backend import patches_from_map, routing_scores

try:  # runnable as `python bench/x.py` and as the `bench` package under pytest
    from shapes import LayerShape
except ImportError:  # pragma: no cover
    from bench.shapes import LayerShape

KINDS = ("dense", "masking", "torch", "triton")
CPU_KINDS = KINDS + ("compiled",)  # the GPU scripts keep to KINDS (their compile budget)


class MaskingPMoEConv2d(nn.Module):
    """The authors' masking implementation of a pMoE layer (their TensorFlow code, vectorised).

    Same parameters and same output as PMoEConv2d for combine="concat"/"sum" without bias, but the
    expert convs run over all n patches of a gate-scaled copy of the input, one copy per expert:
    the FLOPs of the dense layer plus routing, and k copies of the input kept for backward.
    Scaling the input patch by the gate (as their code does) equals SPEC's G * act(W x) for
    ReLU without bias; with a bias the bias is added after the scaling, as in their code.
    """

    def __init__(self, layer: pmoe.PMoEConv2d):
        super().__init__()
        self.patch_size, self.top_l = layer.patch_size, layer.top_l
        self.combine, self.gate, self.activation = layer.combine, layer.gate, layer.activation
        # the same Parameter objects: a network converted with to_masking trains the same weights
        self.router, self.weight, self.bias = layer.router, layer.weight, layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        hp, wp = H // p, W // p
        n = hp * wp
        k, m = self.weight.shape[:2]
        l = resolve_top_l(self.top_l, n)
        scores = routing_scores(patches_from_map(x, p), self.router)  # (B, k, n)
        idx = select_top_l(scores.detach(), l)
        gates = gates_from_scores(scores, torch.gather(scores, 2, idx), self.gate)
        mask = scores.new_zeros(B, k, n).scatter(2, idx, gates)  # gate on chosen patches, 0 elsewhere
        mask = mask.view(B, k, 1, hp, 1, wp, 1).expand(B, k, 1, hp, p, wp, p).reshape(B, k, 1, H, W)
        act = get_activation(self.activation)
        # one dense conv per expert over all n patches of its gate-scaled copy of x, as in the
        # authors' code (a loop over experts; a grouped conv would be one launch, but torch's
        # FlopCounterMode counts a grouped conv's input gradient `groups` times over)
        ys = [act(F.conv2d(x * mask[:, s].to(x.dtype), self.weight[s],
                           None if self.bias is None else self.bias[s], stride=p)) for s in range(k)]
        y = torch.cat(ys, 1)
        return y if self.combine == "concat" else y.view(B, k, m, hp, wp).sum(1)


def to_masking(model: nn.Module) -> nn.Module:
    """Replace every PMoEConv2d in `model` (in place) by the masking implementation sharing its
    parameters; returns the model.  A model whose forward asks for return_routing is not supported."""
    for name, child in list(model.named_children()):
        if isinstance(child, pmoe.PMoEConv2d):
            setattr(model, name, MaskingPMoEConv2d(child))
        else:
            to_masking(child)
    return model


def triton_usable(device: torch.device) -> bool:
    """Whether backend="triton" can run here: CUDA with importable kernels, or the interpreter
    (TRITON_INTERPRET=1 set before triton was imported) on CPU."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    if device.type not in ("cpu", "cuda") or not pmoe.triton_available():
        return False
    try:
        importlib.import_module("pmoe.kernels")
    except Exception:
        return False
    return True


def available_kinds(device: torch.device) -> tuple[str, ...]:
    kinds = CPU_KINDS if device.type == "cpu" else KINDS
    return tuple(k for k in kinds if k != "triton" or triton_usable(device))


def make_pmoe(shape: LayerShape, backend: str) -> pmoe.PMoEConv2d:
    return pmoe.PMoEConv2d(shape.in_channels, shape.out_channels, shape.patch_size, shape.num_experts,
                           shape.top_l, combine=shape.combine, gate="softmax", bias=False, activation="relu",
                           backend=backend)


def make_dense(shape: LayerShape) -> nn.Module:
    """The single-expert twin: every patch, all out_channels neurons, ReLU."""
    return nn.Sequential(nn.Conv2d(shape.in_channels, shape.out_channels, shape.patch_size,
                                   stride=shape.patch_size, bias=False), nn.ReLU())


def make_layer(shape: LayerShape, kind: str, device="cpu", dtype: torch.dtype = torch.float32,
               like: Optional[pmoe.PMoEConv2d] = None) -> nn.Module:
    """The layer of `kind` for `shape` on device/dtype.  `like`: copy its pMoE parameters (for
    comparing kinds on identical weights)."""
    if kind == "dense":
        layer = make_dense(shape)
    elif kind in ("torch", "triton", "masking", "compiled"):
        base = make_pmoe(shape, kind if kind in ("torch", "triton") else "torch")
        if like is not None:
            base.load_state_dict(like.state_dict())
        layer = MaskingPMoEConv2d(base) if kind == "masking" else base
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {CPU_KINDS}")
    layer = layer.to(device=device, dtype=dtype)
    # fullgraph: a graph break raises instead of timing eager code under the compiled name;
    # dynamic=False: each shape its own static graph, as a user compiling one model gets
    return torch.compile(layer, fullgraph=True, dynamic=False) if kind == "compiled" else layer


def randomize_router(layer: nn.Module, std: float = 1.0) -> None:
    """The default router init (std 1e-3) makes all scores near-equal; benchmarks and checks want
    a trained-like router whose choices are well separated."""
    router = getattr(layer, "router", None)
    if router is not None:
        with torch.no_grad():
            router.normal_(0.0, std / router.shape[1] ** 0.5)

"""Helpers shared by the test files: the error measure, parameters, and gradients through a
random projection."""
from __future__ import annotations

import math
from typing import Optional

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def params(C: int, p: int, k: int, m: int, bias: bool, dtype=torch.float32, seed: int = 0, flat: bool = False):
    """Leaf router (k, C*p*p) ~ N(0, 1) (well-separated choices), weight (k, m, C, p, p) (flat:
    (k, m, C*p*p)) ~ N(0, 1/d), bias (k, m) ~ N(0, 0.01) or None."""
    g = torch.Generator().manual_seed(seed)
    d = C * p * p
    router = torch.randn(k, d, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(k, m, C, p, p, generator=g) / math.sqrt(d)
    weight = (weight.reshape(k, m, d) if flat else weight).to(dtype).requires_grad_()
    b = (torch.randn(k, m, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    return router, weight, b


def grads(y: torch.Tensor, inputs, seed: int = 1, draw: Optional[torch.dtype] = None):
    """The gradients of <y, g> for a seeded random g (drawn in `draw`, default float32, then cast
    to y's dtype) with respect to the inputs that are not None."""
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=draw or torch.float32)
    return torch.autograd.grad((y * g.to(y.dtype)).sum(), [t for t in inputs if t is not None], allow_unused=True)


def check_deterministic(run, params) -> None:
    """run(det) -> the layer's output.  Two deterministic runs give bit-identical outputs and
    gradients (w.r.t. params); a non-deterministic run agrees with them to float rounding."""
    runs = []
    for _ in range(2):
        y = run(True)
        runs.append([y] + list(grads(y, params)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    y_nd = run(False)
    assert rel_err(y_nd, runs[0][0]) < 1e-6
    for a, c in zip(grads(y_nd, params), runs[0][1:]):
        assert rel_err(a, c) < 1e-5

"""The fused route (routing._route_kernel: scores, top-l and gates of an image in one program)
against the split route (_scores_kernel + _select_kernel), in Triton's interpreter.

Both do the same arithmetic (the same d-loop of tl.dot, the same keys, sort and gate formulas),
so the chosen patches, the gates, the outputs and every gradient must be the same bits, with
exact ties, NaN and infinite scores included; and both must match the float64 reference
(tests/test_kernels.py runs the fused route through the default rule, this file both).
"""
import math

import pytest
import torch

pytest.importorskip("triton")

import pmoe  # noqa: E402
from pmoe.kernels import op as kop  # noqa: E402
from pmoe.kernels import routing as kroute  # noqa: E402
from pmoe.reference import reference_conv2d  # noqa: E402


def _inputs(B, C, H, W, p, k, m, special, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = C * p * p
    if special:  # integer data and router: exact score ties; a NaN patch and an inf patch
        x = torch.randint(-2, 3, (B, C, H, W), generator=g).float()
        x[0, :, :p, :p] = float("nan")
        x[-1, 0, -p:, -p:] = float("inf")
        router = torch.randint(-1, 2, (k, d), generator=g).float()
    else:
        x = torch.randn(B, C, H, W, generator=g)
        router = torch.randn(k, d, generator=g)
    weight = torch.randn(k, m, d, generator=g) / math.sqrt(d)
    bias = torch.randn(k, m, generator=g) * 0.1
    return x, router, weight, bias


def _run(route, monkeypatch, x, router, weight, bias, p, l, combine, gate, det, pooled):
    monkeypatch.setattr(kop, "ROUTE", route)
    launched = []
    real = kop._route_kernel

    class Spy:  # records whether the fused kernel ran
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(kop, "_route_kernel", Spy())
    leaves = [t.clone().requires_grad_() for t in (x, router, weight, bias)]
    fn = kop.pooled_fwd if pooled else kop.fused_fwd
    y, idx, gates, scores, lse = fn(*leaves, p, l, combine, gate, "gelu", det)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((y * dy).nan_to_num().sum(), leaves, allow_unused=True)
    return (y, idx, gates, scores, lse if gate == "softmax_all" else None, grads), bool(launched)


def _same_bits(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.shape == b.shape and a.dtype == b.dtype, what
    assert torch.equal(a.isnan(), b.isnan()), what
    assert torch.equal(a.nan_to_num(), b.nan_to_num()), what


CASES = [
    # B, C, H, W, p, k, m, l, special
    (3, 2, 8, 8, 2, 4, 3, 5, False),   # n = 16, k = 4: the WRN/flagship layout in small
    (2, 3, 6, 9, 3, 3, 2, 1, True),    # n = 6 (padded to 16 lanes), l = 1, ties, NaN, inf
    (2, 1, 4, 4, 1, 5, 2, 16, True),   # l = n
    (2, 2, 10, 10, 2, 20, 2, 7, False),  # k = 20: a 32-expert block, n = 25
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}H{}W{}p{}k{}m{}l{}{}".format(*c[:8], "-special" * c[8]))
@pytest.mark.parametrize("combine,gate,det,pooled", [
    ("concat", "softmax", False, False), ("sum", "softmax_all", False, False), ("concat", "indicator", True, False),
    ("sum", "softmax", True, False), ("concat", "softmax_all", False, True), ("sum", "indicator", False, True)])
def test_fused_route_same_bits_as_split(monkeypatch, case, combine, gate, det, pooled):
    B, C, H, W, p, k, m, l, special = case
    x, router, weight, bias = _inputs(B, C, H, W, p, k, m, special)
    args = (x, router, weight, bias, p, l, combine, gate, det, pooled)
    split, ran = _run("split", monkeypatch, *args)
    assert not ran
    fused, ran = _run("fused", monkeypatch, *args)
    assert ran
    for name, a, b in zip(["y", "idx", "gates", "scores", "lse"], fused[:5], split[:5]):
        _same_bits(a, b, name)
    for name, a, b in zip(["x", "router", "weight", "bias"], fused[5], split[5]):
        _same_bits(a, b, "d" + name)
    n = (H // p) * (W // p)
    assert fused[3].shape == (B, k, n if gate == "softmax_all" else 0)  # scores kept only when needed


@pytest.mark.parametrize("gate", ["softmax", "softmax_all"])
def test_fused_route_matches_reference(monkeypatch, gate):
    """fp32 fused route vs the float64 reference: outputs, choice, gates, gradients (< 1e-4)."""
    monkeypatch.setattr(kop, "ROUTE", "fused")
    x, router, weight, bias = _inputs(2, 3, 8, 8, 2, 4, 3, False, seed=3)
    w5 = weight.view(4, 3, 3, 2, 2)
    leaves = [t.clone().requires_grad_() for t in (x, router, w5, bias)]
    y, routing = pmoe.pmoe_conv2d(*leaves, patch_size=2, top_l=6, gate=gate, backend="triton", return_routing=True)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y_ref, idx_ref, g_ref = reference_conv2d(*ref, 2, 6, "concat", gate, "relu")
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert torch.equal(routing.indices, idx_ref)
    assert rel(routing.gates, g_ref) < 1e-4 and rel(y, y_ref) < 1e-4
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    for a, b in zip(torch.autograd.grad((y * dy).sum(), leaves), torch.autograd.grad((y_ref * dy.double()).sum(), ref)):
        assert rel(a, b) < 1e-4


def test_route_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert kop.ROUTE == "auto"
    assert kop.route_fused(1, 64, 4, cpu)        # 64 lanes x 16 experts = the cap
    assert kop.route_fused(1, 16, 64, cpu)
    assert not kop.route_fused(1, 65, 4, cpu)    # 128 x 16 lanes: over the cap
    assert not kop.route_fused(1, 16, 65, cpu)   # experts in two blocks
    assert kop.route_warps(512) == 4 and kop.route_warps(kroute.ROUTE_MAX_KEYS) == 8
    monkeypatch.setattr(kop, "ROUTE", "split")
    assert not kop.route_fused(1, 16, 4, cpu)
    monkeypatch.setattr(kop, "ROUTE", "fused")
    with pytest.raises(ValueError, match="n=256, k=8"):
        kop.route_fused(1, 256, 8, cpu)
    monkeypatch.setattr(kop, "ROUTE", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        kop.route_fused(1, 16, 4, cpu)

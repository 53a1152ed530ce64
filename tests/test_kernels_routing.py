"""The two routes of the forward, in Triton's interpreter: the fused launch (route programs and
expert tiles in one ticket-ordered launch, forward.py) against the split route (_scores_kernel +
_select_kernel, then an experts-only launch).

Both score with the same d-loop (routing.score_tile, the same BLOCK_D), the same keys, sort and
gate formulas, so the chosen patches, the gates, the outputs and every gradient must be the same
bits, with exact ties, NaN and infinite scores included; and both must match the float64
reference (tests/test_forward_backward.py runs the default rule, this file both).
"""
import math

import pytest
import torch

pytest.importorskip("triton")

import pmoe  # noqa: E402
from pmoe.kernels import configs  # noqa: E402
from pmoe.kernels import launch  # noqa: E402
from pmoe.kernels import op as kop  # noqa: E402
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
    monkeypatch.setattr(launch, "ROUTE", route)
    launched = []
    real_run = launch.run
    monkeypatch.setattr(launch, "run", lambda kernel, grid, *a, **kw: launched.append(kw.get("MODE"))
                        or real_run(kernel, grid, *a, **kw))
    leaves = [t.clone().requires_grad_() for t in (x, router, weight, bias)]
    y, idx, gates, _, inv, scores, lse, _ = kop.fused_fwd(*leaves, p, l, combine, gate, "gelu", det, pooled, True)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((y * dy).nan_to_num().sum(), leaves, allow_unused=True)
    return (y, idx, gates, inv, scores, lse if gate == "softmax_all" else None, grads), launched


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
    (5, 2, 10, 10, 2, 20, 2, 7, False),  # k = 20: a 32-expert block, n = 25; two image groups
]


MODES = [  # combine, gate, deterministic, pooled
    ("concat", "softmax", False, False), ("sum", "softmax_all", False, False), ("concat", "indicator", True, False),
    ("sum", "softmax", True, False), ("concat", "softmax_all", False, True), ("sum", "indicator", False, True)]
# the k = 20 case is the slow one under the interpreter: three modes (each gate, both combines,
# deterministic and pooled once) cover what it adds, the many-expert block and the image groups
PARAMS = [(c, *m) for c in CASES for i, m in enumerate(MODES) if c[5] < 20 or i in (1, 3, 4)]


@pytest.mark.parametrize("case,combine,gate,det,pooled", PARAMS,
                         ids=["B{}C{}H{}W{}p{}k{}m{}l{}{}-".format(*c[:8], "-special" * c[8]) + "-".join(map(str, m))
                              for c, *m in PARAMS])
def test_fused_launch_same_bits_as_split_route(monkeypatch, case, combine, gate, det, pooled):
    B, C, H, W, p, k, m, l, special = case
    x, router, weight, bias = _inputs(B, C, H, W, p, k, m, special)
    args = (x, router, weight, bias, p, l, combine, gate, det, pooled)
    split, modes = _run("split", monkeypatch, *args)
    assert launch.FWD_FUSED not in modes and launch.FWD_EXPERTS in modes
    fused, modes = _run("fused", monkeypatch, *args)
    assert launch.FWD_FUSED in modes and launch.FWD_EXPERTS not in modes
    for name, a, b in zip(["y", "idx", "gates", "inv", "scores", "lse"], fused[:6], split[:6]):
        _same_bits(a, b, name)
    for name, a, b in zip(["x", "router", "weight", "bias"], fused[6], split[6]):
        _same_bits(a, b, "d" + name)
    n = (H // p) * (W // p)
    assert fused[4].shape == (B, k, n if gate == "softmax_all" else 0)  # scores kept only when needed


@pytest.mark.parametrize("gate", ["softmax", "softmax_all"])
def test_fused_launch_matches_reference(monkeypatch, gate):
    """fp32 fused launch vs the float64 reference: outputs, choice, gates, gradients (< 1e-4)."""
    monkeypatch.setattr(launch, "ROUTE", "fused")
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
    P = launch.Problem(1, 1, 8, 8, 1, 4, 2, 2)  # n = 64, k = 4
    assert launch.ROUTE == "auto"
    assert configs.route_fits(64, 4) and configs.route_fits(256, 16)       # 256 x 16 lanes = the cap
    assert not configs.route_fits(257, 4) and not configs.route_fits(16, 65)
    assert launch.use_fused_route(P)
    monkeypatch.setattr(launch, "ROUTE", "split")
    assert not launch.use_fused_route(P)
    monkeypatch.setattr(launch, "ROUTE", "fused")
    with pytest.raises(ValueError, match="n=1024, k=8"):
        launch.use_fused_route(launch.Problem(1, 1, 32, 32, 1, 8, 2, 2))
    monkeypatch.setattr(launch, "ROUTE", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        launch.use_fused_route(P)

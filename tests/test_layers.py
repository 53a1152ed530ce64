"""pmoe/layers.py with the torch backend against the naive reference (SPEC §1, §5), in float64.

Tolerance: relative error (max |a - b| / max |b|) < 1e-9 for outputs and every gradient.
"""
import itertools
import math

import pytest
import torch

import pmoe
from helpers import grads, rel_err
from pmoe.reference import reference_conv2d, reference_patches

F64 = torch.float64
TOL = 1e-9


def _layer(C, out, p, k, l, combine, gate, bias, activation="relu"):
    layer = pmoe.PMoEConv2d(C, out, p, k, l, combine=combine, gate=gate, bias=bias,
                            activation=activation, backend="torch", dtype=F64)
    # well-separated scores, so the choice is not decided by rounding
    torch.nn.init.normal_(layer.router)
    return layer


CASES = [
    # B, C, H, W, p, k, out, l
    (2, 3, 8, 8, 2, 4, 8, 5),
    (1, 2, 6, 9, 3, 3, 6, 1),     # n = 6 (not a power of two), l = 1
    (3, 1, 4, 4, 1, 2, 4, 16),    # p = 1, l = n
    (2, 5, 10, 4, 2, 1, 3, 4),    # one expert, d = 20
    (6, 2, 8, 8, 2, 2, 4, 3),     # B*n large enough for the (p, p, C) feature order
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("combine,gate,bias", list(itertools.product(
    ["concat", "sum"], ["softmax", "indicator", "softmax_all"], [False, True])))
def test_torch_matches_reference(case, combine, gate, bias):
    B, C, H, W, p, k, out, l = case
    if combine == "concat" and out % k:
        out = k * 2
    layer = _layer(C, out, p, k, l, combine, gate, bias)
    x = torch.randn(B, C, H, W, dtype=F64, requires_grad=True)
    y, routing = layer(x, return_routing=True)
    y_ref, idx_ref, g_ref = reference_conv2d(x, layer.router, layer.weight, layer.bias, p, l, combine, gate)
    assert y.shape == (B, out, H // p, W // p)
    assert torch.equal(routing.indices, idx_ref)
    assert routing.indices.dtype == torch.int64
    assert rel_err(routing.gates, g_ref) < TOL
    assert rel_err(y, y_ref) < TOL

    params = [x, layer.router, layer.weight] + ([layer.bias] if bias else [])
    got, want = grads(y, params, draw=F64), grads(y_ref, params, draw=F64)
    names = ["x", "router", "weight", "bias"]
    for name, a, b in zip(names, got, want):
        if gate == "indicator" and name == "router":
            assert a is None or a.abs().max() == 0  # the choice has no gradient, the gate is 1
            continue
        assert rel_err(a, b) < TOL, name


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "identity"])
def test_activations_match_reference(activation):
    layer = _layer(2, 6, 2, 3, 3, "concat", "softmax", True, activation)
    x = torch.randn(2, 2, 6, 6, dtype=F64, requires_grad=True)
    y = layer(x)
    y_ref, _, _ = reference_conv2d(x, layer.router, layer.weight, layer.bias, 2, 3, "concat", "softmax", activation)
    assert rel_err(y, y_ref) < TOL
    params = [x, layer.router, layer.weight, layer.bias]
    for a, b in zip(grads(y, params, draw=F64), grads(y_ref, params, draw=F64)):
        assert rel_err(a, b) < TOL


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_token_form_matches_reference(combine):
    B, n, d, k, out, l = 3, 7, 5, 3, 6, 4
    layer = pmoe.PMoE(d, out, k, l, combine=combine, bias=True, backend="torch", dtype=F64)
    torch.nn.init.normal_(layer.router)
    x = torch.randn(B, n, d, dtype=F64, requires_grad=True)
    y, routing = layer(x, return_routing=True)
    y_ref, idx_ref, _ = reference_patches(x, layer.router, layer.weight, layer.bias, l, combine)
    assert y.shape == (B, n, out)
    assert torch.equal(routing.indices, idx_ref)
    assert rel_err(y, y_ref) < TOL
    params = [x, layer.router, layer.weight, layer.bias]
    for a, b in zip(grads(y, params, draw=F64), grads(y_ref, params, draw=F64)):
        assert rel_err(a, b) < TOL


def test_conv_form_equals_token_form_on_unfolded_patches():
    conv = _layer(3, 8, 2, 4, 3, "concat", "softmax", True)
    tok = pmoe.PMoE(12, 8, 4, 3, bias=True, backend="torch", dtype=F64)
    with torch.no_grad():
        tok.router.copy_(conv.router)
        tok.weight.copy_(conv.weight.reshape(4, 2, 12))
        tok.bias.copy_(conv.bias)
    x = torch.randn(2, 3, 6, 4, dtype=F64)
    xp = torch.nn.functional.unfold(x, 2, stride=2).transpose(1, 2)
    y_conv = conv(x)
    y_tok = tok(xp)
    assert torch.allclose(y_conv.flatten(2).transpose(1, 2), y_tok, rtol=0, atol=1e-14)


def test_exact_ties_go_to_lower_index():
    # A zero router ties every score at exactly 0: each expert takes patches 0..l-1.
    layer = _layer(2, 4, 2, 2, 3, "concat", "softmax", False)
    with torch.no_grad():
        layer.router.zero_()
    x = torch.randn(3, 2, 8, 8, dtype=F64)
    _, routing = layer(x, return_routing=True)
    assert torch.equal(routing.indices, torch.arange(3).expand(3, 2, 3))
    assert torch.allclose(routing.gates, torch.full((3, 2, 3), 1 / 3, dtype=F64))


def test_exact_ties_between_duplicated_patches():
    # Patches 5 and 2 are identical and best: both tie, so the order is 2 then 5, and a
    # top-1 expert takes 2.  Integer data makes every score exact.
    torch.manual_seed(3)
    B, n, d = 2, 8, 4
    x = torch.randint(-3, 4, (B, n, d)).to(F64)
    router = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=F64)
    x[:, 2] = 10.0
    x[:, 5] = 10.0
    x[:, 7] = torch.tensor([10.0, 10.0, 10.0, 9.0])  # just below
    w = torch.randn(1, 3, d, dtype=F64)
    for l, want in ((1, [2]), (2, [2, 5]), (3, [2, 5, 7])):
        _, r = pmoe.functional.pmoe(x, router, w, top_l=l, backend="torch", return_routing=True)
        assert r.indices[:, 0].tolist() == [want] * B
        _, ref_idx, _ = reference_patches(x, router, w, None, l)
        assert torch.equal(r.indices, ref_idx)


def test_negative_zero_ties_positive_zero():
    x = torch.zeros(1, 4, 1, dtype=F64)
    x[0, 1, 0] = -0.0
    x[0, 3, 0] = 1.0
    router = torch.ones(1, 1, dtype=F64)
    w = torch.ones(1, 1, 1, dtype=F64)
    _, r = pmoe.functional.pmoe(x, router, w, top_l=3, backend="torch", return_routing=True)
    assert r.indices[0, 0].tolist() == [3, 0, 1]


def test_unselected_patches_are_exactly_zero_in_concat():
    layer = _layer(1, 6, 2, 3, 2, "concat", "softmax", True)
    x = torch.randn(4, 1, 8, 8, dtype=F64)
    y, routing = layer(x, return_routing=True)
    y = y.flatten(2)  # (B, out, n)
    m = 2
    for b in range(4):
        for s in range(3):
            chosen = set(routing.indices[b, s].tolist())
            for j in range(16):
                block = y[b, s * m:(s + 1) * m, j]
                if j not in chosen:
                    assert torch.equal(block, torch.zeros_like(block))


def test_sum_combines_overlapping_experts():
    # Identical routers: every expert takes the same patches, so the sum is their total.
    layer = _layer(2, 3, 1, 3, 2, "sum", "indicator", False)
    with torch.no_grad():
        layer.router.copy_(layer.router[0].expand(3, -1))
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    y, routing = layer(x, return_routing=True)
    assert (routing.indices == routing.indices[:, :1]).all()
    xp = x.flatten(2).transpose(1, 2)  # (B, n, d) with p = 1
    want = torch.zeros(2, 9, 3, dtype=F64)
    for b in range(2):
        for j in routing.indices[b, 0].tolist():
            want[b, j] = sum(torch.relu(layer.weight[s].reshape(3, 2) @ xp[b, j]) for s in range(3))
    assert rel_err(y.flatten(2).transpose(1, 2), want) < TOL


@pytest.mark.parametrize("combine,gate", [("concat", "softmax"), ("sum", "softmax_all"), ("concat", "indicator")])
def test_gradcheck(combine, gate):
    layer = _layer(2, 4, 2, 2, 2, combine, gate, True, activation="gelu")
    x = torch.randn(2, 2, 4, 6, dtype=F64, requires_grad=True)

    def f(x, router, weight, bias):
        return pmoe.pmoe_conv2d(x, router, weight, bias, patch_size=2, top_l=2, combine=combine,
                                gate=gate, activation="gelu", backend="torch")

    assert torch.autograd.gradcheck(f, (x, layer.router, layer.weight, layer.bias))


def test_top_l_fraction_and_parameter_shapes():
    layer = pmoe.PMoEConv2d(3, 8, 2, 4, 0.25, bias=True, backend="torch")
    assert layer.router.shape == (4, 12)
    assert layer.weight.shape == (4, 2, 3, 2, 2)
    assert layer.bias.shape == (4, 2)
    _, r = layer(torch.randn(2, 3, 8, 8), return_routing=True)  # n = 16 -> l = 4
    assert r.indices.shape == (2, 4, 4)
    s = pmoe.PMoEConv2d(3, 8, 2, 4, 1.0, combine="sum", backend="torch")
    assert s.weight.shape == (4, 8, 3, 2, 2) and s.bias is None
    _, r = s(torch.randn(1, 3, 4, 6), return_routing=True)  # n = 6, fraction 1.0 -> l = n
    assert r.indices.shape == (1, 4, 6)
    assert pmoe.routing.resolve_top_l(0.1, 16) == 2  # 1.6 rounds to 2
    assert pmoe.routing.resolve_top_l(0.01, 16) == 1  # at least one


def test_init_router_tiny_experts_like_conv():
    layer = pmoe.PMoEConv2d(16, 64, 2, 4, 3, bias=True)
    assert layer.router.abs().max() < 0.01
    bound = 1 / math.sqrt(16 * 4)
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert layer.bias.abs().max() <= bound
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)


def test_router_in_unfold_order():
    # A router that is one-hot on input position (c=1, u=0, v=1) scores patch j by exactly that pixel.
    C, p = 2, 2
    layer = pmoe.PMoEConv2d(C, 2, p, 1, 1, backend="torch", dtype=F64)
    with torch.no_grad():
        layer.router.zero_()
        layer.router.view(1, C, p, p)[0, 1, 0, 1] = 1.0
    x = torch.zeros(1, C, 4, 4, dtype=F64)
    x[0, 1, 2, 3] = 5.0  # patch (row 1, col 1) = 3, local (u=0, v=1)
    _, r = layer(x, return_routing=True)
    assert r.indices.item() == 3


@pytest.mark.parametrize("B", [1, 8])
def test_hwc_feature_order_at_every_batch_matches_reference(monkeypatch, B):
    """The torch path orders patch features (p, p, C) (a cheaper copy; router and weight are
    permuted to match inside the path) at every batch size, since nothing in it may depend on
    the batch (torch.export with a dynamic batch); the results are the reference's."""
    import pmoe.functional as PF

    used = []
    real = PF.patches_from_map_hwc
    monkeypatch.setattr(PF, "patches_from_map_hwc", lambda x, p: used.append(1) or real(x, p))
    layer = _layer(3, 8, 2, 4, 3, "concat", "softmax", True)
    x = torch.randn(B, 3, 6, 6, dtype=F64, requires_grad=True)
    y, routing = layer(x, return_routing=True)
    y_ref, idx_ref, _ = reference_conv2d(x, layer.router, layer.weight, layer.bias, 2, 3, "concat", "softmax")
    assert used
    assert torch.equal(routing.indices, idx_ref)
    assert rel_err(y, y_ref) < TOL
    params = [x, layer.router, layer.weight, layer.bias]
    for got, ref in zip(grads(y, params, draw=F64), grads(y_ref, params, draw=F64)):
        assert rel_err(got, ref) < TOL

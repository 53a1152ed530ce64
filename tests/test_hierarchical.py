"""HierarchicalPMoE (SPEC §6) against the float64 loop reference: outputs, routing and the gradient
of the input and of every parameter; the pooled form; bad input; counted FLOPs.

Tolerance: relative error (max |a - b| / max |b|) < 1e-9, as for the flat layer.
"""
import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pmoe
from pmoe.hierarchical import hierarchical_pmoe, hierarchical_pmoe_pooled
from helpers import grads, rel_err
from pmoe.reference import reference_hierarchical

F64 = torch.float64
TOL = 1e-9
PARAMS = ("group_router", "router", "weight", "bias")


def _layer(d, out, k1, l1, k2, l2, combine="concat", bias=True, activation="relu", dtype=F64, backend="torch"):
    layer = pmoe.HierarchicalPMoE(d, out, k1, l1, k2, l2, combine=combine, bias=bias, activation=activation,
                                  backend=backend, dtype=dtype)
    # well-separated scores at both levels, so no choice is decided by rounding
    torch.nn.init.normal_(layer.group_router)
    torch.nn.init.normal_(layer.router)
    return layer


def _inputs(layer, x):
    return [x] + [getattr(layer, n) for n in PARAMS if getattr(layer, n) is not None]


CASES = [
    # B, G, S, d, k1, l1, k2, l2, m (per sub-expert)
    (2, 4, 5, 6, 2, 2, 2, 3, 2),
    (3, 3, 4, 5, 3, 1, 1, 2, 3),   # each top-level expert takes one group, one sub-expert each
    (1, 5, 3, 4, 2, 5, 3, 1, 2),   # l1 = G, l2 = 1
    (2, 2, 6, 3, 1, 1, 2, 6, 1),   # one top-level expert, l2 = S
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("combine,bias", list(itertools.product(["concat", "sum"], [False, True])))
def test_matches_reference(case, combine, bias):
    B, G, S, d, k1, l1, k2, l2, m = case
    out = k1 * k2 * m if combine == "concat" else m
    layer = _layer(d, out, k1, l1, k2, l2, combine, bias)
    x = torch.randn(B, G, S, d, dtype=F64, requires_grad=True)
    y, routing = layer(x, return_routing=True)
    y_ref, gidx, g1, sidx, g2 = reference_hierarchical(x, layer.group_router, layer.router, layer.weight, layer.bias,
                                                       l1, l2, combine)
    assert y.shape == (B, G, S, out)
    assert torch.equal(routing.group_indices, gidx) and torch.equal(routing.indices, sidx)
    assert rel_err(routing.group_gates, g1) < TOL and rel_err(routing.gates, g2) < TOL
    assert rel_err(y, y_ref) < TOL
    names = ["x"] + [n for n in PARAMS if getattr(layer, n) is not None]
    inputs = _inputs(layer, x)
    for name, a, b in zip(names, grads(y, inputs, draw=F64), grads(y_ref, inputs, draw=F64)):
        assert a is not None and rel_err(a, b) < TOL, name


@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_pooled_equals_the_summed_map_and_reference(activation):
    B, G, S, d, k1, l1, k2, l2 = 3, 4, 5, 6, 2, 2, 2, 2
    layer = _layer(d, 8, k1, l1, k2, l2, activation=activation)
    x = torch.randn(B, G, S, d, dtype=F64, requires_grad=True)
    pooled = layer.forward_pooled(x)
    y_ref = reference_hierarchical(x, layer.group_router, layer.router, layer.weight, layer.bias, l1, l2,
                                   activation=activation)[0].sum((1, 2))
    assert pooled.shape == (B, 8)
    assert rel_err(pooled, y_ref) < TOL
    inputs = _inputs(layer, x)
    for a, b in zip(grads(pooled, inputs, draw=F64), grads(y_ref, inputs, draw=F64)):
        assert rel_err(a, b) < TOL


def test_gradients_reach_both_routers_through_the_gates():
    """The top-level router has no gradient path but G1: if it were dropped, its gradient would be 0."""
    layer = _layer(4, 4, 2, 1, 2, 1)
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    gr, r = torch.autograd.grad(layer.forward_pooled(x).sum(), [layer.group_router, layer.router])
    # one group and one segment chosen: softmax gates over one score are exactly 1, gradient 0
    assert gr.abs().max() == 0 and r.abs().max() == 0
    layer = _layer(4, 4, 2, 2, 2, 2)
    gr, r = torch.autograd.grad(layer.forward_pooled(x).sum(), [layer.group_router, layer.router])
    assert gr.abs().min() > 0 and r.abs().max() > 0


def test_unchosen_segments_are_exactly_zero_and_routing_helpers():
    B, G, S, d, k1, l1, k2, l2, m = 2, 4, 5, 3, 2, 1, 2, 2, 3
    layer = _layer(d, k1 * k2 * m, k1, l1, k2, l2, bias=False)
    x = torch.randn(B, G, S, d, dtype=F64)
    y, routing = layer(x, return_routing=True)
    blocks = y.view(B, G * S, k1, k2, m)
    flat = routing.flat_indices()
    assert flat.shape == (B, k1, k2, l1 * l2)
    for b, t, s in itertools.product(range(B), range(k1), range(k2)):
        chosen = set(flat[b, t, s].tolist())
        for pos in range(G * S):
            if pos not in chosen:
                assert torch.equal(blocks[b, pos, t, s], torch.zeros(m, dtype=F64))
    group = routing.group_indices[:, 0, 0]
    segment = routing.indices[:, 0, 0, 1, 0]
    assert routing.group_hits(group)[:, 0].all()
    assert routing.segment_hits(group, segment)[:, 0, 1].all()
    other = (group + 1) % G  # a group expert 0 did not take (l1 = 1)
    assert not routing.segment_hits(other, segment)[:, 0].any()


def test_fractions_and_parameter_shapes():
    layer = pmoe.HierarchicalPMoE(6, 12, num_group_experts=2, top_groups=0.5, num_experts=3, top_l=0.25)
    assert layer.group_router.shape == (2, 6) and layer.router.shape == (2, 3, 6)
    assert layer.weight.shape == (2, 3, 2, 6) and layer.bias is None
    y, routing = layer(torch.randn(2, 4, 8, 6), return_routing=True)
    assert y.shape == (2, 4, 8, 12)
    assert routing.group_indices.shape == (2, 2, 2) and routing.indices.shape == (2, 2, 2, 3, 2)
    assert layer.forward_pooled(torch.zeros(0, 4, 8, 6)).shape == (0, 12)
    assert "num_group_experts=2" in repr(layer)


def test_triton_backend_matches_reference():
    """Level 2 is the fused op: the same layer through the kernels (Triton's interpreter on CPU)."""
    pytest.importorskip("triton")
    B, G, S, d, k1, l1, k2, l2 = 2, 3, 4, 8, 2, 2, 2, 2
    layer = _layer(d, 8, k1, l1, k2, l2, dtype=torch.float32, backend="triton")
    x = torch.randn(B, G, S, d, requires_grad=True)
    y = layer.forward_pooled(x)
    args = [t.detach().double().requires_grad_() for t in _inputs(layer, x)]
    y_ref = reference_hierarchical(*args, l1, l2)[0].sum((1, 2))
    assert rel_err(y.double(), y_ref) < 1e-5
    for a, b in zip(grads(y, _inputs(layer, x), draw=F64), grads(y_ref, args, draw=F64)):
        assert rel_err(a.double(), b) < 1e-4


# ----------------------------------------------------------------------------- bad input

def _params(k1=2, k2=2, m=3, d=4):
    return torch.randn(k1, d), torch.randn(k1, k2, d), torch.randn(k1, k2, m, d), torch.randn(k1, k2, m)


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.randn(2, 3, 4)), ValueError, r"4-D \(B, G, S, d\)"),
    (dict(x=torch.randn(2, 3, 4, 5)), ValueError, r"weight must have shape .* 5\)"),
    (dict(x=torch.randn(2, 0, 4, 4)), ValueError, "empty group"),
    (dict(x=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "real floating"),
    (dict(x=[[1.0]]), TypeError, "torch.Tensor"),
    (dict(group_router=torch.randn(3, 4)), ValueError, r"group_router must have shape \(2, 4\)"),
    (dict(router=torch.randn(2, 4)), ValueError, r"router must have shape \(2, 2, 4\)"),
    (dict(bias=torch.randn(2, 3)), ValueError, r"bias must have shape \(2, 2, 3\)"),
    (dict(router=torch.randn(2, 2, 4, dtype=F64)), TypeError, "dtype"),
    (dict(top_groups=4), ValueError, r"top_groups must satisfy 1 <= top_groups <= 3 \(groups"),
    (dict(top_l=5), ValueError, r"top_l must satisfy 1 <= top_l <= 4 \(segments"),
    (dict(top_groups=0), ValueError, "top_groups must be >= 1"),
    (dict(top_l=1.5), ValueError, "top_l as a fraction"),
    (dict(top_groups="2"), TypeError, "top_groups must be an int"),
    (dict(combine="mean"), ValueError, "unknown combine"),
    (dict(activation="tanh"), ValueError, "unknown activation"),
    (dict(backend="cuda"), ValueError, "unknown backend"),
])
def test_bad_input_raises_a_clear_error(change, error, match):
    gr, r, w, b = _params()
    kw = dict(x=torch.randn(2, 3, 4, 4), group_router=gr, router=r, weight=w, bias=b, top_groups=2, top_l=2,
              combine="concat", activation="relu", backend="torch")
    kw.update(change)
    tensors = [kw.pop(name) for name in ("x", "group_router", "router", "weight", "bias")]
    for fn in (hierarchical_pmoe, hierarchical_pmoe_pooled):
        with pytest.raises(error, match=match):
            fn(*tensors, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(out_features=10), "divisible by 4"),
    (dict(num_group_experts=0), "num_group_experts must be a positive int"),
    (dict(num_experts=True), "num_experts must be a positive int"),
    (dict(top_groups=-1), "top_groups must be >= 1"),
    (dict(combine="max"), "unknown combine"),
])
def test_bad_constructor_arguments(kw, match):
    args = dict(in_features=4, out_features=8, num_group_experts=2, top_groups=1, num_experts=2, top_l=1)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        pmoe.HierarchicalPMoE(**args)


# ----------------------------------------------------------------------------- FLOPs

def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("pooled", [False, True])
def test_counted_flops_are_the_sparse_work(pooled):
    """Forward: level-1 scores 2·B·G·d·k1, then per top-level expert the flat layer on its l1 groups:
    scores 2·(B·l1)·S·d·k2 and experts 2·k2·(B·l1·l2)·d·m.  Nothing on unchosen groups."""
    B, G, S, d, k1, l1, k2, l2, m = 4, 6, 8, 16, 2, 2, 3, 2, 5
    layer = pmoe.HierarchicalPMoE(d, k1 * k2 * m, k1, l1, k2, l2, backend="torch")
    x = torch.randn(B, G, S, d)
    fwd = layer.forward_pooled if pooled else layer
    want = 2 * B * G * d * k1 + k1 * (2 * B * l1 * S * d * k2 + 2 * k2 * B * l1 * l2 * d * m)
    with torch.no_grad():
        assert _counted(lambda: fwd(x)) == want
    dense = 2 * B * G * S * d * (k1 * k2 * m)
    assert want < 0.4 * dense
    # training: the backward holds at least the experts' two gradient GEMMs (input and weight, 2x
    # their forward) and at most two per forward GEMM -- still only the sparse work
    experts = k1 * 2 * k2 * B * l1 * l2 * d * m
    backward = _counted(lambda: fwd(x.requires_grad_()).sum().backward()) - want
    assert 2 * experts <= backward <= 2 * want

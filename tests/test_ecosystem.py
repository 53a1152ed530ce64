"""The layer inside the PyTorch ecosystem: NaN/Inf isolation, determinism, autocast,
torch.compile, state_dict across backends, routing statistics.

Triton cases run the kernels in Triton's interpreter (conftest sets TRITON_INTERPRET=1) and are
skipped where triton is not installed.
"""
from __future__ import annotations

import io
import math
import time

import pytest
import torch
from torch import nn

import pmoe.functional as PF
from pmoe import PMoE, PMoEConv2d, Routing
from pmoe.routing import select_top_l

try:
    import pmoe.kernels  # noqa: F401

    HAVE_KERNELS = True
except ImportError:
    HAVE_KERNELS = False

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAVE_KERNELS, reason="pmoe.kernels needs triton"))]


def _layer(backend="torch", combine="concat", gate="softmax", bias=True, **kw) -> PMoEConv2d:
    layer = PMoEConv2d(3, 8, 2, 4, top_l=3, combine=combine, gate=gate, bias=bias, backend=backend, **kw)
    with torch.no_grad():  # a router big enough for the scores to be well separated
        layer.router.normal_(0, 1)
    return layer


# ---------------------------------------------------------------- NaN and Inf

def test_selection_order_with_nan_and_inf():
    """NaN ranks above +inf, +inf above finite, -inf last; ties (NaN included) to the lower
    index; -0.0 == +0.0.  This is the order docs/ROBUSTNESS.md states and the kernels must keep."""
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([1.0, nan, inf, nan, -inf, 0.0, -0.0, inf])
    assert select_top_l(s, 8).tolist() == [1, 3, 2, 7, 0, 5, 6, 4]
    assert select_top_l(torch.full((2, 5), nan), 3).tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["concat", "sum"])
@pytest.mark.parametrize("gate", ["softmax", "indicator", "softmax_all"])
def test_nonfinite_input_stays_in_its_image(backend, combine, gate):
    layer = _layer(backend, combine, gate)
    B, n = 5, 6
    clean = torch.randn(B, 3, 4, 6)
    dirty = clean.clone()
    dirty[1, 0, 1, 2] = float("nan")  # one value of one patch
    dirty[2, 1, 0, 0] = float("inf")
    dirty[3, 2, 3, 5] = -float("inf")
    dirty[4] = float("nan")  # a whole image
    xc, xd = clean.clone().requires_grad_(), dirty.clone().requires_grad_()
    yc, rc = layer(xc, return_routing=True)
    yd, rd = layer(xd, return_routing=True)
    ok = [0]  # the one image left finite
    assert torch.equal(yd[ok], yc[ok])
    assert torch.equal(rd.indices[ok], rc.indices[ok]) and torch.equal(rd.gates[ok], rc.gates[ok])
    for r in (rc, rd):
        assert r.indices.min() >= 0 and r.indices.max() < n
        # each expert still takes l distinct patches
        assert (r.indices.sort(-1).values.diff(dim=-1) > 0).all()
    # input gradients of the finite image are untouched too (parameter gradients sum over the
    # batch, so those do see the NaN: that is the semantics of a batch, not a leak)
    yc.square().sum().backward()
    torch.nan_to_num(yd).square().sum().backward()
    assert torch.equal(xd.grad[ok], xc.grad[ok])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", ["softmax", "softmax_all", "indicator"])
def test_nan_patch_is_taken_by_every_expert(backend, gate):
    """What a NaN image's output is (docs/ROBUSTNESS.md): a NaN in patch j makes every expert's
    score at j NaN, so every expert takes j first.  With either softmax gate the expert's l gates
    are all NaN, so all of its l output rows of that image are NaN; with the indicator gate only row j
    is.  Unselected slots stay exactly 0 in concat mode either way."""
    layer = _layer(backend, "concat", gate, bias=False)
    x = torch.randn(1, 3, 4, 6)
    x[0, 1, 2, 3] = float("nan")  # row 1, col 1 of the 2x3 patch grid: patch 4
    y, r = layer(x, return_routing=True)
    assert (r.indices[0, :, 0] == 4).all()
    rows = y.permute(0, 2, 3, 1).reshape(6, 4, 2)  # (patch, expert, channel)
    for s in range(4):
        chosen = r.indices[0, s].tolist()
        for j in range(6):
            blk = rows[j, s]
            if j not in chosen:
                assert torch.equal(blk, torch.zeros(2))
            elif gate != "indicator" or j == 4:
                assert blk.isnan().all()
            else:
                assert blk.isfinite().all()


# ---------------------------------------------------------------- determinism

def _run_twice_bitwise(make_layer, x):
    outs = []
    for _ in range(3):
        torch.manual_seed(1)
        layer = make_layer()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_deterministic_option_bitwise(backend, combine):
    x = torch.randn(6, 3, 8, 8)
    _run_twice_bitwise(lambda: _layer(backend, combine, deterministic=True), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_deterministic_flag_bitwise(backend):
    x = torch.randn(6, 3, 8, 8)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _run_twice_bitwise(lambda: _layer(backend, "sum"), x)
    finally:
        torch.use_deterministic_algorithms(before)


def test_global_deterministic_flag_reaches_backend(monkeypatch):
    """torch.use_deterministic_algorithms(True) must turn on the layer's deterministic path even
    when the layer was built with deterministic=False."""
    seen = []
    real = PF.BACKENDS["torch"]

    def spy(*args):
        seen.append(args[-1].deterministic)  # the Options
        return real(*args)

    monkeypatch.setitem(PF.BACKENDS, "torch", spy)
    layer, x = _layer("torch", "sum"), torch.randn(2, 3, 4, 4)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        layer(x)
        torch.use_deterministic_algorithms(True)
        layer(x)
    finally:
        torch.use_deterministic_algorithms(before)
    layer.deterministic = True
    layer(x)
    assert seen == [False, True, True]


# ---------------------------------------------------------------- autocast

@pytest.mark.parametrize("combine", ["concat", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_autocast_bf16(combine, bias):
    """fp32 parameters, bf16 compute.  Output dtype bf16 with or without bias (as nn.Conv2d under
    autocast).  The selection is exactly the fp32 one (scores are computed in fp32 under autocast);
    outputs within 2e-2 and gradients within 6e-2 of the fp32 ones, relative to their largest
    entry (bf16 keeps 8 significant bits: 3.9e-3 per rounding)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), PMoEConv2d(16, 32, 2, 4, 6, combine=combine,
                                                                    bias=bias, backend="torch"))
    nn.init.normal_(model[1].router, std=0.1)
    x = torch.randn(4, 3, 8, 8)

    y32, r32 = model[1](model[0](x), return_routing=True)
    y32.square().sum().backward()
    g32 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[0](x)
        assert h.dtype == torch.bfloat16  # the layer receives bf16 input from the conv before it
        y16, r16 = model[1](h, return_routing=True)
    assert y16.dtype == torch.bfloat16 and y16.shape == y32.shape
    y16.float().square().sum().backward()
    h32 = model[0](x)  # the same input in fp32 ...
    # ... rounded to bf16 is what the autocast layer saw, so with fp32 scores the choice
    # matches the fp32 layer run on that rounded input exactly
    with torch.no_grad():
        _, r_rounded = model[1](h32.bfloat16().float(), return_routing=True)
    assert torch.equal(r16.indices, r_rounded.indices)
    assert (r16.indices == r32.indices).float().mean() > 0.95

    err = (y16.float() - y32).abs().max() / y32.abs().max()
    assert err < 2e-2, err
    for (name, p), g in zip(model.named_parameters(), g32):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        rel = (p.grad - g).abs().max() / g.abs().max()
        assert rel < 6e-2, (name, rel)


def test_autocast_fp32_input_selection_is_exact():
    layer = _layer("torch", bias=True)
    x = torch.randn(4, 3, 8, 8)
    y32, r32 = layer(x, return_routing=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, r16 = layer(x, return_routing=True)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(r16.indices, r32.indices)
    assert r16.gates.dtype == torch.float32 and torch.equal(r16.gates, r32.gates)


# ---------------------------------------------------------------- torch.compile

def test_torch_compile_no_graph_breaks_same_values():
    """One inductor compile of a small model, no graph breaks, forward and gradients equal to eager
    within float32 rounding.  Measured on the 2-core CPU: about 20 s with a cold inductor cache,
    about 4 s warm (printed with -s)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                          PMoEConv2d(8, 16, 2, 4, 3, backend="torch", bias=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    nn.init.normal_(model[1].router, std=0.3)
    x = torch.randn(4, 3, 8, 8)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1

    y0 = model(x)
    y0.square().sum().backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    t0 = time.perf_counter()
    compiled = torch.compile(model, backend="inductor")
    y1 = compiled(x)
    y1.square().sum().backward()
    seconds = time.perf_counter() - t0
    print(f"torch.compile (inductor) first forward+backward: {seconds:.1f} s")
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), g0):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ---------------------------------------------------------------- state_dict

@pytest.mark.parametrize("target", BACKENDS)
def test_state_dict_round_trip(target):
    src = PMoEConv2d(3, 8, 2, 4, top_l=0.5, bias=True, backend="torch")
    nn.init.normal_(src.router, std=1.0)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert set(sd) == {"router", "weight", "bias"}

    torch.manual_seed(123)  # different init, so loading must actually overwrite
    dst = PMoEConv2d(3, 8, 2, 4, top_l=0.5, bias=True, backend=target)
    x = torch.randn(3, 3, 6, 6)
    assert not torch.equal(dst(x), src(x))
    dst.load_state_dict(sd)
    y_src, r_src = src(x, return_routing=True)
    y_dst, r_dst = dst(x, return_routing=True)
    assert torch.equal(r_dst.indices, r_src.indices)
    if target == "torch":
        assert torch.equal(y_dst, y_src)
    else:  # another summation order: float32 rounding only
        torch.testing.assert_close(y_dst, y_src, rtol=1e-5, atol=1e-5)


def test_state_dict_shape_mismatch_is_an_error():
    sd = PMoEConv2d(3, 8, 2, 4, top_l=2).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for router"):
        PMoEConv2d(3, 8, 2, 2, top_l=2, combine="sum").load_state_dict(sd)


# ---------------------------------------------------------------- routing statistics

def _hand_routing() -> Routing:
    # B=2, k=2, l=2, n=4
    idx = torch.tensor([[[0, 1], [1, 2]],
                        [[3, 0], [3, 1]]])
    gates = torch.tensor([[[0.5, 0.5], [1.0, 0.0]],
                          [[0.75, 0.25], [1.0, 1.0]]])
    return Routing(idx, gates, 4)


def test_routing_statistics_by_hand():
    r = _hand_routing()
    assert r.num_experts == 2 and r.top_l == 2
    assert r.position_counts().tolist() == [2, 3, 1, 2]
    assert r.patch_load().tolist() == [[1, 2, 1, 0], [1, 1, 0, 2]]
    assert r.coverage().tolist() == [[True, True, True, False], [True, True, False, True]]
    assert r.expert_load().tolist() == [4, 4]
    assert r.unrouted_fraction() == 0.25
    h = [math.log(2), 0.0, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), math.log(2)]
    assert r.gate_entropy() == pytest.approx(sum(h) / 4, rel=1e-12)
    s = r.stats()
    assert s == pytest.approx({
        "unrouted_fraction": 0.25,
        "position_max_over_mean": 3 / 2,
        "max_experts_per_patch_mean": 2.0,
        "gate_entropy": sum(h) / 4,
        "gate_entropy_uniform": math.log(2),
    })


@pytest.mark.parametrize("gate", ["softmax", "indicator", "softmax_all"])
def test_routing_statistics_from_a_forward(gate):
    layer = PMoE(6, 8, 4, top_l=3, gate=gate, backend="torch")
    B, n = 5, 7
    _, r = layer(torch.randn(B, n, 6), return_routing=True)
    assert r.position_counts().sum() == B * 4 * 3
    assert (r.patch_load().sum(1) == 4 * 3).all() and r.patch_load().max() <= 4
    assert r.expert_load().tolist() == [B * 3] * 4  # expert choice: always B*l
    assert torch.equal(r.coverage(), r.patch_load() > 0)
    assert 0.0 <= r.unrouted_fraction() <= 1 - 3 / n
    ent = r.gate_entropy()
    if gate == "indicator":
        assert ent == pytest.approx(math.log(3), rel=1e-12)
    else:
        assert 0.0 <= ent <= math.log(3) + 1e-12
    assert all(isinstance(v, float) for v in r.stats().values())


def test_routing_statistics_nan_gate():
    r = _hand_routing()
    r.gates[0, 0, 0] = float("nan")
    assert math.isnan(r.gate_entropy())
    assert r.unrouted_fraction() == 0.25  # indices are still valid, so the counts are too


def test_per_expert_gather_matches_index_select():
    """The deterministic-on-CUDA gather (used when deterministic=True on a CUDA tensor) computes
    the same values and gradients as the default one; with repeated rows across experts, which
    is the case that makes the default backward racy on CUDA."""
    from pmoe.torch_backend import gather_rows

    x = torch.randn(10, 6, dtype=torch.float64)
    rows = torch.tensor([[0, 3, 7], [3, 7, 9], [3, 1, 2]])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = gather_rows(a, rows), gather_rows(b, rows, per_expert=True)
    assert torch.equal(ya, yb) and ya.shape == (3, 3, 6)
    w = torch.randn(3, 3, 6, dtype=torch.float64)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-15, atol=1e-15)


def test_model_to_channels_last_with_a_5d_expert_weight():
    """nn.Module.to(memory_format=channels_last) must not fail on the (k, m, C, p, p) weight,
    and the converted model computes the same thing."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                              PMoEConv2d(8, 16, 2, 4, 0.5, backend="torch"))
    torch.nn.init.normal_(net[1].router)
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    net.to(memory_format=torch.channels_last)
    assert net[1].weight.shape == (4, 4, 8, 2, 2)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    y = net(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert net[1].weight.grad.shape == net[1].weight.shape
    net.to(torch.float64)  # other conversions are untouched
    assert net[1].weight.dtype == torch.float64

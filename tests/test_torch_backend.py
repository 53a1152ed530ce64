"""The PyTorch path's own machinery: both expert-GEMM routes (oneDNN 1x1 convolutions
and bmm) against the float64 reference, the hand-written backward against autograd of the
reference, double backward, the inference path, torch.export with a dynamic batch from B = 1,
and memory kept for backward below the dense conv's for every benchmark layer.
"""
from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch

import pmoe
from pmoe import torch_backend as TB
from pmoe.reference import reference_conv2d
from helpers import rel_err

F64 = torch.float64
TOL = 1e-9


@pytest.fixture(params=["onednn", "bmm"])
def gemm(request, monkeypatch):
    """Run the test with each expert-GEMM route forced, whatever the dtype and sizes (the oneDNN
    route runs float64 through torch's own convolution: the same code around it)."""
    monkeypatch.setattr(TB, "_onednn", lambda t, m, d: request.param == "onednn" and t.device.type == "cpu")
    return request.param


def _params(C, p, k, m, bias, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = C * p * p
    router = torch.randn(k, d, generator=g, dtype=dtype)
    weight = torch.randn(k, m, C, p, p, generator=g, dtype=dtype) / d ** 0.5
    b = torch.randn(k, m, generator=g, dtype=dtype) if bias else None
    return router, weight, b


def _call(x, router, weight, bias, p, l, combine, gate, activation="relu", pooled=False, deterministic=False):
    fn = pmoe.pmoe_conv2d_pooled if pooled else pmoe.pmoe_conv2d
    return fn(x, router, weight, bias, patch_size=p, top_l=l, combine=combine, gate=gate, activation=activation,
              backend="torch", deterministic=deterministic, return_routing=True)


CASES = [  # B, C, H, W, p, k, m, l
    (3, 3, 8, 8, 2, 4, 5, 5),
    (2, 4, 6, 6, 1, 3, 2, 36),   # l = n
    (4, 2, 6, 9, 3, 2, 3, 1),    # l = 1, n = 6
    (2, 300, 4, 4, 1, 3, 4, 5),  # NCHW rows copied in two channel blocks (256 + 44)
    (2, 3, 4, 4, 2, 2, 12, 3),   # m > _THIN_M: the forward's plain bmm (the others run w @ xg^T)
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("combine,gate,pooled", list(itertools.product(
    ["concat", "sum"], ["softmax", "indicator", "softmax_all"], [False, True])))
def test_both_gemm_routes_match_reference(gemm, case, combine, gate, pooled):
    B, C, H, W, p, k, m, l = case
    router, weight, bias = _params(C, p, k, m, bias=gate != "indicator")
    x = torch.randn(B, C, H, W, dtype=F64)
    params = [t.requires_grad_() for t in (x, router, weight) + ((bias,) if bias is not None else ())]
    y, r = _call(x, router, weight, bias, p, l, combine, gate, pooled=pooled)
    y_ref, idx_ref, g_ref = reference_conv2d(x, router, weight, bias, p, l, combine, gate)
    if pooled:
        y_ref = y_ref.sum((2, 3))
    assert torch.equal(r.indices, idx_ref)
    assert rel_err(r.gates, g_ref) < TOL and rel_err(y, y_ref) < TOL
    dy = torch.randn(y.shape, dtype=F64)
    got = torch.autograd.grad(y, params, dy, allow_unused=True)
    want = torch.autograd.grad(y_ref, params, dy, allow_unused=True)
    for name, a, b in zip(["x", "router", "weight", "bias"], got, want):
        if gate == "indicator" and name == "router":
            assert a is None or a.abs().max() == 0
        else:
            assert rel_err(a, b) < TOL, name


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_gradient_from_an_nchw_consumer_matches_reference(gemm, combine, monkeypatch):
    """An NCHW network copies the (channels-last) output to NCHW, so the gradient comes back
    NCHW; the backward then gathers it along the patches (_take_from_map) instead of transposing
    it, with the reference's gradients."""
    taken = []
    real = TB._take_from_map
    monkeypatch.setattr(TB, "_take_from_map", lambda *a: taken.append(1) or real(*a))
    router, weight, bias = _params(3, 2, 4, 3, bias=True)
    x = torch.randn(3, 3, 8, 6, dtype=F64)
    params = [t.requires_grad_() for t in (x, router, weight, bias)]
    y, _ = _call(x, router, weight, bias, 2, 5, combine, "softmax_all")
    y_ref, _, _ = reference_conv2d(x, router, weight, bias, 2, 5, combine, "softmax_all")
    dy = torch.randn(y.shape, dtype=F64)
    got = torch.autograd.grad(y.contiguous(), params, dy)
    assert taken
    for a, b in zip(got, torch.autograd.grad(y_ref, params, dy)):
        assert rel_err(a, b) < TOL


def test_nchw_rows_copied_in_channel_blocks():
    """p = 1 on an NCHW CPU map with more channels than a block: the rows are copied block by
    block (_nchw_rows), the same values as one copy of the transposed view, and the gradient is
    the view's values, NCHW-contiguous like x, differentiable twice."""
    x = torch.randn(2, 300, 4, 3, dtype=F64, requires_grad=True)
    assert TB._rows_channel_block(12, 8) == 256 and TB._nchw_rows_blocked(x)
    rows = TB.patches_from_map_hwc(x, 1)
    view = x.permute(0, 2, 3, 1).reshape(2, 12, 300)
    assert type(rows.grad_fn).__name__ == "_NCHWRowsBackward"
    assert rows.is_contiguous() and torch.equal(rows, view)
    dy = torch.randn(rows.shape, dtype=F64)
    (got,), (want,) = torch.autograd.grad(rows, [x], dy), torch.autograd.grad(view, [x], dy)
    assert torch.equal(got, want) and got.is_contiguous()
    small = torch.randn(2, 40, 3, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: TB._NCHWRows.apply(t, 1).square(), (small,))
    with torch.no_grad():
        assert TB.patches_from_map_hwc(x, 1).grad_fn is None
    # a channels-last map is its own rows (a view), and a block's worth of channels one copy
    assert not TB._nchw_rows_blocked(x.detach().contiguous(memory_format=torch.channels_last))
    assert not TB._nchw_rows_blocked(torch.randn(2, 256, 4, 3, dtype=F64))
    assert not TB._nchw_rows_blocked(torch.randn(2, 300, 4, 3, device="meta"))
    assert not TB._nchw_rows_blocked(torch.randn(2, 300, 1, 1, dtype=F64))  # one pixel: rows are a view
    assert not TB._nchw_rows_blocked(torch.randn(0, 300, 4, 3, dtype=F64))
    assert not TB._nchw_rows_blocked(torch.randn(1, 300, 4, 3, dtype=F64))  # one image: a view too


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("B", [1, 2])
def test_patch_rows_gradient_in_the_maps_layout(p, B):
    """The rows' gradient reaches the map in the map's memory format (as nn.Conv2d's and the
    fused kernels' do), with the plain ops' values: NCHW-contiguous for an NCHW map and for any
    other strides, channels-last for a channels-last map; differentiable twice."""
    base = torch.randn(B, 5, 3 * p, 2 * p, dtype=F64)
    for x, fmt in ((base, torch.contiguous_format), (base.contiguous(memory_format=torch.channels_last),
                                                     torch.channels_last), (base[:, 1:4], torch.contiguous_format)):
        x = x.detach().requires_grad_()
        rows = TB.patches_from_map_hwc(x, p)
        plain = x.permute(0, 2, 3, 1).reshape(B, 3, p, 2, p, x.shape[1]).permute(0, 1, 3, 2, 4, 5).reshape(rows.shape)
        assert torch.equal(rows, plain)
        dy = torch.randn(rows.shape, dtype=F64)
        (got,), (want,) = torch.autograd.grad(rows, [x], dy), torch.autograd.grad(plain, [x], dy)
        assert torch.equal(got, want) and got.is_contiguous(memory_format=fmt), (got.stride(), fmt)
    small = torch.randn(B, 3, 2 * p, p, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: TB.patches_from_map_hwc(t, p).square(), (small,))


def test_layer_input_gradient_in_the_maps_layout():
    """In a network the gradient that reaches the layer's (non-leaf) input has that input's
    memory format, on the PyTorch path as on the kernels' (an NCHW gradient for an NCHW map)."""
    router, weight, _ = _params(6, 2, 3, 4, bias=False, dtype=torch.float32)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x0 = torch.randn(3, 6, 8, 8, requires_grad=True)
        x = (x0 * 2).contiguous(memory_format=fmt)
        seen = []
        x.register_hook(lambda g: seen.append(g))
        y = pmoe.pmoe_conv2d(x, router, weight, patch_size=2, top_l=5, backend="torch")
        y.square().sum().backward()
        assert seen[0].is_contiguous(memory_format=fmt), (seen[0].stride(), fmt)


@pytest.mark.parametrize("combine", ["concat", "sum"])
@pytest.mark.parametrize("C,p", [(6, 1), (6, 2), (1, 2)])
def test_layer_output_in_the_maps_layout(combine, C, p):
    """The output comes back in the input's memory format, as from nn.Conv2d: NCHW for an NCHW
    map, a channel slice or a C = 1 map (NCHW and channels-last at once), channels-last for a
    channels-last map; values and every gradient equal to the reference's either way, with the
    gradient of the output given in its own layout (what the next layer sends back)."""
    router, weight, bias = _params(C, p, 3, 4, bias=True)
    base = torch.randn(2, C + 2, 4 * p, 4 * p, dtype=F64)
    maps = {"nchw": base[:, :C].contiguous(), "slice": base[:, 2:], "channels_last": base[:, :C].contiguous(
        memory_format=torch.channels_last)}
    for name, x in maps.items():
        xs = [x.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)]
        params = [[t.detach().clone().requires_grad_(True) for t in (router, weight, bias)] for _ in range(2)]
        y = pmoe.pmoe_conv2d(xs[0], *params[0], patch_size=p, top_l=5, combine=combine, backend="torch")
        ref, _, _ = reference_conv2d(xs[1], *params[1], p, 5, combine=combine)
        nchw = name != "channels_last" or C == 1
        fmt = torch.contiguous_format if nchw else torch.channels_last
        assert y.is_contiguous(memory_format=fmt), (name, y.stride())
        assert rel_err(y, ref) < 1e-12
        dy = torch.randn_like(y)  # in y's layout
        got = torch.autograd.grad(y, [xs[0], *params[0]], dy)
        want = torch.autograd.grad(ref, [xs[1], *params[1]], dy)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-10, name


def test_token_output_stays_rows():
    """pmoe on (B, n, d) tokens returns contiguous (B, n, out) rows: the tokens' own layout."""
    router, weight, _ = _params(8, 1, 3, 4, bias=False)
    y = pmoe.functional.pmoe(torch.randn(2, 10, 8, dtype=F64), router, weight.view(3, 4, 8), top_l=4, backend="torch")
    assert y.is_contiguous()


def test_torch_compile_copies_nchw_rows_its_own_way():
    """Under torch.compile the rows are the plain view (inductor makes its own transposition),
    with the eager blocked copy's values."""
    router, weight, _ = _params(300, 1, 2, 8, bias=False, dtype=torch.float32)
    x = torch.randn(2, 300, 4, 4)

    def f(x):
        return pmoe.pmoe_conv2d(x, router, weight, patch_size=1, top_l=3, backend="torch")

    y, targets = _compiled_ops(f, x)
    assert rel_err(y, f(x)) < 1e-6
    assert "copy_" not in targets, targets


def _compiled_ops(f, x):
    """f compiled by dynamo (fullgraph) on x, with a backend that keeps the traced graphs: ->
    (the compiled output, the names of the graphs' ops)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        y = torch.compile(f, backend=backend, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    return y, [getattr(node.target, "__name__", str(node.target)) for gm in graphs for node in gm.graph.nodes]


@pytest.mark.parametrize("activation", ["gelu", "silu", "identity"])
def test_activation_backward_matches_reference(gemm, activation):
    router, weight, bias = _params(2, 2, 3, 4, bias=True)
    x = torch.randn(2, 2, 6, 6, dtype=F64)
    params = [t.requires_grad_() for t in (x, router, weight, bias)]
    y, _ = _call(x, router, weight, bias, 2, 3, "concat", "softmax", activation)
    y_ref, _, _ = reference_conv2d(x, router, weight, bias, 2, 3, "concat", "softmax", activation)
    assert rel_err(y, y_ref) < TOL
    for a, b in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(y_ref.square().sum(), params)):
        assert rel_err(a, b) < TOL


# (Intel, bf16 GEMM instructions, threads, torch.compile tracing) -> (float32 big experts on
# oneDNN, bfloat16 ones on oneDNN)
ROUTES = {
    (False, False, 1, False): (True, True), (False, False, 2, False): (True, True),  # an AMD EPYC without bf16
    (False, False, 1, True): (True, True),
    (False, True, 2, False): (True, False),  # a CPU with AVX512-BF16, not Intel
    (True, False, 1, False): (True, True), (True, False, 2, False): (False, True),  # an Intel CPU without bf16
    (True, False, 1, True): (False, True), (True, False, 2, True): (False, True),
    (True, True, 1, False): (True, False), (True, True, 2, False): (False, False),  # an Intel Xeon with AMX
    (True, True, 1, True): (False, False),
}


@pytest.mark.parametrize("cpu", sorted(ROUTES))
def test_expert_gemm_route_rule(monkeypatch, cpu):
    """Big float32/bfloat16 experts run as oneDNN convolutions, except: float32 on an Intel CPU
    with more than one thread or under torch.compile, bfloat16 on a CPU with bf16 GEMM
    instructions (one bmm then); small experts always one bmm; never decided by the batch."""
    intel, bf16_gemm, threads, compiling = cpu
    monkeypatch.setattr(TB, "_INTEL", intel)
    monkeypatch.setattr(TB, "_BF16_GEMM", bf16_gemm)
    monkeypatch.setattr(TB, "_threads", lambda: threads)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    for dtype, onednn in zip((torch.float32, torch.bfloat16), ROUTES[cpu]):
        t = torch.empty(0, dtype=dtype)
        assert TB._onednn(t, 160, 640) == (onednn and TB._MKLDNN)  # WRN-pMoE's experts
        assert TB._onednn(t, 128, 1024) == (onednn and TB._MKLDNN)  # the large layer's
        assert not TB._onednn(t, 20, 784)  # the paper's MNIST experts: too thin
        assert not TB._onednn(t, 64, 128)
    assert not TB._onednn(torch.empty(0, dtype=F64), 160, 640)


@pytest.mark.parametrize("intel", [False, True])
def test_torch_compile_traces_the_compiled_route(monkeypatch, intel):
    """What torch.compile actually traces for big float32 experts: one bmm on an Intel CPU (even
    on one thread, where eagerly it runs the per-expert convolutions), the per-expert
    convolutions elsewhere; values as eager."""
    monkeypatch.setattr(TB, "_INTEL", intel)
    router, weight, _ = _params(64, 2, 4, 128, bias=False, dtype=torch.float32)
    x = torch.randn(2, 64, 4, 4)

    def f(x):
        return pmoe.pmoe_conv2d(x, router, weight, patch_size=2, top_l=2, backend="torch")

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y, targets = _compiled_ops(f, x)
        assert rel_err(y, f(x)) < 1e-5
    finally:
        torch.set_num_threads(threads)
    onednn = TB._MKLDNN and not intel
    assert ("conv2d" in targets) == onednn, targets
    # the routing scores are one bmm on every route; the experts' one more on the bmm route
    assert sum(t in ("bmm", "baddbmm") for t in targets) == (1 if onednn else 2), targets


@pytest.mark.parametrize("combine", ["concat", "sum"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_torch_compile_adds_rows_through_aten(combine, deterministic):
    """Compiled, the row additions (the input gradient; the sum combine's output) are the custom
    op pmoe::add_rows in the traced graphs, with the layer's deterministic flag: an opaque call
    that inductor cannot fuse into a scatter-add of its own.  The traced graphs give eager's
    values."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    torch.manual_seed(0)
    layer = pmoe.PMoEConv2d(4, 6, 2, 3, 2, combine=combine, backend="torch", deterministic=deterministic)
    torch.nn.init.normal_(layer.router, std=1.0)
    x = torch.randn(3, 4, 4, 4, requires_grad=True)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")),
                                 fullgraph=True)
        y = compiled(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    finally:
        torch._dynamo.reset()
    code = {kind: "".join(gm.code for gm in gms) for kind, gms in graphs.items()}
    assert "pmoe.add_rows" in code["backward"]
    assert ("pmoe.add_rows" in code["forward"]) == (combine == "sum")
    assert f"deterministic = {deterministic}" in code["backward"]
    y_eager = layer(x)
    assert rel_err(y, y_eager) < 1e-5
    for a, b in zip(grads, torch.autograd.grad(y_eager.square().sum(), [x, *layer.parameters()])):
        assert rel_err(a, b) < 1e-5


def test_cpuinfo_reads_a_field(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu amx_bf16 avx2\n\n"
                    "processor\t: 1\nvendor_id\t: GenuineIntel\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                         *a, **k))
    assert TB.cpuinfo("vendor_id") == "GenuineIntel"
    assert TB.cpuinfo("flags").split() == ["fpu", "amx_bf16", "avx2"]
    assert TB.cpuinfo("model name") == ""


def test_backward_follows_the_forward_blocks_when_the_route_changes(monkeypatch):
    """The route depends on the threading, which may change between forward and backward: the
    backward runs the forward's blocks (per expert, or all in one), gradients unchanged."""
    router, weight, bias = _params(4, 1, 4, 40, bias=True)
    x = torch.randn(3, 4, 4, 4, dtype=F64)
    params = [t.requires_grad_() for t in (x, router, weight, bias)]
    y_ref, _, _ = reference_conv2d(*params, 1, 5, "concat", "softmax")
    g_ref = torch.autograd.grad(y_ref.square().sum(), params)
    for first in (True, False):
        monkeypatch.setattr(TB, "_onednn", lambda t, m, d: first)
        y, _ = _call(x, router, weight, bias, 1, 5, "concat", "softmax")
        monkeypatch.setattr(TB, "_onednn", lambda t, m, d: not first)
        for a, b in zip(torch.autograd.grad(y.square().sum(), params), g_ref):
            assert rel_err(a, b) < TOL


@pytest.mark.parametrize("pooled", [False, True])
def test_float32_big_experts_route_matches_reference(pooled):
    """float32 with large enough experts: the route the big benchmark layers take on CPU,
    unforced, against float64."""
    router, weight, bias = _params(64, 2, 4, 128, bias=True, dtype=torch.float32)
    assert TB._onednn(weight, 128, 256) == (TB._MKLDNN and not (TB._INTEL and torch.get_num_threads() > 1))
    x = torch.randn(4, 64, 8, 8)
    params = [t.requires_grad_() for t in (x, router, weight, bias)]
    y, r = _call(x, router, weight, bias, 2, 6, "concat", "softmax", pooled=pooled)
    p64 = [t.detach().double().requires_grad_() for t in params]
    y_ref, idx_ref, _ = reference_conv2d(*p64, 2, 6, "concat", "softmax")
    y_ref = y_ref.sum((2, 3)) if pooled else y_ref
    assert torch.equal(r.indices, idx_ref)
    assert rel_err(y.double(), y_ref) < 1e-5
    dy = torch.randn(y.shape)
    for a, b in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(y_ref, p64, dy.double())):
        assert rel_err(a.double(), b) < 1e-4


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_double_backward(gemm, combine):
    """create_graph=True differentiates a differentiable recomputation: second derivatives too."""
    router, weight, bias = _params(2, 2, 2, 3, bias=True)
    x = torch.randn(2, 2, 4, 4, dtype=F64, requires_grad=True)

    def f(x, router, weight, bias):
        return _call(x, router, weight, bias, 2, 2, combine, "softmax", "gelu")[0]

    assert torch.autograd.gradgradcheck(f, (x, router.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()))


def test_deterministic_row_additions_match(gemm):
    """deterministic=True adds rows with index_put_ (no atomics on any device): same values."""
    router, weight, bias = _params(3, 1, 4, 2, bias=True)
    x = torch.randn(3, 3, 4, 4, dtype=F64)
    out = []
    for det in (False, True):
        xi = x.clone().requires_grad_()
        y, _ = _call(xi, router, weight, bias, 1, 8, "sum", "softmax", deterministic=det)
        (gx,) = torch.autograd.grad(y.square().sum(), [xi])
        out.append((y, gx))
    for a, b in zip(*out):
        assert rel_err(a, b) < 1e-13


def test_inference_keeps_no_graph():
    layer = pmoe.PMoEConv2d(4, 64, 2, 4, 3, backend="torch")
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    layer.requires_grad_(False)
    assert layer(x).grad_fn is None
    assert layer(x.requires_grad_()).grad_fn is not None


@pytest.mark.parametrize("C,m,pooled,combine", [(3, 2, False, "concat"), (64, 128, False, "concat"),
                                                (64, 128, True, "concat"), (64, 128, False, "sum")])
def test_export_with_a_dynamic_batch_from_one(C, m, pooled, combine):
    """torch.export with the batch dynamic from B = 1: nothing in the torch path
    branches on the batch size (both expert-GEMM routes: bmm, and oneDNN for d*m large enough:
    export traces the eager one-thread route on every CPU), the exported program holds ATen ops
    only (no pmoe::add_rows, which only torch.compile uses), and it computes the layer at every B."""
    from torch.export import Dim, export

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            out = 4 * m if combine == "concat" else m
            self.layer = pmoe.PMoEConv2d(C, out, 2, 4, 3, combine=combine, bias=True, backend="torch")
            torch.nn.init.normal_(self.layer.router)

        def forward(self, x):
            return self.layer.forward_pooled(x) if pooled else self.layer(x)

    net = Net()
    ep = export(net, (torch.randn(4, C, 8, 8),), dynamic_shapes={"x": {0: Dim("B", min=1)}})
    targets = {str(node.target) for node in ep.graph.nodes}
    assert not any("pmoe" in t for t in targets), targets
    assert any("conv" in t for t in targets) == (TB._MKLDNN and C == 64), targets
    for B in (1, 2, 7):
        x = torch.randn(B, C, 8, 8)
        torch.testing.assert_close(ep.module()(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def bench_modules():
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.append(bench)
    import baselines
    import compute_savings
    import shapes

    return baselines, compute_savings, shapes


@pytest.mark.parametrize("shape_name", ["mnist-k2-l2", "mnist-k8-l6", "wrn-pmoe", "large"])
def test_saved_for_backward_below_dense(bench_modules, shape_name):
    """Memory kept for backward (compute_savings' count: unique storages, parameters excluded)
    is below the dense conv's for every benchmark layer, at a small batch."""
    baselines, compute_savings, shapes = bench_modules
    shape = shapes.SHAPES[shape_name]
    x = torch.randn(shape.input_shape(2), requires_grad=True)
    saved = {}
    for kind in ("dense", "torch"):
        layer = baselines.make_layer(shape, kind)
        baselines.randomize_router(layer)
        saved[kind] = compute_savings.saved_bytes(lambda: layer(x).sum(), exclude=list(layer.parameters()))
    assert 0 < saved["torch"] < saved["dense"], saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_topk_keys_select_like_the_stable_sort(dtype):
    """n >= 32 selects by top-k of integer keys: the same choice as the stable descending sort,
    ties to the lower index, NaN above +inf, -0.0 equal to +0.0."""
    from pmoe.routing import _TOPK_MIN_N, select_top_l

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 3, 2 * _TOPK_MIN_N, generator=g) * 2).round() / 2  # many exact ties
    s[0, 0, :7] = float("nan")
    s[1, 1, 3:9] = 0.0
    s[1, 1, 9:15] = -0.0
    s[2, 2, ::5] = float("inf")
    s[3, 0, ::3] = -float("inf")
    s[4] = 1.0  # all equal
    s = s.to(dtype)
    for l in (1, 5, s.shape[-1]):
        want = torch.sort(s.double(), dim=-1, descending=True, stable=True).indices[..., :l]
        assert torch.equal(select_top_l(s, l), want), l

"""kernels/forward.py and kernels/backward.py, through the layer in Triton's interpreter, against the
float64 reference: outputs and every gradient.

Tolerances: fp32 kernels vs the float64 reference: relative error (max |a-b| / max |b|) < 1e-4
for outputs and every gradient; bf16 < 3e-2 and fp16 < 5e-3 against the torch path run in the
same dtype (both round; the kernels accumulate in fp32).  Chosen patches must match exactly:
routers are N(0, 1) so fp32 vs fp64 rounding cannot flip a choice, and exact ties are tested
with integer-valued data.
"""
import itertools

import pytest
import torch

triton = pytest.importorskip("triton")

import pmoe  # noqa: E402
from pmoe.reference import reference_conv2d, reference_patches  # noqa: E402
from pmoe.routing import select_top_l  # noqa: E402
from helpers import check_deterministic, grads as _grads, params as _params, rel_err  # noqa: E402

F64 = torch.float64
TOL = 1e-4


def _conv(x, router, weight, bias, p, l, combine, gate, activation="relu", backend="triton", det=False):
    return pmoe.pmoe_conv2d(x, router, weight, bias, patch_size=p, top_l=l, combine=combine, gate=gate,
                            activation=activation, backend=backend, deterministic=det, return_routing=True)


def _check_against_reference(x, router, weight, bias, p, l, combine, gate, activation="relu", det=False):
    y, routing = _conv(x, router, weight, bias, p, l, combine, gate, activation, det=det)
    d64 = lambda t: None if t is None else t.detach().double().requires_grad_()  # noqa: E731
    x64, r64, w64, b64 = d64(x), d64(router), d64(weight), d64(bias)
    y_ref, idx_ref, g_ref = reference_conv2d(x64, r64, w64, b64, p, l, combine, gate, activation)
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    assert torch.equal(routing.indices, idx_ref)
    assert rel_err(routing.gates, g_ref) < TOL
    assert rel_err(y, y_ref) < TOL
    params = [x, router, weight] + ([bias] if bias is not None else [])
    params64 = [x64, r64, w64] + ([b64] if bias is not None else [])
    for name, a, b in zip(["x", "router", "weight", "bias"], _grads(y, params), _grads(y_ref, params64)):
        if gate == "indicator" and name == "router":
            assert a is None or a.abs().max() == 0
            continue
        assert a is not None and a.shape == b.shape, name
        assert rel_err(a, b) < TOL, (name, rel_err(a, b))
    return y, routing


CASES = [
    # B, C, H, W, p, k, m, l
    (2, 3, 8, 8, 2, 4, 2, 5),     # n = 16
    (1, 2, 6, 9, 3, 3, 2, 1),     # B = 1, n = 6 (not a power of two), l = 1
    (3, 1, 4, 4, 1, 2, 3, 16),    # p = 1, l = n
    (2, 5, 6, 6, 3, 2, 5, 3),     # d = 45: not a multiple of the block
    (1, 2, 18, 18, 2, 2, 2, 20),  # n = 81: the dX programs take two steps of 64 patches
    (1, 2, 16, 16, 2, 2, 2, 40),  # l = 40 > a tile's 32 rows (fp32): launch 2's dX programs add dS, not the tiles
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}H{}W{}p{}k{}m{}l{}".format(*c))
@pytest.mark.parametrize("combine,gate", list(itertools.product(["concat", "sum"], ["softmax", "indicator", "softmax_all"])))
def test_matches_reference(case, combine, gate):
    B, C, H, W, p, k, m, l = case
    bias = (gate != "indicator") ^ (combine == "sum")  # both with and without bias across the grid
    router, weight, b = _params(C, p, k, m, bias)
    x = torch.randn(B, C, H, W, requires_grad=True)
    _check_against_reference(x, router, weight, b, p, l, combine, gate)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "identity"])
def test_activations(activation):
    router, weight, b = _params(2, 2, 3, 4, True)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    _check_against_reference(x, router, weight, b, 2, 3, "sum", "softmax", activation)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "permuted"])
def test_strided_inputs(layout):
    router, weight, b = _params(3, 2, 3, 2, True)
    base = torch.randn(2, 3, 8, 12)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(2, 3, 8, 24)[..., ::2]  # W stride 2
    else:
        x = torch.randn(2, 8, 3, 12).permute(0, 2, 1, 3)  # H and C strides swapped
    assert not x.is_contiguous()
    x.requires_grad_()
    _check_against_reference(x, router, weight, b, 2, 4, "concat", "softmax_all")


@pytest.mark.parametrize("gate", ["softmax", "softmax_all"])
def test_channels_last_runs_of_channels(gate):
    """Channels-last input with p > 1: the route's d-loop steps through patches in runs of
    channels ((py, px, c) order) and the dX programs take 64 patches x 64 features a step.  C = 20
    is not a multiple of the 16-feature step (steps straddle (py, px) boundaries) and n = 81
    needs two dX steps."""
    router, weight, b = _params(20, 2, 3, 4, True)
    x = torch.randn(2, 20, 18, 18).contiguous(memory_format=torch.channels_last).requires_grad_()
    _check_against_reference(x, router, weight, b, 2, 7, "concat", gate)


def test_patch_taken_by_every_expert_and_by_none():
    C, p, k, m, l = 2, 2, 3, 2, 2
    router, weight, b = _params(C, p, k, m, True)
    with torch.no_grad():
        router[:] = router[0]  # identical routers: every expert takes the same l patches
    x = torch.randn(2, C, 8, 8, requires_grad=True)
    y, routing = _check_against_reference(x, router, weight, b, p, l, "sum", "softmax")
    load = routing.patch_load()
    assert (load == k).sum() == 2 * l and (load == 0).sum() == 2 * (16 - l)
    untaken = (load == 0).view(2, 4, 4)
    assert (y.permute(0, 2, 3, 1)[untaken] == 0).all()
    _check_against_reference(x, router, weight, b, p, l, "concat", "softmax_all")


def test_token_form_module():
    torch.manual_seed(3)
    layer = pmoe.PMoE(12, 6, num_experts=3, top_l=4, combine="concat", bias=True, backend="triton")
    torch.nn.init.normal_(layer.router)
    x = torch.randn(2, 10, 12, requires_grad=True)
    y, routing = layer(x, return_routing=True)
    x64 = x.detach().double().requires_grad_()
    p64 = [t.detach().double().requires_grad_() for t in (layer.router, layer.weight, layer.bias)]
    y_ref, idx_ref, _ = reference_patches(x64, *p64, 4, "concat", "softmax", "relu")
    assert torch.equal(routing.indices, idx_ref)
    assert rel_err(y, y_ref) < TOL
    params = [x, layer.router, layer.weight, layer.bias]
    for a, b in zip(_grads(y, params), _grads(y_ref, [x64] + p64)):
        assert rel_err(a, b) < TOL


def test_larger_n_sort():
    """n = 100 tokens (sort over 128 lanes, zero-fill over several chunks), l = 37."""
    layer = pmoe.PMoE(8, 4, num_experts=2, top_l=37, combine="concat", backend="triton")
    torch.nn.init.normal_(layer.router)
    x = torch.randn(1, 100, 8)
    y, routing = layer(x, return_routing=True)
    y_ref, idx_ref, _ = reference_patches(x.double(), layer.router.double(), layer.weight.double(), None, 37)
    assert torch.equal(routing.indices, idx_ref)
    assert rel_err(y, y_ref) < TOL


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_half_precision_vs_torch(dtype, tol, combine):
    router, weight, b = _params(3, 2, 3, 4, True, dtype)
    x = torch.randn(2, 3, 8, 8).to(dtype).requires_grad_()
    y, routing = _conv(x, router, weight, b, 2, 5, combine, "softmax", "gelu")
    y_t, routing_t = _conv(x, router, weight, b, 2, 5, combine, "softmax", "gelu", backend="torch")
    assert y.dtype == dtype
    assert torch.equal(routing.indices, routing_t.indices)
    assert rel_err(y, y_t) < tol
    params = [x, router, weight, b]
    for name, a, c in zip("x router weight bias".split(), _grads(y, params), _grads(y_t, params)):
        assert a.dtype == dtype
        assert rel_err(a, c) < 2 * tol, name


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_and_inf_isolated_per_image():
    router, weight, b = _params(2, 2, 3, 2, False)
    x = torch.randn(3, 2, 6, 6)
    y_clean, _ = _conv(x, router, weight, b, 2, 4, "sum", "softmax_all")
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    bad[1, 1, 2:4, 2:4] = float("inf")
    bad[1, 0, 4, 4] = float("-inf")
    y, routing = _conv(bad, router, weight, b, 2, 4, "sum", "softmax_all")
    assert torch.equal(y[2], y_clean[2])  # the clean image is untouched
    idx = routing.indices
    assert ((idx >= 0) & (idx < 9)).all()
    for row in idx.view(-1, 4):  # distinct patches per (image, expert)
        assert row.unique().numel() == 4
    # the selection of the NaN/inf images follows torch's order (NaN above +inf, ties low)
    xp = pmoe.torch_backend.patches_from_map(bad, 2)
    scores = torch.matmul(xp, router.detach().t()).transpose(1, 2)
    assert torch.equal(idx, select_top_l(scores, 4))


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_selection_order_special_values():
    """NaN > +inf > finite > -inf; -0.0 ties +0.0 (lower index first); ties to lower index."""
    vals = [0.0, -0.0, 1.0, float("nan"), -1.0, float("inf"), 1.0, float("-inf"), -0.0, 0.0, 2.0, 1.0]
    x = torch.tensor(vals).view(1, len(vals), 1)
    router = torch.ones(1, 1)
    weight = torch.ones(1, 1, 1)
    for l in (1, 5, 9, len(vals)):
        _, routing = pmoe.functional.pmoe(x, router, weight, top_l=l, gate="indicator", backend="triton", return_routing=True)
        expected = select_top_l(x.view(1, 1, -1), l)
        assert torch.equal(routing.indices, expected), l


def test_exact_ties():
    # router all zeros: every score is 0, every expert takes patches 0..l-1, uniform gates
    router, weight, b = _params(2, 2, 3, 2, True)
    with torch.no_grad():
        router.zero_()
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    y, routing = _check_against_reference(x, router, weight, b, 2, 5, "concat", "softmax")
    assert torch.equal(routing.indices, torch.arange(5).expand(2, 3, 5))
    assert torch.allclose(routing.gates, torch.full((2, 3, 5), 0.2))
    # integer-valued data: many exact ties among nonzero scores
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-2, 3, (2, 2, 8, 8), generator=g).float().requires_grad_()
    with torch.no_grad():
        router.copy_(torch.randint(-1, 2, router.shape, generator=g).float())
    y, routing = _check_against_reference(x, router, weight, b, 2, 6, "sum", "softmax_all")
    _, routing_t = _conv(x, router, weight, b, 2, 6, "sum", "softmax_all", backend="torch")
    assert torch.equal(routing.indices, routing_t.indices)


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_deterministic_bit_identical(combine):
    router, weight, b = _params(2, 2, 4, 3, True)
    with torch.no_grad():
        router[1] = router[0]  # shared patches: the accumulation order matters
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    check_deterministic(lambda det: _conv(x, router, weight, b, 2, 6, combine, "softmax_all", "silu", det=det)[0],
                        [x, router, weight, b])


def test_routing_gates_and_fp32_buffers_not_leaked():
    router, weight, _ = _params(2, 2, 2, 2, False)
    x = torch.randn(1, 2, 4, 4)
    y, routing = _conv(x, router, weight, None, 2, 2, "concat", "softmax")
    assert y.permute(0, 2, 3, 1).is_contiguous()  # a (B, out, h, w) view of the contiguous (B, n, out) result
    assert not routing.gates.requires_grad
    assert routing.gates.dtype == x.dtype and routing.indices.dtype == torch.int64
    assert torch.allclose(routing.gates.sum(-1), torch.ones(1, 2))

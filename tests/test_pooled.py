"""The pooled layer (the layer's output summed over all patches, (B, out), never the map):
torch path and fused kernels (Triton's interpreter) against the float64 reference summed over
patches, outputs and every gradient; the classifier that uses it; the custom op's integration
(saved tensors, stride-0 gradient, FLOPs, fake impl); the new kernels' cubins for sm_90/sm_80.

Tolerance as tests/test_forward_backward.py: fp32 vs float64, relative error (max |a-b| / max |b|) < 1e-4.
"""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pmoe
from pmoe.functional import pmoe_conv2d_pooled, pmoe_pooled
from pmoe.models import PMoEClassifier
from pmoe.reference import reference_conv2d, reference_patches
from helpers import check_deterministic, grads as _grads, params as _params, rel_err

TOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not pmoe.triton_available(), reason="no triton"))]


def _pooled(x, router, weight, bias, p, l, combine, gate, backend, det=False, activation="relu"):
    return pmoe_conv2d_pooled(x, router, weight, bias, patch_size=p, top_l=l, combine=combine, gate=gate,
                              activation=activation, backend=backend, deterministic=det, return_routing=True)


def _d64(t):
    return None if t is None else t.detach().double().requires_grad_()


CASES = [
    # B, C, H, W, p, k, m, l
    (2, 3, 8, 8, 2, 4, 2, 5),     # n = 16, tiles span images
    (1, 2, 6, 9, 3, 3, 2, 1),     # B = 1, n = 6 (not a power of two), l = 1
    (3, 1, 4, 4, 1, 2, 3, 16),    # p = 1, l = n
    (5, 5, 6, 6, 3, 2, 5, 1),     # d = 45 (not a multiple of the block), l = 1: one image per row
    (2, 1, 8, 6, 1, 2, 2, 37),    # l = 37 > BLOCK_R: one image's rows span several row tiles
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}H{}W{}p{}k{}m{}l{}".format(*c))
@pytest.mark.parametrize("combine,gate",
                         list(itertools.product(["concat", "sum"], ["softmax", "indicator", "softmax_all"])))
def test_pooled_matches_reference(backend, case, combine, gate):
    B, C, H, W, p, k, m, l = case
    bias = (gate != "indicator") ^ (combine == "sum")  # with and without bias across the grid
    router, weight, b = _params(C, p, k, m, bias)
    x = torch.randn(B, C, H, W, requires_grad=True)
    det = gate == "softmax_all"  # the deterministic kernels at every size too
    y, routing = _pooled(x, router, weight, b, p, l, combine, gate, backend, det)

    params64 = [_d64(t) for t in (x, router, weight, b)]
    y_map, idx_ref, g_ref = reference_conv2d(*params64, p, l, combine, gate)
    y_ref = y_map.sum((2, 3))
    assert y.shape == y_ref.shape == (B, k * m if combine == "concat" else m) and y.dtype == x.dtype
    assert torch.equal(routing.indices, idx_ref)
    assert rel_err(routing.gates, g_ref) < TOL
    assert rel_err(y, y_ref) < TOL
    names = ["x", "router", "weight", "bias"][:3 + bias]
    for name, a, r in zip(names, _grads(y, [x, router, weight, b]), _grads(y_ref, params64)):
        if gate == "indicator" and name == "router":
            assert a is None or a.abs().max() == 0
            continue
        assert a is not None and a.shape == r.shape, name
        assert rel_err(a, r) < TOL, (name, rel_err(a, r))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_token_form_and_module(backend, combine):
    torch.manual_seed(3)
    layer = pmoe.PMoE(12, 6, num_experts=3, top_l=4, combine=combine, bias=True, backend=backend,
                      activation="gelu")
    torch.nn.init.normal_(layer.router)
    x = torch.randn(2, 10, 12, requires_grad=True)
    y, routing = layer.forward_pooled(x, return_routing=True)
    x64, *p64 = (_d64(t) for t in (x, layer.router, layer.weight, layer.bias))
    y_map, idx_ref, _ = reference_patches(x64, *p64, 4, combine, "softmax", "gelu")
    y_ref = y_map.sum(1)
    assert torch.equal(routing.indices, idx_ref)
    assert rel_err(y, y_ref) < TOL
    params = [x, layer.router, layer.weight, layer.bias]
    for a, r in zip(_grads(y, params), _grads(y_ref, [x64] + p64)):
        assert rel_err(a, r) < TOL
    # the functional token form is the same computation
    y_f = pmoe_pooled(x, layer.router, layer.weight, layer.bias, top_l=4, combine=combine, activation="gelu",
                      backend=backend)
    assert torch.equal(y_f, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_pooled_equals_unpooled_sum(backend, combine):
    """Same backend, same routing; only the order of the sum over patches differs."""
    layer = pmoe.PMoEConv2d(3, 8, 2, num_experts=4, top_l=0.5, combine=combine, bias=True, backend=backend,
                            activation="silu")
    torch.nn.init.normal_(layer.router)
    x = torch.randn(3, 3, 10, 6, requires_grad=True)  # n = 15
    pooled, r_pooled = layer.forward_pooled(x, return_routing=True)
    y, r = layer(x, return_routing=True)
    assert torch.equal(r.indices, r_pooled.indices) and torch.equal(r.gates, r_pooled.gates)
    assert rel_err(pooled, y.sum((2, 3))) < 1e-6
    params = [x, layer.router, layer.weight, layer.bias]
    for a, c in zip(_grads(pooled, params), _grads(y.sum((2, 3)), params)):
        assert rel_err(a, c) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_deterministic_bit_identical(backend, combine):
    router, weight, b = _params(2, 2, 4, 3, True)
    with torch.no_grad():
        router[1] = router[0]  # shared patches: the accumulation order matters
    x = torch.randn(3, 2, 8, 8, requires_grad=True)
    check_deterministic(lambda det: _pooled(x, router, weight, b, 2, 6, combine, "softmax_all", backend, det=det,
                                            activation="silu")[0], [x, router, weight, b])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_image_does_not_reach_other_images(backend, det):
    """A tile of the atomic kernel holds rows of several images (l = 1 here: up to BLOCK_R):
    a NaN/inf image must leave every other image's sum exactly as it was."""
    router, weight, b = _params(2, 2, 3, 2, True)
    x = torch.randn(4, 2, 6, 6)
    clean, _ = _pooled(x, router, weight, b, 2, 1, "sum", "softmax", backend, det)
    bad = x.clone()
    bad[1] = float("nan")
    bad[2, 0, 0, 0] = float("inf")
    y, routing = _pooled(bad, router, weight, b, 2, 1, "sum", "softmax", backend, det)
    assert torch.equal(y[[0, 3]], clean[[0, 3]])
    assert ((routing.indices >= 0) & (routing.indices < 9)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    router, weight, _ = _params(2, 2, 3, 2, False)
    y = pmoe_conv2d_pooled(torch.randn(0, 2, 4, 4), router, weight, patch_size=2, top_l=2, backend=backend)
    assert y.shape == (0, 6)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_vs_torch(dtype, tol):
    pytest.importorskip("triton")
    router, weight, b = _params(3, 2, 3, 4, True, dtype)
    x = torch.randn(2, 3, 8, 8).to(dtype).requires_grad_()
    y, routing = _pooled(x, router, weight, b, 2, 5, "concat", "softmax", "triton", activation="gelu")
    y_t, routing_t = _pooled(x, router, weight, b, 2, 5, "concat", "softmax", "torch", activation="gelu")
    assert y.dtype == dtype and torch.equal(routing.indices, routing_t.indices)
    assert rel_err(y, y_t) < tol
    params = [x, router, weight, b]
    for name, a, c in zip("x router weight bias".split(), _grads(y, params), _grads(y_t, params)):
        assert a.dtype == dtype and rel_err(a, c) < 2 * tol, name


# ---------------------------------------------------------------- the paper's classifier


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12), ("torch", torch.float32, 1e-6),
                                               pytest.param("triton", torch.float32, 1e-6, marks=BACKENDS[1].marks)])
def test_classifier_output_unchanged(backend, dtype, tol):
    """PMoEClassifier now pools inside the layer; its logits and gradients are those of the
    layer's map summed over patches (the previous forward), up to the order of the sum."""
    torch.manual_seed(0)
    model = PMoEClassifier(2, 4, num_experts=3, top_l=5, neurons_per_expert=4, backend=backend).to(dtype)
    torch.nn.init.normal_(model.moe.router)
    x = torch.randn(6, 2, 16, 12, dtype=dtype)  # n = 12
    logit, routing = model(x, return_routing=True)
    h, routing_map = model.moe(x, return_routing=True)
    before = (h.sum((2, 3)) / routing_map.top_l) @ model.head
    assert logit.shape == (6,) and logit.dtype == dtype
    assert torch.equal(routing.indices, routing_map.indices)
    assert rel_err(logit, before) < tol
    params = list(model.parameters())
    for a, c in zip(torch.autograd.grad(logit.square().sum(), params),
                    torch.autograd.grad(before.square().sum(), params)):
        assert rel_err(a, c) < 10 * tol


# ---------------------------------------------------------------- the custom op (triton)


def _triton_layer(combine="concat", gate="softmax", bias=True):
    pytest.importorskip("triton")
    layer = pmoe.PMoEConv2d(3, 8, 2, num_experts=4, top_l=3, combine=combine, gate=gate, bias=bias,
                            backend="triton")
    torch.nn.init.normal_(layer.router)
    return layer


@pytest.mark.parametrize("gate", ["softmax", "softmax_all"])
def test_saved_tensors_and_stride0_gradient(gate, monkeypatch):
    """The op keeps the inputs, idx, gates, inv, scores / lse (scores empty but for softmax_all)
    and the pre-activations (B, k, l, m), and nothing of the unpooled output's size; its backward
    hands the kernels the (B, out) gradient as a stride-0 view."""
    from pmoe.kernels import launch

    layer = _triton_layer(gate=gate)
    B, k, l, n, out = 2, 4, 3, 12, 8
    x = torch.randn(B, 3, 8, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer.forward_pooled(x)
    shapes = sorted(tuple(t.shape) for t in saved)
    want = [tuple(x.shape), (k, 12), (k, 2, 12), (k, 2), (B, k, l), (B, k, l), (B, k, n),  # x, params, idx, gates, inv
            (B, k, n if gate == "softmax_all" else 0), (B, k), (B, k, l, 2)]  # scores, lse, pre
    assert shapes == sorted(want)

    seen = {}
    guard = launch.device_guard

    def spy(first):  # launch.backward's first argument, dy, as the device guard sees it
        seen["shape"], seen["stride"], seen["bytes"] = tuple(first.shape), first.stride(), first.untyped_storage().nbytes()
        return guard(first)

    monkeypatch.setattr(launch, "device_guard", spy)
    y.sum().backward()
    assert seen["shape"] == (B, n, out) and seen["stride"] == (out, 0, 1)
    assert seen["bytes"] == B * out * 4  # only the (B, out) gradient exists


def test_flops_and_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from pmoe.kernels import op as kop

    layer = _triton_layer(gate="softmax")
    B, n, d, k, m, l = 2, 12, 12, 4, 2, 3
    x = torch.randn(B, 3, 8, 6, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y = layer.forward_pooled(x)
    assert counter.get_total_flops() == 2 * B * n * d * k + 2 * B * k * l * d * m
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    assert counter.get_total_flops() == 2 * (2 * B * k * l * d * m) + 2 * (2 * B * k * l * d)

    args = (x.detach(), layer.router.detach(), layer.weight.detach().reshape(k, m, d), layer.bias.detach())
    real = kop.fused_fwd(*args, 2, l, "sum", "softmax_all", "gelu", False, True)
    with FakeTensorMode() as mode:
        fake = kop.fused_fwd(*(mode.from_tensor(t) for t in args), 2, l, "sum", "softmax_all", "gelu", False, True)
    assert real[0].shape == (B, m)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype


def test_torch_compile_no_graph_break():
    layer = _triton_layer()
    torch._dynamo.reset()
    fn = lambda t: layer.forward_pooled(t).relu().sum(1)  # noqa: E731
    x = torch.randn(2, 3, 8, 6, requires_grad=True)
    explanation = torch._dynamo.explain(fn)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y_c, y_e = compiled(x), fn(x)
    assert torch.equal(y_c, y_e)
    grads_c = torch.autograd.grad(y_c.sum(), [x, layer.weight])
    for a, c in zip(grads_c, torch.autograd.grad(y_e.sum(), [x, layer.weight])):
        assert torch.equal(a, c)
    torch._dynamo.reset()


# ---------------------------------------------------------------- cubins for sm_90 / sm_80


@pytest.mark.parametrize("arch", [90, 80])
def test_pooled_kernels_compile_without_spills(arch):
    """Every launch of the pooled problems (kernels/registry.py) in fp32, the register-hungry dtype
    (tf32x3 dots; 16-bit: test_compile_report's quick run and the full `compile_report.py`);
    compile_report exits non-zero on a failure or a spill."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_report.py"), "--arch", str(arch),
                           "--match", "pooled", "--dtypes", "fp32"],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 failed" in proc.stdout
    assert "\nforward          pooled" in proc.stdout

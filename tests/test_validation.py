"""Bad input fails early and clearly; odd but valid input works.

Every rejection is checked for its exception type and for the values it names, and, with both
backends replaced by spies, for being raised before any computation starts.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pmoe.functional as PF
from pmoe import PMoE, PMoEConv2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(k=2, m=3, C=2, p=2, bias=True, dtype=torch.float32, device="cpu"):
    fk = dict(dtype=dtype, device=device)
    d = C * p * p
    return (torch.randn(k, d, **fk), torch.randn(k, m, C, p, p, **fk),
            torch.randn(k, m, **fk) if bias else None)


@pytest.fixture
def no_backend(monkeypatch):
    """Replace both compute paths with spies that record any call, so a test can assert that a
    rejection happened before the computation (for the Triton path: before any kernel launch)."""
    calls = []

    def spy(name):
        def f(*a, **kw):
            calls.append(name)
            raise AssertionError(f"{name} reached on invalid input")
        return f

    for name in PF.BACKENDS:
        monkeypatch.setitem(PF.BACKENDS, name, spy(name))
    return calls


# ---------------------------------------------------------------- the functional form, feature maps

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "case, exc, words",
    [
        ("H not divisible", ValueError, ["H=5", "W=4", "patch_size=2"]),
        ("W not divisible", ValueError, ["H=4", "W=7", "patch_size=2"]),
        ("top_l 0", ValueError, ["top_l", ">= 1", "0"]),
        ("top_l > n", ValueError, ["n = 4", "got 5"]),
        ("fraction 0", ValueError, ["(0, 1]", "0.0"]),
        ("fraction 1.5", ValueError, ["(0, 1]", "1.5"]),
        ("fraction nan", ValueError, ["(0, 1]", "nan"]),
        ("top_l bool", TypeError, ["top_l", "bool"]),
        ("top_l str", TypeError, ["top_l", "str"]),
        ("channels", ValueError, ["3 channels", "expects 2"]),
        ("rank 3", ValueError, ["4-D", "(2, 4, 4)"]),
        ("rank 5", ValueError, ["4-D", "(1, 2, 2, 4, 4)"]),
        ("integer input", TypeError, ["floating", "torch.int64"]),
        ("bool input", TypeError, ["floating", "torch.bool"]),
        ("complex input", TypeError, ["floating", "torch.complex64"]),
        ("dtype mismatch", TypeError, ["torch.float64", "torch.float32", "autocast"]),
        ("integer router", TypeError, ["router", "torch.int64"]),
        ("device mismatch", ValueError, ["meta", "cpu", "router"]),
        ("combine", ValueError, ["combine", "'mean'", "concat"]),
        ("gate", ValueError, ["gate", "'top1'", "softmax"]),
        ("activation", ValueError, ["activation", "'tanh'", "relu"]),
        ("backend", ValueError, ["backend", "'cuda'", "triton"]),
        ("patch_size 0", ValueError, ["patch_size", "0"]),
        ("patch_size float", ValueError, ["patch_size", "2.0"]),
        ("weight patch", ValueError, ["weight", "(2, 3, 2, 3, 3)"]),
        ("router shape", ValueError, ["router", "(num_experts, 8)", "(2, 9)"]),
        ("experts mismatch", ValueError, ["weight has 2 experts", "router has 3"]),
        ("bias shape", ValueError, ["bias", "(2, 3)", "(3,)"]),
        ("no outputs", ValueError, ["0 output channels"]),
        ("empty spatial", ValueError, ["empty", "0x4"]),
        ("not a tensor", TypeError, ["torch.Tensor", "list"]),
    ],
)
def test_conv2d_rejects(no_backend, backend, case, exc, words):
    router, weight, bias = _params()
    x = torch.randn(2, 2, 4, 4)
    kw = dict(patch_size=2, top_l=2, backend=backend)
    if case == "H not divisible":
        x = torch.randn(2, 2, 5, 4)
    elif case == "W not divisible":
        x = torch.randn(2, 2, 4, 7)
    elif case == "top_l 0":
        kw["top_l"] = 0
    elif case == "top_l > n":
        kw["top_l"] = 5
    elif case == "fraction 0":
        kw["top_l"] = 0.0
    elif case == "fraction 1.5":
        kw["top_l"] = 1.5
    elif case == "fraction nan":
        kw["top_l"] = float("nan")
    elif case == "top_l bool":
        kw["top_l"] = True
    elif case == "top_l str":
        kw["top_l"] = "2"
    elif case == "channels":
        x = torch.randn(2, 3, 4, 4)
    elif case == "rank 3":
        x = torch.randn(2, 4, 4)
    elif case == "rank 5":
        x = torch.randn(1, 2, 2, 4, 4)
    elif case == "integer input":
        x = torch.ones(2, 2, 4, 4, dtype=torch.int64)
    elif case == "bool input":
        x = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    elif case == "complex input":
        x = torch.randn(2, 2, 4, 4, dtype=torch.complex64)
    elif case == "dtype mismatch":
        x = x.double()
    elif case == "integer router":
        router = router.long()
    elif case == "device mismatch":
        x = x.to("meta")
    elif case in ("combine", "gate", "activation", "backend"):
        kw[case] = {"combine": "mean", "gate": "top1", "activation": "tanh", "backend": "cuda"}[case]
    elif case == "patch_size 0":
        kw["patch_size"] = 0
    elif case == "patch_size float":
        kw["patch_size"] = 2.0
    elif case == "weight patch":
        weight = torch.randn(2, 3, 2, 3, 3)
    elif case == "router shape":
        router = torch.randn(2, 9)
    elif case == "experts mismatch":
        router = torch.randn(3, 8)
    elif case == "bias shape":
        bias = torch.randn(3)
    elif case == "no outputs":
        weight, bias = torch.randn(2, 0, 2, 2, 2), None
    elif case == "empty spatial":
        x = torch.randn(2, 2, 0, 4)
    elif case == "not a tensor":
        x = x.tolist()
    with pytest.raises(exc) as info:
        PF.pmoe_conv2d(x, router, weight, bias, **kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert no_backend == []


@pytest.mark.parametrize(
    "case, exc, words",
    [
        ("rank 4", ValueError, ["3-D", "(2, 4, 1, 8)"]),
        ("features", ValueError, ["7 features", "expects 8"]),
        ("no patches", ValueError, ["n = 0"]),
        ("top_l > n", ValueError, ["n = 4", "got 9"]),
        ("weight rank", ValueError, ["(k, m, d)", "(2, 3, 2, 2, 2)"]),
        ("float16 vs float32", TypeError, ["torch.float16", "torch.float32"]),
    ],
)
def test_patches_rejects(no_backend, case, exc, words):
    router, weight, bias = torch.randn(2, 8), torch.randn(2, 3, 8), None
    x = torch.randn(2, 4, 8)
    top_l = 2
    if case == "rank 4":
        x = torch.randn(2, 4, 1, 8)
    elif case == "features":
        x = torch.randn(2, 4, 7)
    elif case == "no patches":
        x = torch.randn(2, 0, 8)
    elif case == "top_l > n":
        top_l = 9
    elif case == "weight rank":
        weight = torch.randn(2, 3, 2, 2, 2)
    elif case == "float16 vs float32":
        x = x.half()
    with pytest.raises(exc) as info:
        PF.pmoe(x, router, weight, bias, top_l=top_l)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"
    assert no_backend == []


# ---------------------------------------------------------------- the modules

@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(out_channels=10, num_experts=4), ValueError, ["10", "4", "divisible"]),
        (dict(top_l=0), ValueError, ["top_l", "0"]),
        (dict(top_l=-3), ValueError, ["top_l", "-3"]),
        (dict(top_l=1.01), ValueError, ["(0, 1]", "1.01"]),
        (dict(top_l=0.0), ValueError, ["(0, 1]"]),
        (dict(top_l=None), TypeError, ["top_l", "NoneType"]),
        (dict(num_experts=0), ValueError, ["num_experts", "0"]),
        (dict(in_channels=0), ValueError, ["in_channels", "0"]),
        (dict(patch_size=True), ValueError, ["patch_size", "True"]),
        (dict(combine="max"), ValueError, ["combine", "'max'"]),
        (dict(gate="sigmoid"), ValueError, ["gate", "'sigmoid'"]),
        (dict(activation="tanh"), ValueError, ["activation", "'tanh'"]),
        (dict(backend="cuda"), ValueError, ["backend", "'cuda'"]),
    ],
)
def test_layer_constructor_rejects(kwargs, exc, words):
    args = dict(in_channels=2, out_channels=8, patch_size=2, num_experts=2, top_l=2)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        PMoEConv2d(**args)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"


def test_layer_accepts_sum_with_indivisible_outputs_and_numpy_top_l():
    # "sum" gives every expert all out_channels, so divisibility does not apply
    layer = PMoEConv2d(2, 10, 2, 4, top_l=np.int64(2), combine="sum")
    assert layer.top_l == 2 and type(layer.top_l) is int
    assert layer(torch.randn(1, 2, 4, 4)).shape == (1, 10, 2, 2)
    assert PMoE(8, 6, 3, top_l=np.float32(0.5))(torch.randn(2, 4, 8)).shape == (2, 4, 6)


def test_layer_forward_errors_name_values(no_backend):
    layer = PMoEConv2d(3, 8, 2, 2, top_l=3)
    with pytest.raises(ValueError, match=r"n = 2 .* got 3"):  # 2x4 map -> 1x2 grid
        layer(torch.randn(1, 3, 2, 4))
    with pytest.raises(ValueError, match="4 channels but the layer expects 3"):
        layer(torch.randn(1, 4, 4, 4))
    with pytest.raises(TypeError, match="float64 does not match router dtype torch.float32"):
        layer(torch.randn(1, 3, 4, 4, dtype=torch.float64))
    assert no_backend == []


def test_meta_device():
    """Input and parameters on different devices are rejected (meta vs cpu is the pair this CPU
    machine can test; the check is a plain device comparison, so cuda:0 vs cpu or cuda:0 vs
    cuda:1 take the same path).  On one device, meta tensors give shapes without computing."""
    layer = PMoEConv2d(3, 8, 2, 4, top_l=2, bias=True)
    with pytest.raises(ValueError, match="input is on meta but router is on cpu"):
        layer(torch.randn(2, 3, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="input is on cpu but router is on meta"):
        layer.to("meta")(torch.randn(2, 3, 4, 4))
    y, routing = layer(torch.randn(2, 3, 4, 4, device="meta"), return_routing=True)
    assert y.shape == (2, 8, 2, 2) and y.is_meta and routing.indices.shape == (2, 4, 2)


def test_mixed_dtypes_allowed_only_under_autocast():
    layer = PMoEConv2d(3, 8, 2, 2, top_l=2)
    x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        # autocast never casts float64, so float64 must not mix even under autocast
        with pytest.raises(TypeError, match="float64"):
            layer(x.double())


# ---------------------------------------------------------------- backend="triton" availability

def test_triton_without_cuda_or_interpreter(monkeypatch, no_backend):
    layer = PMoEConv2d(2, 4, 2, 2, top_l=1, backend="triton")
    x = torch.randn(1, 2, 4, 4)
    monkeypatch.setattr(PF, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA tensor .*cpu.*TRITON_INTERPRET=1"):
        layer(x)
    monkeypatch.setattr(PF, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="needs the triton package"):
        layer(x)
    assert no_backend == []


def test_triton_without_interpreter_env_in_subprocess():
    """The real environment check, in a fresh interpreter without TRITON_INTERPRET (conftest sets
    it for this process, and triton reads it at import)."""
    code = (
        "import torch, pmoe\n"
        "layer = pmoe.PMoEConv2d(2, 4, 2, 2, top_l=1, backend='triton')\n"
        "try:\n"
        "    layer(torch.randn(1, 2, 4, 4))\n"
        "except ValueError as e:\n"
        "    print('REJECTED', e)\n"
        "assert layer.__class__(2, 4, 2, 2, top_l=1)(torch.randn(1, 2, 4, 4)).shape == (1, 4, 2, 2)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "REJECTED backend='triton' needs a CUDA tensor (got one on cpu)" in out.stdout


def test_triton_rejects_float64(no_backend):
    router, weight, _ = _params(dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16, got torch.float64"):
        PF.pmoe_conv2d(torch.randn(1, 2, 4, 4, dtype=torch.float64), router, weight,
                       patch_size=2, top_l=1, backend="triton")
    assert no_backend == []


# ---------------------------------------------------------------- odd but valid input

@pytest.mark.parametrize("combine", ["concat", "sum"])
@pytest.mark.parametrize("gate", ["softmax", "indicator", "softmax_all"])
def test_empty_batch_forward_backward(combine, gate):
    layer = PMoEConv2d(3, 8, 2, 4, top_l=2, combine=combine, gate=gate, bias=True, backend="torch")
    x = torch.randn(0, 3, 4, 6, requires_grad=True)
    y, routing = layer(x, return_routing=True)
    assert y.shape == (0, 8, 2, 3) and y.dtype == x.dtype
    assert routing.indices.shape == (0, 4, 2) and routing.gates.shape == (0, 4, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in layer.named_parameters():  # an empty batch contributes exactly nothing
        if name == "router" and gate == "indicator":
            assert p.grad is None  # indicator gates are constant: the router is not in the graph
        else:
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    assert routing.stats()["unrouted_fraction"] == 0.0

    tok = PMoE(5, 6, 2, top_l=0.5, combine=combine, gate=gate, backend="torch")
    xt = torch.randn(0, 4, 5, requires_grad=True)
    yt = tok(xt)
    assert yt.shape == (0, 4, 6)
    yt.sum().backward()
    assert xt.grad.shape == xt.shape


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_noncontiguous_and_channels_last_match_contiguous(combine):
    layer = PMoEConv2d(3, 8, 2, 4, top_l=3, combine=combine, bias=True, backend="torch")
    x = torch.randn(2, 3, 6, 8)
    y, r = layer(x, return_routing=True)
    views = {
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
        "strided": torch.randn(2, 3, 12, 8)[:, :, ::2].copy_(x),
        "batch-strided": torch.randn(4, 3, 6, 8)[::2].copy_(x),
        "expanded channels": x[:, :1].expand(2, 3, 6, 8),
    }
    for name, xv in views.items():
        ref = y if name != "expanded channels" else layer(xv.contiguous())
        yv, rv = layer(xv, return_routing=True)
        assert torch.equal(yv, ref), name
        if name != "expanded channels":
            assert torch.equal(rv.indices, r.indices), name

    # the same for the gradient w.r.t. a channels-last input
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    xr = x.clone().requires_grad_()
    layer(xc).square().sum().backward()
    layer(xr).square().sum().backward()
    torch.testing.assert_close(xc.grad, xr.grad, rtol=0, atol=0)


def test_noncontiguous_tokens_match_contiguous():
    layer = PMoE(6, 8, 2, top_l=3, bias=True, backend="torch")
    x = torch.randn(3, 5, 6)
    y = layer(x)
    torch.testing.assert_close(layer(x.transpose(0, 1).contiguous().transpose(0, 1)), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(torch.randn(3, 5, 12)[..., ::2].copy_(x)), y, rtol=1e-6, atol=1e-6)

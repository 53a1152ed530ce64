"""Property tests (hypothesis): random shapes and configurations against the float64 reference,
and invariances that hold for every configuration.

Hypothesis draws the configuration and a seed; the tensors come from torch's generator with
that seed (continuous values, so exact score ties have probability zero; ties are
tests/test_layers.py's business).  derandomize=True keeps CI deterministic.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pmoe.functional as PF
from pmoe.reference import reference_conv2d

try:
    import pmoe.kernels  # noqa: F401

    HAVE_KERNELS = True
except ImportError:
    HAVE_KERNELS = False

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw, max_b: int = 3, max_grid: int = 3, max_k: int = 4):
    p = draw(st.integers(1, 3))
    hp, wp = draw(st.integers(1, max_grid)), draw(st.integers(1, max_grid))
    n = hp * wp
    return dict(
        B=draw(st.integers(1, max_b)), C=draw(st.integers(1, 3)), p=p, H=hp * p, W=wp * p, n=n,
        k=draw(st.integers(1, max_k)), m=draw(st.integers(1, 3)),
        l=draw(st.integers(1, n)),
        combine=draw(st.sampled_from(["concat", "sum"])),
        gate=draw(st.sampled_from(["softmax", "indicator", "softmax_all"])),
        activation=draw(st.sampled_from(["relu", "gelu", "silu", "identity"])),
        bias=draw(st.booleans()),
        router_std=draw(st.sampled_from([1e-3, 0.3, 3.0])),  # near-uniform to sharp gates
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _tensors(c: dict, dtype=torch.float64):
    g = torch.Generator().manual_seed(c["seed"])
    d = c["C"] * c["p"] ** 2
    x = torch.randn(c["B"], c["C"], c["H"], c["W"], generator=g, dtype=dtype)
    router = torch.randn(c["k"], d, generator=g, dtype=dtype) * c["router_std"]
    weight = torch.randn(c["k"], c["m"], c["C"], c["p"], c["p"], generator=g, dtype=dtype)
    bias = torch.randn(c["k"], c["m"], generator=g, dtype=dtype) if c["bias"] else None
    return x, router, weight, bias


def _call(c: dict, x, router, weight, bias, backend="torch"):
    return PF.pmoe_conv2d(x, router, weight, bias, patch_size=c["p"], top_l=c["l"], combine=c["combine"],
                          gate=c["gate"], activation=c["activation"], backend=backend, return_routing=True)


def _min_gap(c: dict, x, router) -> float:
    """Smallest relative gap between the l-th and (l+1)-th score of any (image, expert): how far
    the selection is from a tie that float32 rounding could flip."""
    xp = torch.nn.functional.unfold(x.double(), c["p"], stride=c["p"]).transpose(1, 2)
    s = (xp @ router.double().t()).transpose(1, 2).sort(-1, descending=True).values
    if c["l"] == c["n"]:
        return float("inf")
    gap = (s[..., c["l"] - 1] - s[..., c["l"]]) / s.abs().amax(-1).clamp_min(1e-30)
    return float(gap.min())


@settings(max_examples=100, **SETTINGS)
@given(configs())
def test_torch_backend_matches_reference(c):
    x, router, weight, bias = _tensors(c)
    y, r = _call(c, x, router, weight, bias)
    y_ref, idx_ref, g_ref = reference_conv2d(x, router, weight, bias, c["p"], c["l"], c["combine"],
                                             c["gate"], c["activation"])
    assert torch.equal(r.indices, idx_ref)
    torch.testing.assert_close(r.gates, g_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not HAVE_KERNELS, reason="pmoe.kernels needs triton")
@settings(max_examples=8, **SETTINGS)  # the interpreter runs kernels at Python speed
@given(configs(max_b=2, max_grid=2, max_k=3))
def test_triton_interpreter_matches_reference(c):
    x, router, weight, bias = _tensors(c, torch.float32)
    assume(_min_gap(c, x, router) > 1e-4)  # a float32 near-tie may legitimately flip
    y, r = _call(c, x, router, weight, bias, backend="triton")
    y_ref, idx_ref, g_ref = reference_conv2d(x.double(), router.double(), weight.double(),
                                             None if bias is None else bias.double(), c["p"], c["l"],
                                             c["combine"], c["gate"], c["activation"])
    assert torch.equal(r.indices, idx_ref)
    torch.testing.assert_close(r.gates.double(), g_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=50, **SETTINGS)
@given(configs(), st.data())
def test_permuting_images_permutes_outputs(c, data):
    x, router, weight, bias = _tensors(c)
    perm = torch.tensor(data.draw(st.permutations(range(c["B"]))))
    y, r = _call(c, x, router, weight, bias)
    yp, rp = _call(c, x[perm], router, weight, bias)
    assert torch.equal(rp.indices, r.indices[perm])
    torch.testing.assert_close(yp, y[perm], rtol=1e-13, atol=1e-13)


@settings(max_examples=50, **SETTINGS)
@given(configs(), st.integers(-20, 20), st.floats(1e-3, 1e3))
def test_positive_router_scale_keeps_the_selection(c, e, scale):
    """Scores scale with the router, so the order (the choice) cannot change.  A power of two
    scales every score exactly, so there the indices must match bit for bit; for any other
    positive scale they must match unless two scores were a rounding error apart."""
    x, router, weight, bias = _tensors(c)
    _, r = _call(c, x, router, weight, bias)
    _, r2 = _call(c, x, router * 2.0 ** e, weight, bias)
    assert torch.equal(r2.indices, r.indices)
    if _min_gap(c, x, router) > 1e-9:
        _, r3 = _call(c, x, router * scale, weight, bias)
        assert torch.equal(r3.indices, r.indices)


@settings(max_examples=50, **SETTINGS)
@given(configs(), st.integers(-20, 20))
def test_indicator_gate_ignores_router_scale(c, e):
    c = dict(c, gate="indicator")
    x, router, weight, bias = _tensors(c)
    y, _ = _call(c, x, router, weight, bias)
    y2, _ = _call(c, x, router * 2.0 ** e, weight, bias)
    assert torch.equal(y2, y)


@settings(max_examples=50, **SETTINGS)
@given(configs())
def test_experts_decompose(c):
    """Experts do not interact: a k-expert layer is k one-expert layers, concatenated along
    channels ("concat") or summed ("sum")."""
    x, router, weight, bias = _tensors(c)
    y, _ = _call(c, x, router, weight, bias)
    parts = [_call(c, x, router[s:s + 1], weight[s:s + 1], None if bias is None else bias[s:s + 1])[0]
             for s in range(c["k"])]
    expect = torch.cat(parts, 1) if c["combine"] == "concat" else torch.stack(parts).sum(0)
    torch.testing.assert_close(y, expect, rtol=1e-12, atol=1e-12)

"""pmoe.profiling's ranges around the layer's phases: with profiling on, a
torch.profiler trace taken on CPU names every phase of the forward and the backward, for the
torch path and the fused kernels (Triton's interpreter); with it off, nvtx_range is the shared
no-op and nothing is recorded or hooked."""
import json

import pytest
import torch

import pmoe
from pmoe import profiling

TORCH_FWD = {"pmoe.scores", "pmoe.select", "pmoe.experts", "pmoe.combine"}
TORCH_BWD = {"pmoe.backward.scores", "pmoe.backward.select", "pmoe.backward.experts", "pmoe.backward.combine"}
TRITON_FWD = {"fused": {"pmoe.forward"}, "split": {"pmoe.scores", "pmoe.select", "pmoe.experts"}}
TRITON_BWD = {"pmoe.backward.rows", "pmoe.backward.gates", "pmoe.backward.weights"}  # gates: softmax_all


@pytest.fixture
def profiling_on():
    was = profiling.is_enabled()
    profiling.enable(True)
    yield
    profiling.enable(was)


def _trace_names(fn, path) -> set:
    """Run fn under torch.profiler (CPU), export the Chrome trace and read back its event names."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    prof.export_chrome_trace(str(path))
    return {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}


def _layer(backend, gate="softmax", combine="concat"):
    layer = pmoe.PMoEConv2d(2, 4, 2, num_experts=2, top_l=3, gate=gate, combine=combine, backend=backend)
    torch.nn.init.normal_(layer.router)
    return layer


def _step(layer, pooled=False):
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    y = layer.forward_pooled(x) if pooled else layer(x)
    y.square().sum().backward()


def test_off_is_the_shared_noop(tmp_path, monkeypatch):
    assert not profiling.is_enabled()  # off by default (PMOE_NVTX unset)
    assert profiling.nvtx_range("pmoe.anything") is profiling._OFF
    assert profiling.nvtx_range("other") is profiling.nvtx_range("pmoe.scores")
    hooked = []  # no autograd node is hooked for backward ranges either
    monkeypatch.setattr(pmoe.torch_backend, "_backward_ranges", lambda *args: hooked.append(args))
    layer = _layer("torch")
    names = _trace_names(lambda: (_step(layer), _step(layer, pooled=True)), tmp_path / "off.json")
    assert not {n for n in names if n and n.startswith("pmoe.")}
    assert not hooked


def test_torch_path_ranges(profiling_on, tmp_path):
    layer = _layer("torch", gate="softmax_all", combine="sum")
    names = _trace_names(lambda: _step(layer), tmp_path / "torch.json")
    assert TORCH_FWD | TORCH_BWD <= names, (TORCH_FWD | TORCH_BWD) - names
    names = _trace_names(lambda: _step(layer, pooled=True), tmp_path / "pooled.json")
    assert {"pmoe.pool", "pmoe.backward.pool", "pmoe.backward.experts"} <= names


def test_torch_path_partial_backward_keeps_ranges_paired(profiling_on, tmp_path):
    """Gradient of the weight only: autograd prunes the router branch, and every range that
    was opened is closed (the trace export would fail or nest wrongly otherwise)."""
    layer = _layer("torch")
    x = torch.randn(2, 2, 6, 6)

    def fn():
        (g,) = torch.autograd.grad(layer(x).sum(), [layer.weight])
        assert g.shape == layer.weight.shape

    names = _trace_names(fn, tmp_path / "partial.json")
    assert "pmoe.backward.experts" in names
    fn()  # a second run after the profiler: hooks still balanced


@pytest.mark.parametrize("route", ["fused", "split"])
def test_triton_ranges(profiling_on, tmp_path, monkeypatch, route):
    pytest.importorskip("triton")
    from pmoe.kernels import launch
    monkeypatch.setattr(launch, "ROUTE", route)
    layer = _layer("triton", gate="softmax_all")
    names = _trace_names(lambda: _step(layer), tmp_path / "triton.json")
    assert TRITON_FWD[route] | TRITON_BWD | {"pmoe.backward.scores"} <= names
    names = _trace_names(lambda: _step(layer, pooled=True), tmp_path / "triton_pooled.json")
    assert TRITON_FWD[route] | TRITON_BWD <= names

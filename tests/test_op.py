"""kernels/op.py, the custom ops: under torch.compile (no graph break), the FLOP
formula seen by FlopCounterMode, and the ops' fake (meta) implementations."""
import pytest
import torch

triton = pytest.importorskip("triton")

import pmoe  # noqa: E402
from pmoe.kernels import op as kop  # noqa: E402


class _Net(torch.nn.Module):
    def __init__(self, gate="softmax", combine="concat"):
        super().__init__()
        self.moe = pmoe.PMoEConv2d(2, 4, 2, num_experts=2, top_l=3, combine=combine, gate=gate, bias=True,
                                   backend="triton")
        torch.nn.init.normal_(self.moe.router)

    def forward(self, x):
        return self.moe(x).relu().sum(dim=(2, 3))


def test_torch_compile_no_graph_break():
    torch._dynamo.reset()
    net = _Net()
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    explanation = torch._dynamo.explain(net)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    y_c = compiled(x)
    y_e = net(x)
    assert torch.equal(y_c, y_e)
    g_c = torch.autograd.grad(y_c.sum(), [x, net.moe.router, net.moe.weight])
    g_e = torch.autograd.grad(y_e.sum(), [x, net.moe.router, net.moe.weight])
    for a, b in zip(g_c, g_e):
        assert torch.equal(a, b)


@pytest.mark.parametrize("gate", ["softmax", "indicator", "softmax_all"])
def test_flop_counter_sees_sparse_work(gate):
    from torch.utils.flop_counter import FlopCounterMode

    B, C, H, W, p, k, m, l = 2, 3, 8, 8, 2, 4, 2, 5
    n, d = (H // p) * (W // p), C * p * p
    layer = pmoe.PMoEConv2d(C, k * m, p, k, l, gate=gate, backend="triton")
    x = torch.randn(B, C, H, W, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y = layer(x)
    routing, experts = 2 * B * n * d * k, 2 * B * k * l * d * m
    assert counter.get_total_flops() == routing + experts
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    router_grad = {"softmax": 2 * 2 * B * k * l * d, "indicator": 0, "softmax_all": 2 * routing}[gate]
    assert counter.get_total_flops() == 2 * experts + router_grad


def test_fake_impls_match_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 3, 4, 6)
    router, weight, bias = torch.randn(2, 12), torch.randn(2, 5, 12), torch.randn(2, 5)
    for save_pre in (False, True):
        real = kop.fused_fwd(x, router, weight, bias, 2, 3, "sum", "softmax_all", "gelu", False, False, save_pre)
        with FakeTensorMode() as mode:
            fx, fr, fw, fb = (mode.from_tensor(t) for t in (x, router, weight, bias))
            fake = kop.fused_fwd(fx, fr, fw, fb, 2, 3, "sum", "softmax_all", "gelu", False, False, save_pre)
        assert len(real) == len(fake) == 8 and real[7].numel() == (2 * 2 * 3 * 5 if save_pre else 0)
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.dtype == f.dtype
    dy = torch.randn_like(real[0])
    saved = (real[1], *real[3:])  # idx, the fp32 gates, inv, scores, lse, pre
    real_b = kop.fused_bwd(dy, x, router, weight, bias, *saved, 2, 3, "sum", "softmax_all", "gelu")
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (dy, x, router, weight, bias, *saved)]
        fake_b = kop.fused_bwd(*args, 2, 3, "sum", "softmax_all", "gelu")
    for r, f in zip(real_b, fake_b):
        assert r.shape == f.shape and r.dtype == f.dtype


def test_pmoe_import_does_not_import_triton_kernels():
    import subprocess
    import sys

    code = "import sys, pmoe; assert 'pmoe.kernels' not in sys.modules and 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_options_are_the_ops_arguments_in_order():
    """pmoe.vocab.Options is unpacked into the forward op (Options.op_args): its fields are the
    op's arguments after the four tensors, in the same order (then save_pre), and the backward op's start so."""
    import dataclasses

    from pmoe.vocab import Options

    fields = [f.name for f in dataclasses.fields(Options)]
    fwd = [a.name for a in torch.ops.pmoe.fused_fwd.default._schema.arguments]
    bwd = [a.name for a in torch.ops.pmoe.fused_bwd.default._schema.arguments]
    assert fwd == ["x", "router", "weight", "bias", *fields, "save_pre"]
    assert bwd[11:] == fields[:5]  # dy, x, router, weight, bias, idx, gates, inv, scores, lse, pre, the options
    o = Options(2, 3, "sum", "softmax_all", "gelu", True, False)
    assert o.op_args() == tuple(getattr(o, f) for f in fields)

"""The layers' documented limits (docs/ROBUSTNESS.md, "Limits"): TorchScript is refused with a
clear error that names what works; double backward works on the PyTorch path."""
import pytest
import torch
from torch import nn

import pmoe
from pmoe.functional import pmoe_conv2d


@pytest.mark.parametrize("make", [lambda: pmoe.PMoEConv2d(4, 8, 2, 2, 2), lambda: pmoe.PMoE(4, 4, 2, 2),
                                  lambda: nn.Sequential(nn.Conv2d(4, 4, 1), pmoe.PMoEConv2d(4, 8, 2, 2, 2))])
def test_torchscript_gives_a_clear_error(make):
    with pytest.raises(RuntimeError, match=r"does not support TorchScript.*torch\.compile.*torch\.export"):
        torch.jit.script(make())


@pytest.mark.parametrize("gate", ["softmax", "softmax_all"])
def test_double_backward_on_the_torch_path(gate):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)  # n = 4 patches of d = 8
    router = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 2, 2, 2, dtype=torch.float64, requires_grad=True)

    def f(x, router, weight):
        return pmoe_conv2d(x, router, weight, patch_size=2, top_l=2, gate=gate, activation="gelu",
                           backend="torch")

    assert torch.autograd.gradgradcheck(f, (x, router, weight), fast_mode=True)

"""pmoe.models: the paper's networks compute SPEC §2's formulas; the Wide-ResNets' shapes."""
import pytest
import torch

from pmoe.data import image_to_patches
from pmoe.models import (CNNClassifier, PMoEClassifier, WideResNet, WRNPMoE, build_model, default_model_args,
                         fixed_head)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models' ops are tiny: on a shared 2-core machine a second thread costs more than it
    gives (waiting on a descheduled OpenMP worker), so run them single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pmoe_classifier_is_the_papers_formula():
    model = PMoEClassifier(2, 4, num_experts=3, top_l=5, neurons_per_expert=4).double()
    torch.nn.init.normal_(model.moe.router)  # separated scores
    x = torch.randn(6, 2, 16, 16, dtype=F64)
    logit, routing = model(x, return_routing=True)
    assert logit.shape == (6,) and routing.indices.shape == (6, 3, 5)
    assert torch.equal(model(x), logit)
    # f(x) = sum_s sum_r a_{r,s} (1/l) sum_{j in J_s} G[s,j] ReLU(<w_{r,s}, x_j>), written out
    xp = image_to_patches(x, 4)  # (B, n, d)
    W = model.moe.weight.reshape(3, 4, -1)
    a = model.head.view(3, 4)
    want = torch.zeros(6, dtype=F64)
    for b in range(6):
        for s in range(3):
            for g, j in zip(routing.gates[b, s], routing.indices[b, s]):
                want[b] += (a[s] * torch.relu(W[s] @ xp[b, j])).sum() * g / 5
    assert torch.allclose(logit, want, rtol=1e-12, atol=1e-12)


def test_cnn_classifier_is_the_papers_formula():
    model = CNNClassifier(3, 4, neurons=6).double()
    x = torch.randn(5, 3, 8, 12, dtype=F64)
    xp = image_to_patches(x, 4)  # (5, 6, 48)
    W = model.conv.weight.reshape(6, -1)
    want = torch.relu(xp @ W.T).mean(1) @ model.head  # sum_r a_r (1/n) sum_j ReLU(<w_r, x_j>)
    assert torch.allclose(model(x), want, rtol=1e-12, atol=1e-12)
    assert model.head.tolist() == [1, 1, 1, -1, -1, -1]
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(1, 3, 6, 8, dtype=F64))


def test_fixed_heads():
    assert fixed_head("sign", 2, 3).tolist() == [1, 1, 1, -1, -1, -1]  # by expert
    assert fixed_head("sign", 4, 1).tolist() == [1, 1, -1, -1]
    torch.manual_seed(0)
    g = fixed_head("gaussian", 8, 5)
    assert g.shape == (40,) and 0.5 < g.std() < 1.5
    with pytest.raises(ValueError, match="even"):
        fixed_head("sign", 3, 2)
    with pytest.raises(ValueError, match="unknown head"):
        fixed_head("uniform", 2, 2)


@pytest.mark.parametrize("make", [lambda: PMoEClassifier(1, 8), lambda: CNNClassifier(1, 8)])
def test_head_is_fixed_under_training(make):
    model = make()
    assert "head" not in dict(model.named_parameters()) and "head" in model.state_dict()
    head = model.head.clone()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.rand(20, 1, 32, 32), torch.randint(0, 2, (20,)).float()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    assert torch.equal(model.head, head)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the rest did learn


def test_tiny_wide_resnet_shapes():
    model = WideResNet(depth=10, widen_factor=2, num_classes=7, in_channels=3, base_width=4)
    x = torch.randn(3, 3, 32, 32)
    assert model.features(x).shape == (3, 32, 8, 8) and model.out_channels == 32
    assert model(x).shape == (3, 7)
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=12)


def test_authors_wrn_is_wrn_28_10_ending_at_640_channels():
    with torch.device("meta"):  # shapes only, no 36M-parameter allocation
        model = WRNPMoE(depth=28, widen_factor=10)
        assert model.features(torch.empty(2, 3, 32, 32)).shape == (2, 640, 8, 8)
    assert model.moe.num_experts == 4 and model.moe.expert_features == 160 and model.moe.top_l == 16
    assert model.moe.gate == "softmax_all" and model.moe.activation == "identity"


def test_tiny_wrn_pmoe_forward_routing_and_gradients():
    model = WRNPMoE(depth=10, widen_factor=1, num_classes=10, base_width=8, num_experts=4, top_l=0.25)
    x = torch.randn(4, 3, 32, 32)
    logits, routing = model(x, return_routing=True)
    assert logits.shape == (4, 10)
    assert routing.indices.shape == (4, 4, 16) and routing.num_patches == 64  # 8x8 map of 1x1 patches
    logits.square().sum().backward()
    for name in ("moe.router", "moe.weight", "stem.weight", "fc.weight", "expert_bn.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_build_model_defaults_and_errors():
    joint = build_model("pmoe", 1, 8)
    assert (joint.moe.num_experts, joint.moe.top_l, joint.moe.expert_features) == (8, 6, 5)
    sep = build_model("pmoe", 1, 8, training="separate")
    assert (sep.moe.num_experts, sep.moe.top_l, sep.moe.expert_features) == (2, 2, 20)
    assert sep.head.tolist() == [1.0] * 20 + [-1.0] * 20
    assert build_model("pmoe", 1, 8, num_experts=4, top_l=3).moe.num_experts == 4
    assert build_model("cnn", 1, 8).conv.out_channels == default_model_args("cnn")["neurons"]
    assert isinstance(build_model("wrn-pmoe", 3, 1, 10, depth=10, widen_factor=1), WRNPMoE)
    with pytest.raises(TypeError, match="takes no argument"):
        build_model("cnn", 1, 8, num_experts=3)
    with pytest.raises(ValueError, match="binary"):
        build_model("pmoe", 3, 1, num_classes=10)
    with pytest.raises(ValueError, match="separate training"):
        build_model("cnn", 1, 8, training="separate")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vit", 1, 8)


# ----------------------------------------------------------------------------- flagship

def test_flagship_puts_pmoe_in_the_last_stage_and_the_twin_is_dense():
    from pmoe import PMoEConv2d
    from pmoe.models.flagship import flagship_pair

    net, twin = flagship_pair(in_channels=1, num_classes=2)
    assert net.moe_stages == (False, True) and twin.moe_stages == (False, False)
    assert sum(isinstance(m, PMoEConv2d) for m in net.modules()) == 1
    assert not any(isinstance(m, PMoEConv2d) for m in twin.modules())
    x = torch.randn(3, 1, 32, 32)
    assert net(x).shape == twin(x).shape == (3, 2)
    both = flagship_pair(moe_stages=(True, True))[0]
    assert sum(isinstance(m, PMoEConv2d) for m in both.modules()) == 2


@pytest.mark.parametrize("bad", [dict(moe_stages=(True,)), dict(top_l=(0.25,)), dict(widths=(16, 32))])
def test_flagship_rejects_mismatched_stage_arguments(bad):
    from pmoe.models.flagship import FlagshipPMoE

    with pytest.raises(ValueError, match="stage"):
        FlagshipPMoE(**bad)


def test_flagship_keeps_the_networks_memory_format():
    """NCHW in, NCHW between stages (BN's CPU backward is slow on mixed layouts); a channels-last
    network stays channels-last; both compute the same logits."""
    from pmoe.models.flagship import FlagshipPMoE, KeepLayout

    torch.manual_seed(0)
    net = FlagshipPMoE(in_channels=1, num_classes=2, backend="torch").eval()
    stage = next(m for m in net.modules() if isinstance(m, KeepLayout))
    seen = []
    stage.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(4, 1, 32, 32)
    ref = net(x)
    assert seen[-1].is_contiguous()
    net.to(memory_format=torch.channels_last)
    out = net(x.contiguous(memory_format=torch.channels_last))
    assert seen[-1].is_contiguous(memory_format=torch.channels_last) and not seen[-1].is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

"""pmoe.train: each recipe learns, the logs hold what they promise, resuming is exact."""
import pytest
import torch

from pmoe.data import make_dataset
from pmoe.models import CNNClassifier, PMoEClassifier, build_model
from pmoe.train import TrainConfig, evaluate, load_checkpoint, train_joint, train_model, train_separate


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops on a shared 2-core machine: a second thread costs more than it gives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return make_dataset("digits-patch", 400, 400, seed=0)


def _cfg(**kw):
    return TrainConfig(progress=False, **kw)


def test_joint_training_learns_and_logs_routing(digits):
    train, test = digits
    torch.manual_seed(0)
    model = build_model("pmoe", 1, 8)
    history = train_joint(model, train, test, _cfg(epochs=15, eval_every=5))
    assert [r["epoch"] for r in history] == list(range(1, 16))
    assert "test_acc" not in history[0] and "test_acc" in history[4]  # eval_every=5
    last = history[-1]
    assert last["phase"] == "joint" and last["test_acc"] > 0.85
    assert len(last["capture"]) == 8 and all(0 <= c <= 1 for c in last["capture"])
    # the routers learned to pick the class digit: every test image has it routed to some expert
    assert last["capture_any"] > 0.95
    assert set(last["routing"]) >= {"unrouted_fraction", "gate_entropy", "position_max_over_mean"}
    assert evaluate(model, test)["test_acc"] == last["test_acc"]


def test_separate_training_learns(digits):
    train, test = digits
    torch.manual_seed(0)
    model = build_model("pmoe", 1, 8, training="separate")
    history = train_separate(model, train, test, _cfg(router_epochs=10, epochs=15, eval_every=0))
    phases = [r["phase"] for r in history]
    assert phases == ["router"] * 10 + ["experts"] * 15
    assert model.moe.gate == "indicator" and not model.moe.router.requires_grad
    router_end, last = history[9], history[-1]
    # after phase 1 each router takes its class's digit: expert 0 on label-1 images (half the
    # test set), expert 1 on label-0 images
    assert router_end["capture"][0] > 0.35 and router_end["capture"][1] > 0.35
    assert last["capture"] == router_end["capture"]  # frozen routers
    assert last["test_acc"] > 0.85


def test_cnn_baseline_learns():
    train, test = make_dataset("synthetic", 300, 300, seed=0, n=16, d=64, noise=0.1)
    torch.manual_seed(0)
    model = CNNClassifier(train.in_channels, train.patch_size, neurons=20)
    history = train_joint(model, train, test, _cfg(epochs=10, eval_every=0))
    assert history[-1]["test_acc"] > 0.9
    assert "capture" not in history[-1] and "routing" not in history[-1]  # no router


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(h1, h2):
    """Equal up to wall times and the planned epoch count (which the shorter first run logs)."""
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "epochs")} for r in h]  # noqa: E731
    return strip(h1) == strip(h2)


def test_joint_resume_is_exact(tmp_path, digits):
    train, test = digits[0].subset(slice(0, 120)), digits[1].subset(slice(0, 100))

    def fresh():
        torch.manual_seed(1)
        return PMoEClassifier(1, 8)

    straight = fresh()
    h_straight = train_joint(straight, train, test, _cfg(epochs=4, seed=7, checkpoint=str(tmp_path / "a.pt")))
    first = fresh()
    train_joint(first, train, test, _cfg(epochs=2, seed=7, checkpoint=str(tmp_path / "b.pt")))
    ck = load_checkpoint(str(tmp_path / "b.pt"))
    assert ck["epoch"] == 2 and ck["phase"] == "joint" and set(ck["rng"]) == {"shuffle", "torch", "numpy", "python"}
    assert ck["config"]["seed"] == 7
    torch.manual_seed(123)  # a different global RNG state and a differently initialised model
    resumed = PMoEClassifier(1, 8)
    h_resumed = train_joint(resumed, train, test, _cfg(epochs=4, seed=7, resume=str(tmp_path / "b.pt")))
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert _same(h_straight, h_resumed)
    assert not torch.equal(a["moe.weight"], _params(first)["moe.weight"])  # the last two epochs did something


def test_separate_resume_is_exact(tmp_path, digits):
    train, test = digits[0].subset(slice(0, 100)), digits[1].subset(slice(0, 100))

    def fresh():
        torch.manual_seed(2)
        return build_model("pmoe", 1, 8, training="separate")

    straight = fresh()
    h_straight = train_separate(straight, train, test, _cfg(router_epochs=2, epochs=3, seed=3))
    first = fresh()
    train_separate(first, train, test, _cfg(router_epochs=2, epochs=1, seed=3, checkpoint=str(tmp_path / "s.pt")))
    resumed = fresh()
    h_resumed = train_separate(resumed, train, test, _cfg(router_epochs=2, epochs=3, seed=3,
                                                           resume=str(tmp_path / "s.pt")))
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["phase"] for r in h_resumed] == ["router"] * 2 + ["experts"] * 3
    assert _same(h_straight, h_resumed)


def test_labels_and_config_are_checked(digits):
    train, test = digits[0].subset(slice(0, 40)), digits[1].subset(slice(0, 40))
    model = PMoEClassifier(1, 8)
    # +-1 labels are accepted (a tuple of tensors as the dataset)
    h = train_joint(model, (train.x, train.y_pm), (test.x, test.y_pm.long()), _cfg(epochs=1))
    assert 0 <= h[-1]["test_acc"] <= 1
    with pytest.raises(ValueError, match="labels must lie"):
        train_joint(model, (train.x, train.y + 1), test, _cfg(epochs=1))
    with pytest.raises(ValueError, match="num_experts must be 2"):
        train_separate(PMoEClassifier(1, 8), train, test, _cfg(epochs=1))
    with pytest.raises(TypeError, match="PMoEConv2d"):
        train_separate(CNNClassifier(1, 8), train, test, _cfg(epochs=1))
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown training"):
        train_model(model, train, test, _cfg(epochs=1), training="alternating")

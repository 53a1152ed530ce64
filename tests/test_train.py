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


# ----------------------------------------------------------------------------- failures: no silent wrong results

@pytest.mark.parametrize("name, value", [("momentum", float("nan")), ("momentum", 1.0), ("momentum", -0.1),
                                         ("lr", float("inf")), ("router_lr", float("nan")),
                                         ("router_scale", 0.0), ("weight_decay", float("nan")),
                                         ("weight_decay", -1.0)])
def test_float_settings_must_be_finite_and_in_range(name, value):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**{name: value})


@pytest.mark.parametrize("device, match", [("gpu0", "not a torch device name"), ("cuda", "no CUDA device")])
def test_devices_are_checked_up_front(device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=match):
        TrainConfig(device=device)


class _Diverges(torch.nn.Module):
    """A CNN whose output turns NaN from the `bad_from`-th training forward on."""

    def __init__(self, bad_from: int):
        super().__init__()
        self.net, self.calls, self.bad_from = CNNClassifier(1, 8, neurons=4), 0, bad_from

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_from:
                out = out * float("nan")
        return out


def test_a_non_finite_loss_stops_training_and_keeps_the_good_checkpoint(tmp_path, digits):
    train, test = digits[0].subset(slice(0, 40)), digits[1].subset(slice(0, 20))
    path = str(tmp_path / "ck.pt")
    model = _Diverges(bad_from=2 * 2 + 1)  # batch 20 over 40 images: 2 steps an epoch; NaN in epoch 3
    diverged = r"joint epoch 3, step 1: the training loss is nan.*ck.pt \(joint epoch 2\)"
    with pytest.raises(FloatingPointError, match=diverged):
        train_joint(model, train, test, _cfg(epochs=5, checkpoint=path))
    ck = load_checkpoint(path)
    assert ck["epoch"] == 2 and all(bool(torch.isfinite(t).all()) for t in ck["model"].values())


def test_non_finite_weights_are_never_saved_over_a_checkpoint(tmp_path, digits):
    train, test = digits[0].subset(slice(0, 20)), digits[1].subset(slice(0, 20))
    path = str(tmp_path / "ck.pt")
    model = CNNClassifier(1, 8, neurons=4)
    train_joint(model, train, test, _cfg(epochs=1, batch_size=20, checkpoint=path))
    # the step's loss is finite, but the gradient (so the weights after the step) is not
    model.conv.weight.register_hook(lambda g: g * float("nan"))
    resumed = _cfg(epochs=2, batch_size=20, checkpoint=path, resume=path)
    with pytest.raises(FloatingPointError, match="holds NaN or Inf.*was not overwritten"):
        train_joint(model, train, test, resumed)
    assert load_checkpoint(path)["epoch"] == 1


def test_resume_lists_every_setting_that_differs(tmp_path, digits):
    train, test = digits[0].subset(slice(0, 40)), digits[1].subset(slice(0, 20))
    path = str(tmp_path / "ck.pt")
    train_joint(PMoEClassifier(1, 8), train, test, _cfg(epochs=1, seed=1, checkpoint=path, meta={"data": "a"}))
    changed = _cfg(epochs=3, seed=2, lr=0.1, momentum=0.5, resume=path, meta={"data": "b"})
    with pytest.raises(ValueError, match="different settings") as e:
        train_joint(PMoEClassifier(1, 8), train, test, changed)
    msg = str(e.value)
    for part in ("seed=1 (now 2)", "lr=0.2 (now 0.1)", "momentum=0.0 (now 0.5)", "data='a' (now 'b')"):
        assert part in msg
    assert "epochs" not in msg.split("(only")[0]  # epochs may change: it extends the run
    # fewer epochs than the checkpoint reached cannot continue it
    with pytest.raises(ValueError, match="is at joint epoch 1: epochs=0"):
        train_joint(PMoEClassifier(1, 8), train, test, _cfg(epochs=0, seed=1, resume=path, meta={"data": "a"}))


def test_a_checkpoint_that_does_not_fit_the_model_is_named(tmp_path, digits):
    from pmoe.data import FileFormatError

    train, test = digits[0].subset(slice(0, 20)), digits[1].subset(slice(0, 20))
    path = str(tmp_path / "ck.pt")
    train_joint(PMoEClassifier(1, 8), train, test, _cfg(epochs=1, checkpoint=path))
    with pytest.raises(FileFormatError, match="ck.pt does not fit the model"):
        train_joint(CNNClassifier(1, 8), train, test, _cfg(epochs=2, resume=path))


def test_router_phase_reports_alignment_and_margin(digits):
    from pmoe.train import format_record

    train, test = digits  # exactly balanced classes
    imbalanced = train.subset(slice(0, 100))
    assert int(train.y.sum()) == 200 and int(imbalanced.y.sum()) == 45
    runs = []
    for data in (train, imbalanced):
        torch.manual_seed(0)
        model = build_model("pmoe", 1, 8, training="separate")
        runs.append(train_separate(model, data, test, _cfg(router_epochs=3, epochs=0))[2])
    balanced, tilted = runs
    assert balanced["phase"] == "router" and len(balanced["router_align"]) == 2
    # balanced: the linear loss drives the routers along +-(class-mean difference)
    assert min(balanced["router_align"]) > 0.99 and balanced["router_margin"] > 0
    # 45 vs 55 images: the surplus tilts both routers towards the images' common brightness, the
    # alignment shows it, and the routers catch the class digit far less often
    assert max(tilted["router_align"]) < 0.5 and sum(tilted["capture"]) < sum(balanced["capture"]) - 0.3
    line = format_record(balanced)
    assert "router-acc" in line and "align 1.000 1.000" in line and "margin" in line


def test_interrupt_message_names_the_last_checkpoint():
    from pmoe.train import TrainingInterrupted

    assert str(TrainingInterrupted("r/ck.pt", "joint", 3)) == "interrupted; last checkpoint: r/ck.pt (epoch 3)"
    assert str(TrainingInterrupted("r/ck", "experts", 2)) == "interrupted; last checkpoint: r/ck (experts epoch 2)"
    assert str(TrainingInterrupted()) == "interrupted; no checkpoint written yet"
    assert isinstance(TrainingInterrupted(), KeyboardInterrupt)

"""The experiment subcommands end to end on tiny settings (seconds each), and the routing metric
on hand-built routings whose answer is known."""
import json

import pytest
import torch
from torch import nn

from pmoe.cli import main
from pmoe.experiments.routing_metrics import discriminative_routing, routing_metrics
from pmoe.routing import Routing
from pmoe.train import evaluate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAPER_MODELS = {"cnn", "pmoe-joint", "pmoe-separate"}


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """The subcommands set the torch thread count: undo it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _png(path) -> bytes:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, f"{path} is not a drawn PNG"
    return data


# ----------------------------------------------------------------------------- routing metric

class FixedRouting(nn.Module):
    """A 'model' whose routing is given: forward returns zero logits and Routing(indices)."""

    def __init__(self, indices: torch.Tensor, num_patches: int):
        super().__init__()
        self.indices, self.num_patches = indices, num_patches

    def forward(self, x, return_routing: bool = False):
        idx = self.indices[: len(x)]
        out = torch.zeros(len(x))
        routing = Routing(idx, torch.full(idx.shape, 1.0 / idx.shape[-1]), self.num_patches)
        return (out, routing) if return_routing else out


def _metrics_of(indices, signal, n):
    x = torch.zeros(len(signal), 1)
    rec = evaluate(FixedRouting(torch.tensor(indices), n), (x, torch.zeros(len(signal)), torch.tensor(signal)))
    return discriminative_routing(rec, n, len(indices[0][0]))


def test_routing_metric_on_a_hand_built_case():
    # n = 4 patches, k = 2 experts, l = 2; the discriminative patch is 0 in image 0, 3 in image 1.
    # expert 0 takes {0, 1} in both images: it has the signal in image 0 only -> capture 1/2;
    #   irrelevant taken: image 0 {1} of {1, 2, 3}, image 1 {0, 1} of {0, 1, 2} -> (1/3 + 2/3) / 2
    # expert 1 takes {1, 2} then {3, 2}: the signal in image 1 only -> capture 1/2; (2/3 + 1/3) / 2
    # any expert: image 0 covers {0, 1, 2} (irrelevant 2 of 3), image 1 all (3 of 3) -> 5/6
    m = _metrics_of([[[0, 1], [1, 2]], [[0, 1], [3, 2]]], [0, 3], 4)
    assert m["capture"] == pytest.approx([0.5, 0.5])
    assert m["capture_any"] == pytest.approx(1.0)
    assert m["irrelevant_routed_per_expert"] == pytest.approx([0.5, 0.5])
    assert m["irrelevant_routed"] == pytest.approx(5 / 6)
    assert m["chance_capture"] == pytest.approx(0.5)
    # a perfect router: one expert takes exactly the signal patch, the other too -> nothing irrelevant
    perfect = _metrics_of([[[0], [0]], [[3], [3]]], [0, 3], 4)
    assert perfect["capture"] == [1.0, 1.0] and perfect["irrelevant_routed"] == 0.0
    assert perfect["irrelevant_routed_per_expert"] == [0.0, 0.0]


def test_routing_metric_matches_a_direct_count_on_random_routings():
    g = torch.Generator().manual_seed(0)
    B, k, l, n = 50, 3, 4, 9
    idx = torch.stack([torch.stack([torch.randperm(n, generator=g)[:l] for _ in range(k)]) for _ in range(B)])
    sig = torch.randint(0, n, (B,), generator=g)
    m = _metrics_of(idx.tolist(), sig.tolist(), n)
    per_expert, any_expert = torch.zeros(k), 0.0
    for b in range(B):
        chosen = [set(idx[b, s].tolist()) - {int(sig[b])} for s in range(k)]
        for s in range(k):
            per_expert[s] += len(chosen[s]) / (n - 1) / B
        any_expert += len(set().union(*chosen)) / (n - 1) / B
    assert m["irrelevant_routed_per_expert"] == pytest.approx(per_expert.tolist())
    assert m["irrelevant_routed"] == pytest.approx(any_expert)


def test_routing_metric_refuses_records_without_capture():
    with pytest.raises(ValueError, match="capture"):
        discriminative_routing({"test_acc": 0.5}, 16, 4)
    from pmoe.data import make_dataset
    from pmoe.models import build_model

    _, test = make_dataset("digits-patch", 0, 20, seed=0)
    test.signal_index[3] = -1
    with pytest.raises(ValueError, match="discriminative patch"):
        routing_metrics(build_model("pmoe", 1, 8), test)


# ----------------------------------------------------------------------------- sample complexity

def test_sample_complexity_end_to_end(tmp_path, capsys):
    rc = main(["sample-complexity", "--data", "synthetic", "--samples", "16,8", "--seeds", "2", "--seed", "3",
               "--epochs", "2", "--router-epochs", "2", "--n-test", "60", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res) == {"samples", "curves", "config", "routing"}
    assert res["samples"] == [8, 16]  # sorted
    assert set(res["curves"]) == PAPER_MODELS
    for curve in res["curves"].values():
        assert len(curve) == 2 and all(len(per_seed) == 2 and all(0 <= a <= 1 for a in per_seed) for per_seed in curve)
    assert set(res["routing"]) == {"pmoe-joint", "pmoe-separate"}
    joint = res["routing"]["pmoe-joint"][0][0]
    assert len(joint["capture"]) == 8 and 0 <= joint["irrelevant_routed"] <= 1
    assert len(res["routing"]["pmoe-separate"][1][1]["capture"]) == 2
    cfg = res["config"]
    assert cfg["data"] == "synthetic" and cfg["seeds"] == 2 and cfg["epochs"] == 2 and cfg["n_test"] == 60
    assert cfg["model_args"]["pmoe-joint"]["num_experts"] == 8
    _png(tmp_path / "sample_complexity.png")
    out = capsys.readouterr().out
    assert "| pmoe-joint |" in out and "capture" in out


def test_sample_complexity_trains_class_balanced_nested_sets():
    from pmoe.data import make_dataset
    from pmoe.experiments.sample_complexity import balanced_subset

    pool, _ = make_dataset("digits-patch", 40, 0, seed=0)
    small, large = balanced_subset(pool, 10, 6), balanced_subset(pool, 10, 10)
    assert int(small.y.sum()) == 3 and int(large.y.sum()) == 5
    as_rows = lambda ds: {tuple(v) for v in ds.x.flatten(1).tolist()}  # noqa: E731
    assert as_rows(small) <= as_rows(large) and not as_rows(small) & as_rows(balanced_subset(pool, 0, 10))
    with pytest.raises(ValueError, match="too few"):
        balanced_subset(pool, 15, 12)


def test_sample_complexity_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample-complexity", "--samples", "10,0", "--out", str(tmp_path)])
    assert "distinct positive integers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample-complexity", "--models", "cnn,wrn", "--out", str(tmp_path)])
    assert main(["sample-complexity", "--seeds", "0", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--seeds must be a positive int" in capsys.readouterr().err
    assert main(["sample-complexity", "--epochs", "0", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "--epochs must be a positive int" in capsys.readouterr().err


# ----------------------------------------------------------------------------- show-routing

TINY_TRAIN = ["--n-train", "60", "--n-test", "20", "--no-progress"]


def test_show_routing_from_a_train_checkpoint(tmp_path, capsys):
    from pmoe.experiments.show_routing import load_trained, pick_images, plot_routing

    run = tmp_path / "joint"
    assert main(["train", "--data", "digits-patch", "--model", "pmoe", "--epochs", "2", "--out", str(run),
                 *TINY_TRAIN]) == 0
    png = tmp_path / "routing.png"
    assert main(["show-routing", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(png), "--images", "3"]) == 0
    _png(png)
    model, test, meta = load_trained(str(run / "checkpoint.pt"))
    assert meta["model"] == "pmoe" and len(test) == 20
    index = pick_images(test.y, 0, 4)
    assert sorted(set(test.y[index].tolist())) == [0, 1]  # both classes shown
    drawn = plot_routing(model, test, index, str(tmp_path / "again.png"))
    _, routing = model(test.x[index], return_routing=True)
    assert drawn["indices"] == routing.indices.tolist()
    assert len(drawn["indices"][0]) == 8 and len(drawn["indices"][0][0]) == 6  # k = 8, l = 6


def test_show_routing_of_separate_training_uses_the_indicator_gate(tmp_path):
    from pmoe.experiments.show_routing import load_trained, plot_routing

    run = tmp_path / "sep"
    assert main(["train", "--training", "separate", "--router-epochs", "2", "--epochs", "1", "--out", str(run),
                 *TINY_TRAIN]) == 0
    model, test, _ = load_trained(str(run / "checkpoint.pt"))
    drawn = plot_routing(model, test, [0, 1], str(tmp_path / "sep.png"))
    assert torch.equal(torch.tensor(drawn["gates"]), torch.ones(2, 2, 2))


def test_show_routing_rejects_unrouted_models_and_bad_ranges(tmp_path, capsys):
    run = tmp_path / "cnn"
    assert main(["train", "--model", "cnn", "--epochs", "1", "--out", str(run), *TINY_TRAIN]) == 0
    capsys.readouterr()
    assert main(["show-routing", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no routed layer" in capsys.readouterr().err
    assert main(["show-routing", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- spurious

def test_spurious_end_to_end(tmp_path):
    rc = main(["spurious", "--rates", "0.5,1", "--n-train", "20", "--seeds", "1", "--epochs", "1",
               "--router-epochs", "1", "--n-test", "40", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["rates"] == [0.5, 1.0] and set(res["test_sets"]) == {"clean", "independent", "reversed"}
    assert set(res["accuracy"]) == PAPER_MODELS
    for per_test in res["accuracy"].values():
        assert set(per_test) == {"clean", "independent", "reversed"}
        assert all(len(v) == 2 and len(v[0]) == 1 and 0 <= v[0][0] <= 1 for v in per_test.values())
    for key in ("pmoe-joint", "pmoe-separate"):
        assert all(0 <= v[0] <= 1 for v in res["routing"][key]["marker_routed"])
    _png(tmp_path / "spurious.png")


def test_spurious_marker_routing_points_at_the_marker_tile():
    from pmoe.data import Spurious, make_dataset
    from pmoe.experiments.spurious import MARKER_POSITION, _with_marker_as_signal

    _, test = make_dataset("digits-patch", 0, 30, seed=1, test_spurious=Spurious(0.0, MARKER_POSITION))
    assert bool((test.extras["spurious"] == (test.y == 0)).all())  # reversed: marker on every label-0 image
    marked = _with_marker_as_signal(test)
    assert marked.signal_index.tolist() == [MARKER_POSITION if y == 0 else -1 for y in test.y.tolist()]


def test_spurious_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["spurious", "--rates", "0.5,1.5", "--out", str(tmp_path)])
    assert main(["spurious", "--n-train", "21", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "even" in capsys.readouterr().err
    assert main(["spurious", "--data", "synthetic", "--marker", "digit", "--out", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------- equal compute

def test_equal_compute_end_to_end_with_spec_flop_counts(tmp_path):
    rc = main(["equal-compute", "--n-train", "64", "--n-test", "32", "--epochs", "1", "--seeds", "1",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    nets = res["networks"]
    assert set(nets) == {"flagship-pmoe", "flagship-dense"}
    # SPEC §4 per image for the default flagship (1x32x32; widths 16, 32, 256; p = 2; stage 1 dense,
    # stage 2 pMoE with n = 64, d = 32*2*2, k = 4, l = 16):
    stem, fc = 2 * 9 * 1 * 16 * 32 * 32, 2 * 256 * 2
    stage1 = 2 * 256 * 64 * 32
    dense = stem + stage1 + 2 * 64 * 128 * 256 + fc
    pmoe = stem + stage1 + (2 * 64 * 128 * 4 + 2 * 16 * 128 * 256) + fc
    assert nets["flagship-dense"]["infer_flops"] == dense
    assert nets["flagship-pmoe"]["infer_flops"] == pmoe
    assert res["ratio"]["infer"] == pytest.approx(pmoe / dense)
    assert nets["flagship-pmoe"]["train_flops"] > 2 * pmoe  # forward + backward
    gap = nets["flagship-pmoe"]["test_acc_mean"] - nets["flagship-dense"]["test_acc_mean"]
    assert res["accuracy_gap"] == pytest.approx(gap)
    assert res["same_accuracy"] == (gap >= -0.01)
    assert (res["savings"]["infer"] is None) != res["same_accuracy"]
    _png(tmp_path / "equal_compute.png")


def test_bench_compute_savings_uses_the_shared_flop_counter():
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.append(bench)
    import compute_savings

    from pmoe.experiments import flops

    assert compute_savings.count_flops is flops.count_flops

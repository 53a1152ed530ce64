"""`pmoe text-segments` end to end on a tiny setting, and its pieces: the three models, the
chance levels of key routing, steps to a target."""
import json

import numpy as np
import pytest
import torch

from pmoe.cli import main
from pmoe.data.text import make_text_documents
from pmoe.experiments.text_segments import (ARCH, MODELS, ORACLE, TextClassifier, chance_routing, key_routing,
                                            per_document_flops, steps_to_target)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """The subcommand sets the torch thread count: undo it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_cli_writes_results_and_figure(tmp_path, capsys):
    out = tmp_path / "ts"
    rc = main(["text-segments", "--out", str(out), "--data", "synthetic,stdlib", "--samples", "8,16", "--seeds", "2",
               "--steps", "6", "--n-test", "24", "--eval-every", "3", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["settings"]) == {"synthetic", "stdlib"}
    for setting in res["settings"].values():
        assert set(setting["models"]) == {*MODELS, ORACLE}
        assert setting["samples"] == [8, 16] and setting["steps"] == [3, 6]
        for key, m in setting["models"].items():
            assert len(m["acc"]) == 2 and all(len(a) == 2 for a in m["acc"])
            assert all(0 <= a <= 1 for a in m["acc_mean"]) and len(m["curves"][0][0]) == 2
            assert m["train_flops"] > m["infer_flops"] > 0
        dense, flat, hier = (setting["models"][k] for k in MODELS)
        assert flat["infer_flops"] < 0.5 * dense["infer_flops"] and hier["infer_flops"] < flat["infer_flops"]
        assert "group_capture_any" in hier["routing"][0][0] and "routing" not in dense
        assert 0 <= flat["key_routed_mean"][1] <= 1 and setting["front_end_adds_per_doc"] > 0
    assert res["config"]["arch"] == json.loads(json.dumps(ARCH))
    data = (out / "text_segments.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert "key sentence routed" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    out = str(tmp_path / "ts")
    assert main(["text-segments", "--out", out, "--steps", "0", "--no-progress"]) == 2
    assert "--steps must be a positive int" in capsys.readouterr().err
    for bad in (["--data", "wikipedia"], ["--lr", "nan"], ["--samples", "8,8"]):
        with pytest.raises(SystemExit):
            main(["text-segments", "--out", out, *bad])


def test_models_share_front_end_and_head_and_count_sparse_flops():
    train, _ = make_text_documents("synthetic", 8, 2, seed=0, groups=ARCH["groups"], segments=ARCH["segments"],
                                   max_words=ARCH["max_words"], buckets=ARCH["buckets"])
    flops = {}
    for key in MODELS:
        torch.manual_seed(0)
        net = TextClassifier(key)
        logit, routing = net(train.ids, return_routing=True)
        assert logit.shape == (8,) and (routing is None) == (key == "dense")
        flops[key] = per_document_flops(net, train.ids)["infer_flops"]
    n, d, m = ARCH["groups"] * ARCH["segments"], ARCH["dim"], ARCH["neurons"]
    assert flops["dense"] == 2 * n * d * m + 2 * m  # the segment layer and the head
    k, l = ARCH["pmoe"]["num_experts"], ARCH["pmoe"]["top_l"]
    assert flops["pmoe"] == 2 * n * d * k + 2 * l * d * m + 2 * m
    with pytest.raises(ValueError, match="unknown model"):
        TextClassifier("cnn")
    with pytest.raises(ValueError, match="routes nothing"):
        key_routing(TextClassifier("dense"), train)


@pytest.mark.parametrize("key", ["pmoe", "pmoe-hier"])
def test_chance_routing_matches_random_choices(key):
    """The closed forms against uniform random expert choices, drawn the way each layer chooses."""
    rng = np.random.default_rng(0)
    G, S, trials = ARCH["groups"], ARCH["segments"], 20000
    want = chance_routing(key)
    if key == "pmoe":
        k, l = ARCH["pmoe"]["num_experts"], ARCH["pmoe"]["top_l"]
        hits = np.array([[0 in rng.permutation(G * S)[:l] for _ in range(k)] for _ in range(trials)])
    else:
        h = ARCH["pmoe-hier"]
        hits = []
        for _ in range(trials):  # key at group 0, segment 0
            row = []
            for _t in range(h["num_group_experts"]):
                took_group = 0 in rng.permutation(G)[:h["top_groups"]]
                row += [took_group and 0 in rng.permutation(S)[:h["top_l"]] for _s in range(h["num_experts"])]
            hits.append(row)
        hits = np.array(hits)
    assert hits.mean() == pytest.approx(want["capture"], abs=0.01)
    assert hits.any(1).mean() == pytest.approx(want["capture_any"], abs=0.01)


def test_steps_to_target():
    assert steps_to_target([0.5, 0.8, 0.95, 0.9], [10, 20, 30, 40], 0.9) == 30
    assert steps_to_target([0.5, 0.8], [10, 20], 0.9) is None

"""The command line, end to end on tiny settings: in-process main([...]) and `python -m pmoe`."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from pmoe.cli import COMMANDS, main

TINY = ["--n-train", "300", "--n-test", "200", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """`pmoe train` sets the torch thread count (to 1 for the paper's models): undo it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _final_acc(out: str) -> float:
    line = [ln for ln in out.splitlines() if ln.startswith("final test accuracy:")][-1]
    return float(line.split()[3].rstrip("%")) / 100


def test_train_joint_end_to_end(tmp_path, capsys):
    rc = main(["train", "--data", "digits-patch", "--model", "pmoe", "--epochs", "12", "--seed", "1",
               "--out", str(tmp_path), *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("joint epoch") == 12 and "capture" in out
    assert _final_acc(out) > 0.75
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 12 and ck["config"]["meta"]["model"] == "pmoe"
    saved = json.loads((tmp_path / "history.json").read_text())
    assert len(saved["history"]) == 12 and saved["history"][-1]["test_acc"] == pytest.approx(_final_acc(out), abs=1e-4)


def test_train_separate_and_cnn_end_to_end(tmp_path, capsys):
    assert main(["train", "--training", "separate", "--router-epochs", "5", "--epochs", "5",
                 "--out", str(tmp_path / "sep"), *TINY]) == 0
    out = capsys.readouterr().out
    assert out.count(" router epoch") == 5 and out.count("experts epoch") == 5 and _final_acc(out) > 0.8
    assert main(["train", "--model", "cnn", "--neurons", "10", "--epochs", "2", "--out", str(tmp_path / "cnn"),
                 *TINY]) == 0
    assert 0 <= _final_acc(capsys.readouterr().out) <= 1


def test_resume_from_the_cli_matches_a_straight_run(tmp_path, capsys):
    common = ["train", "--data", "synthetic", "--data-arg", "noise=0.2", "--experts", "4", "--top-l", "3",
              "--seed", "2", *TINY]
    assert main([*common, "--epochs", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert main([*common, "--epochs", "3", "--out", str(tmp_path / "b"),
                 "--resume", str(tmp_path / "b" / "checkpoint.pt")]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    # a checkpoint of other settings is refused with a message
    rc = main([*common[:-len(TINY)], "--experts", "2", *TINY, "--epochs", "3", "--out", str(tmp_path / "c"),
               "--resume", str(tmp_path / "b" / "checkpoint.pt")])
    assert rc == 2 and "different settings" in capsys.readouterr().err


def _fake_cifar(root):
    rng = np.random.default_rng(0)
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, 4)]}, f)


def test_wrn_pmoe_on_local_cifar_files(tmp_path, capsys):
    _fake_cifar(tmp_path)
    rc = main(["train", "--data", "cifar10", "--data-dir", str(tmp_path), "--model", "wrn-pmoe", "--depth", "10",
               "--widen", "1", "--experts", "2", "--top-l", "8", "--epochs", "1", "--batch-size", "8",
               "--out", str(tmp_path / "run"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "20 train / 4 test" in out and "unrouted" in out
    assert os.path.isfile(tmp_path / "run" / "checkpoint.pt")


def test_bad_arguments_give_clear_errors(tmp_path, capsys):
    assert main(["train", "--data", "mnist-patch", "--data-dir", str(tmp_path), "--out", str(tmp_path), *TINY]) == 2
    assert "MNIST/raw/train-images-idx3-ubyte" in capsys.readouterr().err
    assert main(["train", "--model", "wrn", "--neurons", "3", "--out", str(tmp_path), *TINY]) == 2
    assert "--neurons does not apply" in capsys.readouterr().err
    assert main(["train", "--model", "cnn", "--training", "separate", "--out", str(tmp_path), *TINY]) == 2
    assert "needs --model pmoe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "imagenet"])
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out  # once: a second readouterr() returns only what came after the first
    assert e.value.code == 0 and all(name in out for name, *_ in COMMANDS)


def test_python_dash_m_pmoe(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run([sys.executable, "-m", "pmoe", "train", "--n-train", "60", "--n-test", "60",
                           "--epochs", "2", "--out", str(tmp_path), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "joint epoch   2/2" in proc.stdout and 0 <= _final_acc(proc.stdout) <= 1
    assert os.path.isfile(tmp_path / "checkpoint.pt")

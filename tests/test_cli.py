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


# ----------------------------------------------------------------------------- the command line as a new user meets it

def _parsers():
    """(command, its argparse parser) for every registered command."""
    import argparse

    from pmoe.cli import build_parser

    for name, *_ in COMMANDS:
        parser = build_parser(name)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        yield name, sub.choices[name]
    yield "pmoe", build_parser(None)


def test_version_prints_the_version(capsys):
    import pmoe

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"pmoe {pmoe.__version__} (torch ")


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {a.option_strings or a.dest}" for name, parser in _parsers() for a in parser._actions
               if not (a.help or "").strip()]
    assert not missing, f"options without help text: {missing}"


def test_every_number_option_refuses_nan_and_inf():
    import argparse

    def refuses(parse, text) -> bool:
        try:
            parse(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            return True
        return False

    numbers, accepted = [], []
    for name, parser in _parsers():
        for a in parser._actions:
            if callable(a.type) and not refuses(a.type, "0.5") and isinstance(a.type("0.5"), float):
                numbers.append(f"{name} {a.option_strings[0]}")
                accepted += [f"{numbers[-1]} {t}" for t in ("nan", "inf", "-inf") if not refuses(a.type, t)]
    assert not accepted, f"number options that accept non-finite values: {accepted}"
    assert {"train --lr", "train --momentum", "train --top-l", "equal-compute --top-l"} <= set(numbers)


@pytest.mark.parametrize("args, match", [
    (["--momentum", "nan"], "argument --momentum: expected a finite number in [0, 1)"),
    (["--momentum", "1"], "argument --momentum"),
    (["--lr", "inf"], "argument --lr"),
    (["--top-l", "nan"], "argument --top-l"),
    (["--data-arg", "noise=nan"], "noise: expected finite numbers"),
    (["--device", "gpu0"], "argument --device: device 'gpu0' is not a torch device name"),
])
def test_bad_numbers_and_devices_are_usage_errors(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path), *args])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_device_this_machine_lacks_is_a_usage_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        main(["train", "--device", "cuda", "--out", str(tmp_path)])
    assert e.value.code == 2 and "this machine has no CUDA device" in capsys.readouterr().err


def test_epochs_zero_evaluates_the_untrained_model(tmp_path, capsys):
    for training in ("joint", "separate"):
        rc = main(["train", "--training", training, "--epochs", "0", "--router-epochs", "1", "--n-train", "40",
                   "--n-test", "20", "--out", str(tmp_path / training), "--no-progress"])
        out = capsys.readouterr().out
        assert rc == 0 and 0 <= _final_acc(out) <= 1
        assert ("no epoch ran, no checkpoint written" in out) == (training == "joint")  # separate: a router epoch


def test_no_carriage_returns_when_not_a_terminal(tmp_path, capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    args = ["train", "--n-train", "40", "--n-test", "20", "--epochs", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "joint epoch   2/2" in out
    for stream in ("stdout", "stderr"):  # on a terminal, the bar is drawn
        monkeypatch.setattr(sys, stream, Terminal())
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "\r" in sys.stderr.getvalue() and "joint epoch   2/2" in sys.stdout.getvalue()


def test_resume_refuses_another_seed_or_learning_rate(tmp_path, capsys):
    common = ["train", "--n-train", "40", "--n-test", "20", "--no-progress", "--out", str(tmp_path)]
    assert main([*common, "--epochs", "1"]) == 0
    ck = str(tmp_path / "checkpoint.pt")
    capsys.readouterr()
    assert main([*common, "--epochs", "2", "--resume", ck, "--seed", "1", "--lr", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "seed=0 (now 1)" in err and "lr=0.2 (now 0.1)" in err and len(err.strip().splitlines()) == 1
    assert main([*common, "--epochs", "2", "--resume", ck, "--eval-every", "2"]) == 0  # --epochs extends the run
    assert torch.load(ck, weights_only=True)["epoch"] == 2


# ----------------------------------------------------------------------------- one line per expected failure

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    threads = torch.get_num_threads()
    assert main(["train", "--n-train", "40", "--n-test", "20", "--epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    torch.set_num_threads(threads)
    return out / "checkpoint.pt"


def _damage(kind: str, path, good) -> None:
    import argparse

    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:2000])
    elif kind == "text":
        path.write_text("model: pmoe\nepoch: 3\n")
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    elif kind == "state_dict":
        torch.save(torch.load(good, weights_only=True)["model"], path)
    elif kind == "unsafe pickle":  # weights_only refuses arbitrary classes
        torch.save({"model": {}, "config": argparse.Namespace(seed=0)}, path)


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    return err


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "png", "state_dict", "unsafe pickle"])
def test_damaged_checkpoints_give_one_line_and_exit_1(tmp_path, capsys, good_checkpoint, kind):
    bad = tmp_path / "checkpoint.pt"
    _damage(kind, bad, good_checkpoint)
    capsys.readouterr()
    assert main(["train", "--resume", str(bad), "--out", str(tmp_path / "run"), "--no-progress"]) == 1
    _one_line_error(capsys, "pmoe train: error:", str(bad))
    assert main(["show-routing", "--checkpoint", str(bad), "--out", str(tmp_path / "r.png")]) == 1
    _one_line_error(capsys, "pmoe show-routing: error:", str(bad))


def _write(path, data: bytes, gz: bool = False) -> None:
    import gzip

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("damage", ["bad gzip", "truncated", "wrong ndim", "code in a cifar batch"])
def test_damaged_data_files_give_one_line_and_exit_1(tmp_path, capsys, damage):
    raw = tmp_path / "MNIST" / "raw"
    header = bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in (20, 28, 28))
    labels = bytes([0, 0, 8, 1]) + (20).to_bytes(4, "big") + bytes(range(10)) * 2
    _write(raw / "train-labels-idx1-ubyte", labels)
    data = "mnist-patch"
    if damage == "bad gzip":
        _write(raw / "train-images-idx3-ubyte.gz", header + bytes(20 * 784))
        bad = raw / "train-images-idx3-ubyte.gz"
        bad.write_bytes(bad.read_bytes()[:40])
    elif damage == "truncated":
        bad = raw / "train-images-idx3-ubyte"
        _write(bad, header + bytes(100))
    elif damage == "wrong ndim":
        bad = raw / "train-images-idx3-ubyte"
        _write(bad, bytes([0, 0, 8, 2]) + (20).to_bytes(4, "big") + (784).to_bytes(4, "big") + bytes(20 * 784))
    else:
        _fake_cifar(tmp_path)
        bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
        marker = tmp_path / "ran"
        bad.write_bytes(b"cbuiltins\nexec\n(V" + f"open({str(marker)!r}, 'w')".encode() + b"\ntR.")
        data = "cifar10"
    rc = main(["train", "--data", data, "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), *TINY])
    assert rc == 1
    _one_line_error(capsys, "pmoe train: error:", str(bad))
    assert not (tmp_path / "ran").exists()


def test_a_diverging_run_stops_with_one_line_and_keeps_its_checkpoint(tmp_path, capsys):
    rc = main(["train", "--lr", "1e38", "--epochs", "3", "--n-train", "40", "--n-test", "20", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 1
    _one_line_error(capsys, "joint epoch 2, step 1: the training loss is inf", "the training diverged",
                    f"last checkpoint: {tmp_path / 'checkpoint.pt'} (joint epoch 1)")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("case", ["existing file", "under a file", "unwritable"])
def test_bad_out_paths_are_named_before_any_work(tmp_path, capsys, case):
    (tmp_path / "file").write_text("x")
    out, status = {"existing file": (tmp_path / "file", 2), "under a file": (tmp_path / "file" / "run", 2),
                   "unwritable": (tmp_path / "locked" / "run", 1)}[case]
    if case == "unwritable":
        (tmp_path / "locked").mkdir(mode=0o500)
        if os.access(tmp_path / "locked", os.W_OK):  # root writes anyway: try where the kernel refuses
            out = "/sys/pmoe-test-out"
            try:
                os.makedirs(out)
            except FileNotFoundError:
                pytest.skip("no unwritable directory on this machine")
            except OSError:
                pass
            else:
                os.rmdir(out)
                pytest.skip("no unwritable directory on this machine")
    for argv in (["train", "--n-train", "40", "--n-test", "20", "--no-progress"],
                 ["sample-complexity", "--samples", "4", "--seeds", "1", "--epochs", "1", "--no-progress"]):
        assert main([*argv, "--out", str(out)]) == status
        _one_line_error(capsys, "error: --out", str(out))


def test_show_routing_out_must_be_a_file_and_shows_the_images_asked_for(tmp_path, capsys, good_checkpoint):
    ck = str(good_checkpoint)
    assert main(["show-routing", "--checkpoint", ck, "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "--out", "is a directory")
    assert main(["show-routing", "--checkpoint", ck, "--out", str(tmp_path / "r.png"), "--start", "2",
                 "--images", "3"]) == 0
    assert "test images [2, 3, 4]" in capsys.readouterr().out


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["train", "--data", "mnist-patch", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"), *TINY]
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(FileNotFoundError, match="MNIST"):
            main(debug_argv)
    monkeypatch.setenv("PMOE_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(argv)


def test_ctrl_c_names_the_last_checkpoint_and_leaves_it_intact(tmp_path, capsys):
    import re
    import signal
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["train", "--data", "synthetic", "--n-train", "40", "--n-test", "20", "--out", str(tmp_path)]
    ck = tmp_path / "checkpoint.pt"
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pmoe", *argv, "--epochs", "100000"], stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": root},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 120
            while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ck.exists(), (tmp_path / "stderr").read_text()
            time.sleep(0.3)  # a few more epochs, so the signal may land in a checkpoint write
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 130
        finally:
            proc.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert "Traceback" not in stderr and "\r" not in stderr
    m = re.search(r"^pmoe train: interrupted; last checkpoint: (\S+) \(epoch (\d+)\)$", stderr, flags=re.M)
    assert m and m.group(1) == str(ck), stderr
    epoch = int(m.group(2))
    assert torch.load(ck, weights_only=True)["epoch"] == epoch and not (tmp_path / "checkpoint.pt.tmp").exists()
    assert main([*argv, "--epochs", str(epoch + 1), "--resume", str(ck), "--no-progress"]) == 0
    assert f"joint epoch {epoch + 1:>3}/{epoch + 1}" in capsys.readouterr().out

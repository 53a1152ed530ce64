"""pmoe equal-compute reports its progress: a plain line per epoch and network, so a run of
minutes shows where it is in a terminal and in a redirected log alike."""
import re

import torch

from pmoe.cli import main


def test_equal_compute_prints_a_line_per_epoch(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = main(["equal-compute", "--n-train", "32", "--n-test", "16", "--epochs", "2", "--seeds", "1",
                   "--batch-size", "16", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert rc == 0 and "\r" not in out + err  # captured output is no terminal: lines, no bar
    for net in ("flagship-pmoe", "flagship-dense"):
        epochs = re.findall(rf"^rep 0 {net} +epoch +(\d)/2  test +\d+\.\d%$", out, flags=re.M)
        assert epochs == ["1", "2"], out

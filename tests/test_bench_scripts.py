"""Smoke tests of the benchmark scripts in bench/ (each well under 30 s on a 2-core CPU)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)  # after the stdlib: bench/profile.py must not shadow `profile`

import compute_savings  # noqa: E402
import ratios  # noqa: E402

ROW_KEYS = {"name", "dense_infer_flops", "pmoe_infer_flops", "dense_train_flops", "pmoe_train_flops",
            "dense_infer_s", "pmoe_infer_s", "dense_train_s", "pmoe_train_s", "dense_saved_bytes",
            "pmoe_saved_bytes"}


def _run_script(args, timeout=120, **env):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_compute_savings_json_flagship_meets_flop_targets():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = compute_savings.main(["--json", "--repeats", "1", "--net-batch", "4",
                                   "--only", "flagship-digits", "flagship-cifar", "layer:wrn-pmoe"])
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out.getvalue())}
    assert set(rows) == {"flagship-digits", "flagship-cifar", "layer:wrn-pmoe"}
    for row in rows.values():
        assert ROW_KEYS <= row.keys()
        assert all(row[k] is not None and row[k] > 0 for k in ROW_KEYS - {"name"})
    for name in ("flagship-digits", "flagship-cifar"):
        r = rows[name]
        assert r["pmoe_infer_flops"] <= 0.5 * r["dense_infer_flops"], r
        assert r["pmoe_train_flops"] <= 0.8 * r["dense_train_flops"], r
    # SPEC §4 for the WRN layer: l/n + k/m = 16/64 + 4/640 of the dense conv
    r = rows["layer:wrn-pmoe"]
    assert r["pmoe_infer_flops"] / r["dense_infer_flops"] == pytest.approx(16 / 64 + 4 / 640)


def test_saved_bytes_counts_each_storage_once():
    x = torch.randn(1000, requires_grad=True)

    def fn():
        y = x * x  # saves x twice: one storage
        z = y.view(10, 100).sin()  # saves a view of y: y's storage
        return z.sum() + x[:10].exp().sum()  # exp saves its 10-element result

    assert compute_savings.saved_bytes(fn) == 4000 + 4000 + 40
    assert compute_savings.saved_bytes(fn, exclude=[x]) == 4000 + 40


def test_profile_writes_torch_trace(tmp_path):
    trace = tmp_path / "trace.json"
    _run_script([os.path.join(BENCH, "profile.py"), "--steps", "2", "--warmup", "1", "--batch", "4",
                 "--torch-profiler", str(trace), "--device", "cpu"])
    doc = json.loads(trace.read_text())
    names = {e.get("name") for e in doc["traceEvents"]}
    assert {"forward", "backward", "optimizer"} <= names  # pmoe.profiling ranges were on


def test_gpu_check_cpu_smoke(tmp_path):
    # the interpreter runs the fused kernels too (tests/conftest.py sets TRITON_INTERPRET=1)
    _run_script([os.path.join(BENCH, "gpu_check.py"), "--cpu-smoke", "--shapes", "wrn-pmoe",
                 "--out", str(tmp_path)], TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    (json_path,) = tmp_path.glob("*.json")
    assert json_path.with_suffix(".md").exists()
    doc = json.loads(json_path.read_text())
    assert doc["correctness"] and all(r.get("ok") for r in doc["correctness"]), doc["correctness"]
    kinds = {r["kind"] for r in doc["timing"] if "ms" in r}
    assert {"dense", "masking", "torch"} <= kinds
    variants = {str(r["variant"]) for r in doc["correctness"]}
    assert {"{'route': 'split'}", "{'route': 'fused'}"} <= variants
    (route,) = doc["route_timing"]  # one shape, one dtype: both routes timed
    assert route["fused_ms"] > 0 and route["split_ms"] > 0 and route["auto_picks"] == "fused"
    assert doc["max_batch"] and all(r.get("largest_fitting") for r in doc["max_batch"])


def test_ratios_table(tmp_path):
    def bench(kind, pass_name, median):
        return {"extra_info": {"shape": "s", "kind": kind, "pass_name": pass_name, "dtype": "float32"},
                "stats": {"median": median, "mean": median, "min": median}}

    fake = {"machine_info": {}, "benchmarks": [bench("dense", "forward", 2.0), bench("torch", "forward", 1.0),
                                                bench("masking", "forward", 3.0), bench("triton", "forward", 0.5)]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(fake))
    out = tmp_path / "r.md"
    with contextlib.redirect_stdout(io.StringIO()):
        assert ratios.main([str(path), "--out", str(out)]) == 0
    row = [line for line in out.read_text().splitlines() if line.startswith("| s ")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # dense, masking, torch, triton ms; torch/dense, masking/dense, triton/torch, triton/dense
    assert cells[3:] == ["2000.000", "3000.000", "1000.000", "500.000", "0.50", "1.50", "0.50", "0.25"]

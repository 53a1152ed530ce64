"""Smoke tests of the benchmark scripts in bench/ (each well under 30 s on a 2-core CPU)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import pmoe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)

import compute_savings  # noqa: E402
import ratios  # noqa: E402

ROW_KEYS = {"name", "dense_infer_flops", "pmoe_infer_flops", "dense_train_flops", "pmoe_train_flops",
            "dense_infer_s", "pmoe_infer_s", "dense_train_s", "pmoe_train_s", "dense_saved_bytes",
            "pmoe_saved_bytes"}


def _run_script(args, timeout=120, **env):
    base = {k: v for k, v in os.environ.items() if k != "PMOE_RING_BYTES"}  # the rings as shipped
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**base, **env})
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
    proc = _run_script([os.path.join(BENCH, "profile_layer.py"), "--steps", "2", "--warmup", "2", "--batch", "4",
                        "--torch-profiler", str(trace), "--device", "cpu"])
    doc = json.loads(trace.read_text())
    names = {e.get("name") for e in doc["traceEvents"]}
    assert {"forward", "backward", "optimizer"} <= names  # pmoe.profiling ranges were on
    if sys.platform.startswith("linux"):  # freed memory kept (glibc), page faults counted (resource)
        import allocator

        assert f"| freed memory: {'environment' if allocator._user_allocator() else 'kept'}" in proc.stdout
        assert re.search(r"minor page faults per step: \d+ in the warm-up's second half, \d+ profiled", proc.stdout)


# ---------------------------------------------------------------------------------------------
# bench/gpu_check.py and its modules (gpu_correctness, gpu_timing, gpu_model, gpu_report)


def _gpu_check(tmp_path, *args, interpret="1", timeout=240):
    """Run gpu_check --cpu-smoke into tmp_path -> (its report as a dict, the .md text)."""
    _run_script([os.path.join(BENCH, "gpu_check.py"), "--cpu-smoke", "--out", str(tmp_path), *args],
                timeout=timeout, TRITON_INTERPRET=interpret)
    (json_path,) = tmp_path.glob("*.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text()


def test_gpu_check_cpu_smoke_runs_the_kernels(tmp_path):
    # the interpreter runs the fused kernels: --quick at one shape covers every kernel section
    doc, md = _gpu_check(tmp_path, "--quick", "--only", "wrn")
    assert doc["checked_backend"] == "triton"
    assert all(v["status"] == "done" for v in doc["sections"].values()), doc["sections"]
    rows = doc["correctness"]
    assert rows and all(r.get("ok") for r in rows), rows
    assert {"float32", "bfloat16"} <= {r["dtype"] for r in rows}
    assert {"route": "split"} in [r["variant"] for r in rows]
    assert all(r["mismatch_rows"] == 0 and r["agree_rows"] + r["tie_rows"] == r["rows"] for r in rows)
    fused = [r for r in doc["timing"] if r["kind"] == "triton"]
    assert {r["pass"] for r in fused} == {"forward", "forward+backward"}
    assert all(r["events_ms"] > 0 and r["floor_ms"] > 0 and r["config"].startswith("fused; fwd ") for r in fused)
    assert "bwd " in next(r["config"] for r in fused if r["pass"] == "forward+backward")
    (route,) = doc["route_timing"]
    assert route["fused_events_ms"] > 0 and route["split_events_ms"] > 0 and route["auto_picks"] == "fused"
    launches = {p: [r for r in doc["launch_timing"] if r["pass"] == p and "measured_us" in r]
                for p in ("forward", "forward+backward")}
    assert launches["forward"] and len(launches["forward+backward"]) > len(launches["forward"])
    assert all(r["measured_us"] > 0 and r["config"] for rs in launches.values() for r in rs)
    assert doc["model"]["path"].startswith("bench/results/model-")
    assert "## Per launch" in md and "Traffic model:" in md
    rings = doc["ring_timing"]  # no ring, then the shipped cap, each pass
    assert [(r["ring_mb"], r["shipped"], r["pass"]) for r in rings] == [
        (0, False, "forward"), (0, False, "forward+backward"), (24, True, "forward"), (24, True, "forward+backward")]
    assert all(r["events_ms"] > 0 and r["/shipped events"] > 0 for r in rings)
    assert "_forward_kernel" in rings[0]["ring_images"] and "_rows_bwd_kernel" in rings[1]["ring_images"]
    assert "## Rings" in md
    pre = doc["pre_timing"]  # saved (as shipped), then recomputed; --quick: NCHW only
    assert [(r["layout"], r["pre"]) for r in pre] == [("nchw", "saved"), ("nchw", "recomputed")]
    assert all(r["events_ms"] > 0 and r["/saved events"] > 0 for r in pre)
    assert "## Pre-activations" in md


def test_gpu_check_cpu_smoke_every_section(tmp_path):
    # without the interpreter the torch backend stands in: every shape, variant and section
    import gpu_check

    doc, md = _gpu_check(tmp_path, interpret="0", timeout=120)
    assert doc["checked_backend"] == "torch"
    rows = doc["correctness"]
    # 4 shapes in fp32 + one in bf16, then every variant the torch path has (the routes are the kernels')
    assert len(rows) == 5 + len(gpu_check.VARIANTS) + len(gpu_check.POOLED_VARIANTS), [r["variant"] for r in rows]
    assert all(r.get("ok") for r in rows), rows
    variants = [r["variant"] for r in rows]
    assert {"pooled": True, "combine": "sum", "deterministic": True} in variants
    assert {"layout": "channels_last"} in variants
    assert {r["kind"] for r in doc["timing"] if "events_ms" in r} == {"dense", "masking", "torch"}
    assert len(doc["pooled_timing"]) == 4 * 2 and all(r["pooled_ms"] > 0 for r in doc["pooled_timing"])
    assert doc["ratios"] and all(r["torch/dense events"] > 0 for r in doc["ratios"])
    assert doc["max_batch"] and all(r.get("largest_fitting") for r in doc["max_batch"])
    assert doc["bandwidth"]["bytes_per_s"] > 0
    for heading in ("## Correctness", "## Speed", "## Ratios", "## Pooled", "## Largest"):
        assert heading in md


def test_gpu_check_sigterm_writes_what_it_has(tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(BENCH, "gpu_check.py"), "--cpu-smoke", "--out",
                             str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    try:
        deadline = time.monotonic() + 90
        rows = []
        while not rows and time.monotonic() < deadline:  # wait for the first finished row
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.05)
            for path in tmp_path.glob("*.json"):
                with contextlib.suppress(ValueError):
                    rows = json.loads(path.read_text())["correctness"]
        assert rows, "no row reported within 90 s"
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    (json_path,) = tmp_path.glob("*.json")
    doc = json.loads(json_path.read_text())
    assert doc["interrupted"]["signal"] == "SIGTERM", doc.get("interrupted")
    assert doc["correctness"] and all("ok" in r or "error" in r for r in doc["correctness"])
    assert doc["sections"][doc["interrupted"]["section"]]["status"] == "stopped"
    assert "Cut off** by SIGTERM" in json_path.with_suffix(".md").read_text()


def _plan_compiles(*args) -> int:
    out = _run_script([os.path.join(BENCH, "gpu_check.py"), "--plan", *args], timeout=120,
                      TRITON_INTERPRET="0").stdout
    return int(re.search(r"kernel compiles on a cold cache: (\d+)", out).group(1))


def test_gpu_check_plan_compiles_fit_the_machine():
    # a cold cache compiles each distinct kernel specialisation once, ~0.6 s each: the whole GPU
    # run must stay well inside 8 minutes, so the plan compiles far fewer than 250 (inference's and
    # training's forward, the backward with saved pre-activations and, for the pre section, without)
    full, quick = _plan_compiles(), _plan_compiles("--quick", "--only", "wrn")
    assert 0 < quick < full <= 160, (quick, full)


def test_tie_rows_near_ties_and_swaps():
    import gpu_correctness as gc

    # one image, one expert, n = 4, l = 2: the float64 scores put patches 0 and 2 first, 2 just
    # above 1 (0.01 apart at magnitude 2: under two bf16 steps, 2 x 2^-6, far over fp32's)
    scores = torch.tensor([[[3.0, 2.0, 2.01, 0.5]]], dtype=torch.float64)
    small = torch.full_like(scores, 1e-3)  # sum |x_i r_i|: a negligible accumulation bound
    picks = {"agree": [0, 2], "near tie": [0, 1], "clear swap": [0, 3], "repeated patch": [2, 2]}
    rows = {name: gc.classify_rows(torch.tensor([[idx]]), scores, small, torch.bfloat16, d=4)
            for name, idx in picks.items()}
    verdict = {name: next(k for k, m in r.items() if m.item()) for name, r in rows.items()}
    assert verdict == {"agree": "agree", "near tie": "tie", "clear swap": "mismatch", "repeated patch": "mismatch"}
    assert gc.classify_rows(torch.tensor([[[0, 1]]]), scores, small, torch.float32, d=4)["mismatch"].item()
    assert gc.dtype_step(torch.tensor([2.0, 3.0, 0.75], dtype=torch.float64), torch.bfloat16).tolist() == \
        [2 ** -6, 2 ** -6, 2 ** -8]


def test_bf16_selections_at_wrn_differ_only_by_ties(monkeypatch):
    # the torch path rounds bf16 scores as the kernels do: at the WRN shape some rows choose
    # otherwise than float64, every one a tie; without the band they would fail
    import gpu_correctness as gc
    from baselines import randomize_router
    from shapes import WRN

    torch.manual_seed(0)
    layer = pmoe.PMoEConv2d(WRN.in_channels, WRN.out_channels, 1, WRN.num_experts, WRN.top_l, backend="torch")
    randomize_router(layer)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(WRN.input_shape(256), dtype=torch.bfloat16)
    with torch.no_grad():
        _, routing = layer(x, return_routing=True)
    scores, bounds = gc.scores_and_bounds(x.double(), layer.router.detach().double(), 1)
    rows = gc.classify_rows(routing.indices, scores, bounds, torch.bfloat16, WRN.patch_dim)
    assert rows["tie"].sum() > 0 and rows["mismatch"].sum() == 0, {k: int(v.sum()) for k, v in rows.items()}
    monkeypatch.setattr(gc, "TIE_STEPS", 0)  # the fp32 accumulation bound alone
    strict = gc.classify_rows(routing.indices, scores, bounds, torch.bfloat16, WRN.patch_dim)
    assert strict["mismatch"].sum() > 0


@pytest.mark.parametrize("opts", [{}, {"combine": "sum"}, {"gate": "indicator"}, {"gate": "softmax_all"},
                                  {"bias": True, "activation": "gelu"}])
def test_reference_given_selection_is_the_layer(opts):
    # the float64 reference of gpu_check, given the torch path's own choice, is the torch path
    import gpu_correctness as gc
    from shapes import WRN, tiny

    shape = tiny(WRN)
    torch.manual_seed(1)
    layer = pmoe.PMoEConv2d(shape.in_channels, shape.out_channels, 1, shape.num_experts, shape.top_l,
                            backend="torch", **opts).double()
    x = torch.randn(shape.input_shape(3), dtype=torch.float64, requires_grad=True)
    y, routing = layer(x, return_routing=True)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, gates = gc.reference_given_selection(x2, params["router"], params["weight"], params.get("bias"), 1,
                                                routing.indices, layer.combine, layer.gate, layer.activation,
                                                torch.float64)
    torch.testing.assert_close(y_ref, y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gates, routing.gates, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-10, atol=1e-12)
    for name, p in layer.named_parameters():
        got = params[name].grad
        torch.testing.assert_close(got if got is not None else torch.zeros_like(p),
                                   p.grad if p.grad is not None else torch.zeros_like(p), rtol=1e-10, atol=1e-12)


def test_model_beside_measurements():
    import gpu_model
    import gpu_timing
    from shapes import SHAPES

    paths = gpu_model.candidates(os.path.join(BENCH, "results"))
    if not paths:
        pytest.skip("no model-*.json committed in bench/results")
    doc = gpu_model.load(paths[-1])
    s = doc["summaries"][0]
    shape = SHAPES[s["shape"]]
    dev = gpu_model.device_for(doc, "NVIDIA H200")
    assert dev["name"].startswith("H200")
    assert gpu_model.device_for(doc, "NVIDIA H100 80GB HBM3")["name"].startswith("H100")
    assert gpu_model.summary(doc, s["shape"], s["layout"], s["pass"], "bfloat16", s["gpu_batch"]) is s
    # re-timed at the report's own bandwidth, the launches sum to the report's model time
    assert gpu_model.remodel_seconds(s, dev, dev["hbm_bytes_per_s"]) == pytest.approx(gpu_model.model_seconds(s, dev))
    assert gpu_model.remodel_seconds(s, dev, dev["hbm_bytes_per_s"] / 2) > gpu_model.model_seconds(s, dev)

    ctx = gpu_timing.Context(torch.device("cpu"), "NVIDIA H200", 4.8e12, 132, {"doc": doc, "stale": []})
    modeled = gpu_model.triton_launches(s)
    ms = [0.01 * (i + 1) for i in range(len(modeled))]
    rows = gpu_timing._pair_with_model(shape, s["gpu_batch"], torch.bfloat16, s["layout"], s["pass"], modeled, ms, ctx)
    assert [r["kernel"] for r in rows] == [n for n, _ in modeled] and all(r["config_matches"] for r in rows)
    model_us = [r["model_us"] for r in rows]
    assert all(r["measured/model"] == pytest.approx(1e3 * t / u) for r, t, u in zip(rows, ms, model_us))
    other = gpu_timing._pair_with_model(shape, s["gpu_batch"], torch.bfloat16, s["layout"], s["pass"],
                                        [("_other_kernel", {})], [0.01], ctx)
    assert "model_us" not in other[0] and "not paired" in other[-1]["note"]
    # stale: the report against the kernels of today, and a copy made to match them
    now = {(x["shape"], x["layout"], x["pass"]): gpu_model.launch_signature(
        SHAPES[x["shape"]], x["gpu_batch"], x["dtype"], x["layout"], x["pass"]) for x in doc["summaries"]}
    fresh = {**doc, "summaries": [{**x, "rows": [{"kernel": n, "kind": "triton", "config": c}
                                                  for n, c in now[(x["shape"], x["layout"], x["pass"])]]}
                                  for x in doc["summaries"]]}
    assert gpu_model.stale(fresh, SHAPES) == []
    changed = {**fresh, "summaries": [{**fresh["summaries"][0], "rows": fresh["summaries"][0]["rows"][:-1]
                                       + [{"kernel": "_gone_kernel", "kind": "triton", "config": {}}]}]}
    assert len(gpu_model.stale(changed, SHAPES)) == 1


def test_gpu_report_targets():
    import gpu_report

    def row(kind, pass_name, ms, **extra):
        return {"shape": "large", "dtype": "bfloat16", "layout": "nchw", "pass": pass_name, "kind": kind,
                "events_ms": ms, **extra}

    timing = [row("triton", "forward", 1.0, pct_floor_events=50.0, pct_floor_graph=75.0, dense_floor_ms=2.0),
              row("torch", "forward", 2.5), row("dense", "forward", 1.5)]
    got = {t["target"]: t["met"] for t in gpu_report.target_rows(timing)}
    assert got == {"forward % of floor": "yes", "forward torch / fused": "no", "forward fused / dense conv": "no",
                   "forward fused / dense floor": "yes"}


def test_ratios_table(tmp_path):
    def bench(kind, pass_name, median):
        return {"extra_info": {"shape": "s", "kind": kind, "pass_name": pass_name, "dtype": "float32"},
                "stats": {"median": median, "mean": median, "min": median}}

    fake = {"machine_info": {}, "benchmarks": [bench("dense", "forward", 2.0), bench("torch", "forward", 1.0),
                                                bench("masking", "forward", 3.0), bench("triton", "forward", 0.5),
                                                bench("compiled", "forward", 0.8)]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(fake))
    out = tmp_path / "r.md"
    with contextlib.redirect_stdout(io.StringIO()):
        assert ratios.main([str(path), "--out", str(out)]) == 0
    row = [line for line in out.read_text().splitlines() if line.startswith("| s ")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # dense, masking, torch, compiled, triton ms; torch/dense, masking/dense, compiled/dense,
    # compiled/torch, triton/torch, triton/dense
    assert cells[3:] == ["2000.000", "3000.000", "1000.000", "800.000", "500.000", "0.50", "1.50", "0.40", "0.80",
                         "0.50", "0.25"]


@pytest.mark.parametrize("load, unset, expected", [(0.3, True, ""), (2.0, True, "PASSIVE"), (5.0, False, "ACTIVE")])
def test_omp_wait_policy_passive_only_on_a_shared_cpu(monkeypatch, load, unset, expected):
    """PASSIVE where other work keeps every core busy, OpenMP's default on an idle CPU, and a
    policy the environment sets is kept; the machine summary names the policy in force."""
    import omp_wait

    monkeypatch.setattr(omp_wait, "cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(omp_wait, "sys", types.SimpleNamespace(modules={}))  # torch's OpenMP not started yet
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # recorded, so that the policy set below is undone
    if unset:
        monkeypatch.delenv("OMP_WAIT_POLICY")
    assert omp_wait.choose_omp_wait() == expected
    assert os.environ.get("OMP_WAIT_POLICY", "") == expected
    summary = ratios.machine_summary({"machine_info": {"pmoe": {"omp_wait_policy": expected, "freed_memory": "kept"}}})
    assert f"OMP_WAIT_POLICY={expected or 'unset (OpenMP default)'}, freed memory: kept" in summary


def test_keep_freed_memory_leaves_a_set_allocator_alone(monkeypatch):
    """A MALLOC_* variable, glibc malloc tunables or a preloaded allocator are the user's choice and
    stay; off glibc's Linux there is nothing to set.  (Not called for real here: it would change
    this test process.)"""
    import allocator

    for name in [k for k in os.environ if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "GLIBC_TUNABLES")]:
        monkeypatch.delenv(name)
    for name, value in (("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"),
                        ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")):
        monkeypatch.setenv(name, value)
        assert allocator.keep_freed_memory() == "environment"
        monkeypatch.delenv(name)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() == "unsupported"


def test_train_time_compiled_leaves_the_network_as_it_was():
    """train_time.py --compile compiles before the first timed step without training: parameters,
    batch-norm statistics and gradients as before the warm-up."""
    import train_time
    from pmoe.models.flagship import FlagshipPMoE

    torch.manual_seed(0)
    net = FlagshipPMoE(in_channels=1, num_classes=2, widths=(4, 8, 16))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 2, (4,))
    torch._dynamo.reset()
    try:
        fast = train_time.compiled(net, x, y, backend="aot_eager")
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        assert all(p.grad is None for p in net.parameters())
        net.eval()
        torch.testing.assert_close(fast(x), net(x))
    finally:
        torch._dynamo.reset()

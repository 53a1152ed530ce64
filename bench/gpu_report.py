"""bench/gpu_check.py's report: one JSON document rendered to markdown, both written atomically
(a temporary file renamed over the old one), so a run cut off at any point leaves the last
complete report of what it had measured."""
from __future__ import annotations

import json
import os
import tempfile

# the GPU targets (README, Performance), checked from the timing rows (bf16, NCHW)
TARGET_PCT_FLOOR = {"forward": 70.0, "forward+backward": 50.0}
TARGET_SPEEDUP_VS_TORCH = 3.0
TARGET_LARGE_VS_DENSE = 0.6

CORRECTNESS_COLS = ["shape", "dtype", "variant", "batch", "ok", "rows", "agree_rows", "tie_rows", "mismatch_rows",
                    "y_err", "gates_err", "dx_err", "drouter_err", "dweight_err", "dbias_err", "unselected_max_abs",
                    "bit_identical", "tolerance", "failed", "error", "wall_s"]
TIMING_COLS = ["shape", "batch", "dtype", "layout", "pass", "kind", "events_ms", "graph_ms", "floor_ms",
               "pct_floor_events", "pct_floor_graph", "model_ms", "model_bw_ms", "tflops", "peak_mb", "config",
               "graph_error", "error"]
RATIO_COLS = ["shape", "dtype", "pass", "triton/torch events", "triton/torch graph", "triton/dense events",
              "triton/dense graph", "torch/dense events", "masking/dense events", "triton/dense floor"]
ROUTE_COLS = ["shape", "batch", "dtype", "auto_picks", "fused_events_ms", "split_events_ms", "fused/split events",
              "fused_graph_ms", "split_graph_ms", "fused/split graph", "note", "error"]
RING_COLS = ["shape", "batch", "dtype", "pass", "ring_mb", "shipped", "ring_images", "events_ms", "graph_ms",
             "/shipped events", "/shipped graph", "graph_error", "error"]
PRE_COLS = ["shape", "batch", "dtype", "layout", "pre", "events_ms", "graph_ms", "/saved events", "/saved graph",
            "peak_mb", "graph_error", "error"]
POOLED_COLS = ["shape", "batch", "backend", "dtype", "pass", "pooled_ms", "layer_sum_ms", "pooled/layer+sum",
               "bytes_avoided", "pooled_pct_floor", "pooled_peak_mb", "layer_sum_peak_mb", "error"]
LAUNCH_COLS = ["shape", "batch", "dtype", "pass", "index", "kernel", "config", "measured_us", "model_us",
               "measured/model", "bound", "config_matches", "note", "error"]
MAX_BATCH_COLS = ["network", "dtype", "largest_fitting", "first_failing", "cap", "note", "error"]
TARGET_COLS = ["shape", "target", "value", "goal", "met"]


def _fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    if isinstance(v, dict):
        return ", ".join(f"{k}={v[k]}" for k in v) or "default"
    return str(v).replace("|", "/")


def md_table(rows: list, cols: list) -> str:
    if not rows:
        return "(none in this run)"
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)] or cols[:1]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def target_rows(timing: list) -> list:
    """Issue 14's targets from the bf16 NCHW timing rows: % of floor (graph clock where it exists),
    speed-up over the torch path, and at the large shape the fused forward over the dense conv
    (measured) and over the dense conv's floor."""
    rows = []
    got = {(r["shape"], r["pass"], r["kind"]): r for r in timing
           if r.get("dtype") == "bfloat16" and r.get("layout", "nchw") == "nchw" and r.get("events_ms")}
    for (shape, pass_name, kind), r in sorted(got.items()):
        if kind != "triton":
            continue
        pct = r.get("pct_floor_graph") or r.get("pct_floor_events")
        rows.append(_target(shape, f"{pass_name} % of floor", pct, f">= {TARGET_PCT_FLOOR[pass_name]:.0f}",
                            pct is not None and pct >= TARGET_PCT_FLOOR[pass_name]))
        torch_row = got.get((shape, pass_name, "torch"))
        if torch_row:
            speedup = torch_row["events_ms"] / r["events_ms"]
            rows.append(_target(shape, f"{pass_name} torch / fused", speedup, f">= {TARGET_SPEEDUP_VS_TORCH:g}",
                                speedup >= TARGET_SPEEDUP_VS_TORCH))
        dense = got.get((shape, pass_name, "dense"))
        if shape.startswith("large") and pass_name == "forward":
            if dense:
                ratio = r["events_ms"] / dense["events_ms"]
                rows.append(_target(shape, "forward fused / dense conv", ratio, f"<= {TARGET_LARGE_VS_DENSE}",
                                    ratio <= TARGET_LARGE_VS_DENSE))
            if r.get("dense_floor_ms"):
                ratio = r["events_ms"] / r["dense_floor_ms"]
                rows.append(_target(shape, "forward fused / dense floor", ratio, f"<= {TARGET_LARGE_VS_DENSE}",
                                    ratio <= TARGET_LARGE_VS_DENSE))
    return rows


def _target(shape, target, value, goal, met) -> dict:
    return {"shape": shape, "target": target, "value": value, "goal": goal, "met": "yes" if met else "no"}


def _header(doc: dict) -> list:
    m = doc["machine"]
    bw = doc.get("bandwidth") or {}
    model = doc.get("model") or {}
    lines = [f"# pMoE GPU check — {m['device']}, {m['date']}", "",
             f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, python {m['python']}; "
             f"mode: {doc['mode']}; kernels checked via backend={doc['checked_backend']!r}; "
             f"fp32 matmul precision={doc['fp32_matmul_precision']}; wall {doc.get('wall_s', 0):.0f} s", ""]
    if doc.get("crashed"):
        lines += [f"**Crashed** in section `{doc['crashed']}` (traceback under Errors): what follows is what had "
                  f"been measured.", ""]
    if doc.get("interrupted"):
        lines += [f"**Cut off** by {doc['interrupted']['signal']} during section "
                  f"`{doc['interrupted']['section']}` after {doc['interrupted']['after_s']:.0f} s: "
                  f"what follows is what had been measured.", ""]
    lines += [f"Plan: {doc['plan']['summary']}; estimated kernel compiles: {_fmt(doc['plan'].get('compiles'))} "
              f"({doc['plan'].get('compiles_note', '')}).", "",
              "Sections: " + ", ".join(f"{k} {v['status']}" + (f" ({v['wall_s']:.0f} s)" if v.get('wall_s') else "")
                                       for k, v in doc.get("sections", {}).items()), ""]
    if bw:
        lines += [f"Measured copy bandwidth: {bw['bytes_per_s'] / 1e12:.3g} TB/s ({bw['copy_bytes'] / 2**30:.2g} GiB "
                  f"read + written in {bw['ms']:.3g} ms); floors use it, and the dot rates of "
                  f"bench/traffic_model.py.", ""]
    if model:
        lines += [f"Traffic model: `{model.get('path')}` (model_ms: its time for {model.get('device', '-')}; "
                  f"model_bw_ms: its launches re-timed at the measured bandwidth)."
                  + (" It describes these kernels." if not model.get("stale") else
                     " **Stale**: it traced other kernels than these, so its times describe old code:"), ""]
        lines += [f"- {line}" for line in model.get("stale", [])]
        lines += [""] if model.get("stale") else []
    return lines


def markdown(doc: dict) -> str:
    parts = _header(doc) + [
        "## Correctness (float64 reference on the same rounded values; selection: agree / tie / mismatch)", "",
        "A tie: the two selections differ only in patches whose float64 scores lie within the tie band of the "
        "l-th score (two steps of the dtype plus the fp32 accumulation bound).  Outputs and gradients are "
        "compared with the reference run on the kernel's own selection.", "",
        md_table(doc.get("correctness", []), CORRECTNESS_COLS), "",
        "## Speed (medians, L2 cleared), roofline, model, peak memory", "",
        "events: do_bench (CUDA events, host launches); graph: CUDA graph replay.  floor: max(bytes / measured "
        "bandwidth, FLOPs / dot rate).  model_ms / model_bw_ms: the traffic model's prediction (fused layer).", "",
        md_table(doc.get("timing", []), TIMING_COLS), "",
        "## Ratios (time / time; < 1: the first is faster)", "",
        md_table(doc.get("ratios", []), RATIO_COLS), "",
        "## Targets (bf16, NCHW)", "",
        md_table(doc.get("targets", []), TARGET_COLS), "",
        "## Routing: one-launch forward vs split route (scores, select, experts), forward", "",
        md_table(doc.get("route_timing", []), ROUTE_COLS), "",
        "## Rings: the NCHW forward's row copy and the backward's T held in rings of at most ring_mb MB "
        "(0: copies of the whole batch); time over the shipped cap's", "",
        md_table(doc.get("ring_timing", []), RING_COLS), "",
        "## Pre-activations saved by the forward vs recomputed by the backward, forward+backward; time over "
        "the saved run's", "",
        md_table(doc.get("pre_timing", []), PRE_COLS), "",
        "## Pooled epilogue: forward_pooled vs layer + .sum((2, 3)), same backend", "",
        md_table(doc.get("pooled_timing", []), POOLED_COLS), "",
        "## Per launch: measured (events around each launch, L2 cleared per call) vs the model", "",
        md_table(doc.get("launch_timing", []), LAUNCH_COLS), "",
        "## Largest training batch (flagship, 3x32x32, fp32, bounded search)", "",
        md_table(doc.get("max_batch", []), MAX_BATCH_COLS)]
    if doc.get("tracebacks"):
        parts += ["", "## Errors", "", "```", *doc["tracebacks"], "```"]
    return "\n".join(parts) + "\n"


def _write_atomic(path: str, text: str) -> None:
    """Write a fresh temporary file, then rename it over path.  Its own temporary name each
    time: a signal handler that writes the report while a write is under way must not share
    (and truncate) the interrupted write's file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would carry over to the report
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write(doc: dict, stem: str) -> None:
    """stem.json and stem.md, each replaced whole."""
    _write_atomic(stem + ".json", json.dumps(doc, indent=1, default=str))
    _write_atomic(stem + ".md", markdown(doc))

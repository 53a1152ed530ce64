"""The traffic model's predictions for bench/gpu_check.py: read from a report that bench/traffic.py
wrote and that is committed in bench/results/ (model-*.json), never traced on the GPU machine.

A model report holds, per (shape, layout, pass, dtype) at the shape's GPU batch, every launch the
layer made when it was traced (kernel name, config, programs, L2<->SM bytes, DRAM bytes, dot
FLOPs by class) and the modeled time of each launch on an H100 and an H200.  gpu_check prints
  model_ms     the report's modeled time for the device it runs on (by name: H200 or H100), and
  model_bw_ms  the same launches re-timed with the bandwidth measured on this device (and its
               SM count) in place of the report's HBM constant (traffic_model.launch_time),
beside each measured time of the fused layer.  A report describes the kernels of the commit it
was traced at: launch_signature() gives the launches the current kernels make (recorded on meta
tensors, nothing runs), and stale() names the summaries whose launches or configs differ.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

import traffic_model as tm

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
CONFIG_KEYS = ("num_warps", "num_stages")  # besides BLOCK* and *_POW2: what bench/traffic.py records


def launch_config(kwargs: dict) -> dict:
    """The config of one launch as bench/traffic.py records it: BLOCK*, *_POW2, warps, stages."""
    return {k: v for k, v in kwargs.items() if isinstance(v, (int, bool))
            and (k.startswith("BLOCK") or k in CONFIG_KEYS or k.endswith("_POW2"))}


def kernel_name(kernel) -> str:
    """The Python name of a Triton kernel (through JITFunction / autotuner / interpreter wrappers)."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__name__", "kernel")


# ---------------------------------------------------------------------------------------------
# reading a report


def load(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("kind") != "model" or "summaries" not in doc:
        raise ValueError(f"{path}: not a bench/traffic.py model report")
    doc["path"] = path
    return doc


def candidates(results_dir: str) -> list[str]:
    """model-*.json in results_dir, newest report date first (then name, descending)."""
    paths = glob.glob(os.path.join(results_dir, "model-*.json"))
    dated = []
    for path in paths:
        try:
            dated.append((load(path).get("date", ""), os.path.basename(path), path))
        except (OSError, ValueError):
            continue
    return [p for _, _, p in sorted(dated, reverse=True)]


def summary(doc: dict, shape: str, layout: str, pass_name: str, dtype: str, batch: int) -> Optional[dict]:
    """The report's summary for one configuration at this batch (dtype: a torch name or the
    model's), or None."""
    dtype = DTYPE_NAMES.get(dtype, dtype)
    for s in doc["summaries"]:
        if (s["shape"], s.get("layout", "nchw"), s["pass"], s["dtype"], s["gpu_batch"]) == \
                (shape, layout, pass_name, dtype, batch):
            return s
    return None


def triton_launches(s: dict) -> list[tuple[str, dict]]:
    """(kernel, config) of each Triton launch of a summary, in order."""
    return [(r["kernel"], r.get("config", {})) for r in s["rows"] if r["kind"] == "triton"]


def device_for(doc: dict, device_name: str) -> dict:
    """The report's device entry for a GPU name (H200 / H100 by substring; else the first)."""
    devices = doc["devices"]
    for dev in devices:
        if dev["name"].split()[0].lower() in device_name.lower():
            return dev
    return devices[0]


# ---------------------------------------------------------------------------------------------
# predictions


def model_seconds(s: dict, dev: dict) -> float:
    """The report's modeled time of a summary on one of its devices."""
    return s["devices"][dev["name"]]["model_s"]


def remodel_seconds(s: dict, dev: dict, hbm_bytes_per_s: float, sms: Optional[int] = None) -> float:
    """The summary's launches re-timed by traffic_model.launch_time with a measured HBM bandwidth
    (and SM count) in place of the device's constants; L2 bandwidth, dot rates and launch
    overhead stay the report's."""
    device = tm.Device(dev["name"], hbm_bytes_per_s=hbm_bytes_per_s, l2_bytes_per_s=dev["l2_bytes_per_s"],
                       sms=sms or dev["sms"], launch_s=dev["launch_s"], dot_flops_per_s=dev["dot_flops_per_s"])
    return sum(tm.launch_time(device, r["l2"], r["dram"], r["flops_by_class"], r["programs"])[0] for r in s["rows"])


def launch_rows(s: dict, dev: dict) -> list[dict]:
    """Per launch of a summary: kernel, kind, phase, config, modeled seconds and bound."""
    return [{"kernel": r["kernel"], "kind": r["kind"], "phase": r["phase"], "config": r.get("config", {}),
             "model_s": r["model"][dev["name"]]["s"], "bound": r["model"][dev["name"]]["bound"]}
            for r in s["rows"]]


# ---------------------------------------------------------------------------------------------
# what the current kernels launch (meta tensors: no GPU, nothing runs)


def launch_signature(shape, batch: int, dtype: str, layout: str, pass_name: str, sm: int = 90
                     ) -> list[tuple[str, dict]]:
    """(kernel, config) of every Triton launch of the fused layer (concat / softmax / ReLU / no
    bias, ROUTE "auto") for this shape on a GPU of capability sm with 132 multiprocessors (what
    bench/traffic.py traces: the interpreter runs sm_90 configs), recorded on meta tensors."""
    import torch

    from pmoe.kernels import launch, registry

    problem = registry.Problem(shape.name, batch, shape.in_channels, shape.height, shape.width,
                               shape.patch_size, shape.num_experts, shape.expert_features, shape.top_l,
                               channels_last=layout == "channels_last")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[DTYPE_NAMES.get(dtype, dtype)]
    forward, backward = registry.record(problem, dt, sm, save_pre=pass_name != "forward")
    seen = [(kernel_name(kernel), launch_config(kwargs)) for kernel, _, _, kwargs in forward + backward]
    forward_ends = [len(forward)]
    return seen[:forward_ends[0]] if pass_name == "forward" else seen


def stale(doc: dict, shapes: dict, sm: int = 90) -> list[str]:
    """One line per summary of the report whose Triton launches (names, order, configs) differ
    from what the current kernels launch for it; [] when the report describes these kernels."""
    lines = []
    for s in doc["summaries"]:
        shape = shapes.get(s["shape"])
        if shape is None:
            lines.append(f"{s['shape']}: not a benchmark shape")
            continue
        try:
            now = launch_signature(shape, s["gpu_batch"], s["dtype"], s.get("layout", "nchw"), s["pass"], sm)
        except Exception as exc:  # the kernels cannot be recorded here (e.g. no triton)
            lines.append(f"{s['shape']} {s.get('layout', 'nchw')} {s['pass']}: not checked ({type(exc).__name__})")
            continue
        then = triton_launches(s)
        if now != then:
            names = lambda seq: " ".join(n for n, _ in seq)  # noqa: E731
            lines.append(f"{s['shape']} {s.get('layout', 'nchw')} {s['pass']}: model traced {names(then)}; "
                         f"the kernels now launch {names(now)}" + (" (other configs)" if names(now) == names(then)
                                                                   else ""))
    return lines


def choose(results_dir: str, shapes: dict, sm: int = 90, path: Optional[str] = None) -> dict:
    """The model report to compare with: `path` if given, else the newest report in results_dir
    that describes the current kernels, else the newest one.  -> {"doc", "path", "stale": lines}
    ({"doc": None, ...} when there is none)."""
    paths = [path] if path else candidates(results_dir)
    first = None
    for p in paths:
        doc = load(p)
        lines = stale(doc, shapes, sm)
        if not lines:
            return {"doc": doc, "path": p, "stale": []}
        first = first or {"doc": doc, "path": p, "stale": lines}
    return first or {"doc": None, "path": None, "stale": ["no model-*.json in " + results_dir]}

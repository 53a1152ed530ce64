"""Speed of the pMoE layer and its baselines, for bench/gpu_check.py.

Every time is a median with the L2 cleared before each call (a 256 MB write between calls), so
inputs are never cache-resident, measured two ways on CUDA:
  events_ms  triton.testing.do_bench: one CUDA-event pair around each call, launched from Python
             (includes the host's launch cost where the GPU outruns it);
  graph_ms   the same calls captured in a CUDA graph, each after its L2 clear, n per graph: one
             graph replay timed with events, less the replay of a graph of the n clears alone,
             over n; median over replays.  No host launch cost: what a captured training step sees.
On CPU (--cpu-smoke) only events_ms exists: a wall-clock median of three calls.

Floors: bytes / the device's measured copy bandwidth (measure_bandwidth: torch's copy_ of a
large tensor, read + write) and FLOPs / the dot rate of the dtype (bench/traffic_model.py:
bf16/fp16 790 TFLOP/s, fp32 as tf32x3 132 TFLOP/s); pct_of_floor = floor / time.
Bytes (floor_bytes): forward reads x, writes y, reads the weights and router once;
forward+backward adds reading dy, x and the weights again, writing dx and dW.  FLOPs are counted
by FlopCounterMode for each implementation (the fused op through its registered formula).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

import gpu_model
import traffic_model as tm
from baselines import make_layer, randomize_router
from gpu_correctness import dname, forced_route
from shapes import LayerShape

PASSES = ("forward", "forward+backward")
EVENTS_WARMUP_MS, EVENTS_REP_MS = 10, 40
GRAPH_TARGET_MS, GRAPH_MAX_CALLS, GRAPH_REPLAYS = 30.0, 100, 5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# the two clocks


def _l2_flush_buffer():
    import triton
    return triton.runtime.driver.active.get_empty_cache_for_benchmark()


def events_ms(fn: Callable, device: torch.device) -> float:
    """Median ms of fn, L2 cleared before each call (do_bench); CPU: median of 3 wall times."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=EVENTS_WARMUP_MS, rep=EVENTS_REP_MS, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _replay_ms(graph, replays: int) -> list[float]:
    out = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def _capture(body: Callable, calls: int, stream):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            body()
    torch.cuda.synchronize()
    return graph


def graph_ms(fn: Callable, device: torch.device, estimate_ms: float) -> Optional[float]:
    """Median ms of fn inside a CUDA graph, L2 cleared before each call (see the module
    docstring); None on CPU.  estimate_ms (e.g. events_ms) sizes the graph."""
    if device.type != "cuda":
        return None
    flush = _l2_flush_buffer()
    calls = max(1, min(GRAPH_MAX_CALLS, int(GRAPH_TARGET_MS / max(estimate_ms, 1e-3))))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up on the capture stream (per-stream caches, lazy allocations)
        torch.cuda.synchronize()

        def work():
            flush.zero_()
            fn()

        with_fn = _capture(work, calls, stream)
        flush_only = _capture(flush.zero_, calls, stream)
        ms = (statistics.median(_replay_ms(with_fn, GRAPH_REPLAYS))
              - statistics.median(_replay_ms(flush_only, GRAPH_REPLAYS))) / calls
    torch.cuda.current_stream().wait_stream(stream)
    del with_fn, flush_only
    return ms


def both_clocks(fn: Callable, device: torch.device) -> dict:
    """{"events_ms", "graph_ms"} (graph_error instead of graph_ms when capture fails)."""
    out = {"events_ms": events_ms(fn, device)}
    try:
        out["graph_ms"] = graph_ms(fn, device, out["events_ms"])
    except Exception as exc:  # a path that cannot be captured is a finding, not a crash
        out["graph_ms"] = None
        out["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        sync(device)
    return out


# ---------------------------------------------------------------------------------------------
# the device: bandwidth, peak memory, FLOPs


def measure_bandwidth(device: torch.device) -> dict:
    """Copy bandwidth of the device: dst.copy_(src) of a 1 GiB (CUDA; 32 MiB on CPU) tensor,
    read + write bytes over the events_ms median.  -> {"bytes_per_s", "copy_bytes", "ms"}."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 23)
    src = torch.ones(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = events_ms(lambda: dst.copy_(src), device)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"bytes_per_s": moved / (ms * 1e-3), "copy_bytes": moved, "ms": ms}


def peak_mb(fn: Callable, device: torch.device, reset: Callable = lambda: None) -> Optional[float]:
    """Peak CUDA memory allocated by one call of fn above what was allocated before, MiB."""
    if device.type != "cuda":
        return None
    reset()
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def counted_flops(fn: Callable) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# floors and configs


def floor_bytes(shape: LayerShape, batch: int, elt: int, pass_name: str, pooled: bool = False) -> int:
    """Bytes the layer cannot move less than (module docstring); pooled: the output (and its
    gradient) is (B, out), not the map.  Unpooled: traffic_model.layer_floor_bytes."""
    if not pooled:
        return tm.layer_floor_bytes(shape, batch, elt, pass_name)
    x = batch * shape.in_channels * shape.height * shape.width
    w = shape.num_experts * shape.expert_features * shape.patch_dim + shape.num_experts * shape.patch_dim
    y = batch * shape.out_channels
    fwd = x + y + w
    return elt * (fwd if pass_name == "forward" else fwd + y + x + w + x + w)


def dot_rate(dtype: torch.dtype) -> float:
    """The model's dot FLOP/s for a layer dtype (traffic_model.DOT_RATES)."""
    return tm.DOT_RATES[tm.dtype_dot_class(gpu_model.DTYPE_NAMES[dname(dtype)])]


def floor_seconds(nbytes: float, flops: float, dtype: torch.dtype, bytes_per_s: float) -> float:
    return max(nbytes / bytes_per_s, flops / dot_rate(dtype))


def device_generation(device: torch.device) -> tuple[int, int]:
    """(compute capability as 90, SMs) configs are chosen for (the interpreter runs sm_90, 132)."""
    if device.type != "cuda":
        return 90, 132
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor, torch.cuda.get_device_properties(device).multi_processor_count


def _compact(cfg) -> str:
    parts = []
    for key, value in dataclasses.asdict(cfg).items():
        if isinstance(value, dict):
            continue
        if key.startswith("block_"):
            parts.append(f"{key[6:].upper()}={value}")
        elif isinstance(value, bool):
            parts.append(key if value else "")
        else:
            parts.append(f"{key}={value}")
    return " ".join(p for p in parts if p)


def config_of(shape: LayerShape, batch: int, dtype: torch.dtype, device: torch.device, pass_name: str,
              layout: str = "nchw") -> dict:
    """The launch configs this shape runs (kernels/configs.py), as {"route", "fwd", "bwd"} strings
    and the raw dicts; the route is what pmoe.kernels.launch.ROUTE takes now ("auto": the
    launcher's rule)."""
    from pmoe.kernels import configs, launch

    sm, sms = device_generation(device)
    n, d, k, l, m = shape.num_patches, shape.patch_dim, shape.num_experts, shape.top_l, shape.expert_features
    elt = torch.empty(0, dtype=dtype).element_size()
    channels_inner = layout == "channels_last" and shape.in_channels > 1  # launch.gather_source's rule
    fwd = configs.forward_config(n, d, k, l, m, elt, sm, shape.combine == "sum",
                                 channels_inner and shape.patch_size > 1)
    problem = launch.Problem(batch, shape.in_channels, shape.height, shape.width, shape.patch_size, k, m, l)
    out = {"route": "fused" if launch.use_fused_route(problem) else "split", "fwd": _compact(fwd),
           "raw": {"fwd": dataclasses.asdict(fwd)}}
    if pass_name != "forward":
        bwd = configs.backward_config(batch, n, d, k, l, m, elt, sm, sms)
        out["bwd"] = _compact(bwd)
        out["raw"]["bwd"] = dataclasses.asdict(bwd)
    return out


def config_text(cfg: Optional[dict]) -> Optional[str]:
    if not cfg:
        return None
    return f"{cfg['route']}; fwd {cfg['fwd']}" + (f"; bwd {cfg['bwd']}" if "bwd" in cfg else "")


# ---------------------------------------------------------------------------------------------
# the model beside a measurement


def model_columns(model: Optional[dict], shape: LayerShape, batch: int, dtype: torch.dtype, layout: str,
                  pass_name: str, device_name: str, bytes_per_s: float, sms: int) -> dict:
    """model_ms / model_bw_ms (gpu_model) for the fused layer, or {} when the report has no
    summary for this configuration."""
    if not model or model.get("doc") is None:
        return {}
    doc = model["doc"]
    s = gpu_model.summary(doc, shape.name, layout, pass_name, dname(dtype), batch)
    if s is None:
        return {}
    dev = gpu_model.device_for(doc, device_name)
    return {"model_ms": 1e3 * gpu_model.model_seconds(s, dev),
            "model_bw_ms": 1e3 * gpu_model.remodel_seconds(s, dev, bytes_per_s, sms),
            "model_device": dev["name"], "model_stale": bool(model.get("stale"))}


# ---------------------------------------------------------------------------------------------
# the layer


def _inputs(shape: LayerShape, batch: int, dtype, device, layout: str):
    x = torch.randn(shape.input_shape(batch), device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _fused_layer(shape: LayerShape, batch: int, dtype, ctx: "Context", layout: str):
    """(layer, x, dy): the seeded fused layer with a randomized router, an input in `layout` and a
    gradient of its output's shape, as the fused-only sections time it."""
    torch.manual_seed(0)
    layer = make_layer(shape, "triton", ctx.device, dtype)
    randomize_router(layer)
    x = _inputs(shape, batch, dtype, ctx.device, layout)
    with torch.no_grad():
        dy = torch.randn_like(layer(x))
    return layer, x, dy


def pass_fns(layer, x: torch.Tensor, dy: torch.Tensor, call: Optional[Callable] = None) -> dict:
    """{"forward": no_grad call, "forward+backward": call + backward(dy) from fresh grads}."""
    call = call or layer

    def forward():
        with torch.no_grad():
            call(x)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        call(x.requires_grad_(True)).backward(dy)

    return {"forward": forward, "forward+backward": forward_backward}


@dataclasses.dataclass
class Context:
    """What every timing row needs about the device: its name, measured copy bandwidth and SMs,
    and the model report (gpu_model.choose) to print beside the fused layer's times."""
    device: torch.device
    device_name: str
    bytes_per_s: float
    sms: int
    model: Optional[dict] = None


def time_layer(shape: LayerShape, batch: int, kind: str, dtype: torch.dtype, ctx: Context,
               layout: str = "nchw") -> list:
    """One implementation (baselines.KINDS) of one shape, forward and forward+backward: both
    clocks, counted FLOPs, floor and % of it per clock, peak memory; for the fused layer also
    its configs, the model's prediction and the dense conv's floor (the large-shape target)."""
    device = ctx.device
    torch.manual_seed(0)
    layer = make_layer(shape, kind, device, dtype)
    randomize_router(layer)
    x = _inputs(shape, batch, dtype, device, layout)
    with torch.no_grad():
        dy = torch.randn_like(layer(x))
    rows = []
    for pass_name, fn in pass_fns(layer, x, dy).items():
        flops = counted_flops(fn)
        nbytes = floor_bytes(shape, batch, x.element_size(), pass_name)
        floor_s = floor_seconds(nbytes, flops, dtype, ctx.bytes_per_s)
        row = {"shape": shape.name, "batch": batch, "kind": kind, "dtype": dname(dtype), "layout": layout,
               "pass": pass_name, **both_clocks(fn, device), "flops": flops, "floor_bytes": nbytes,
               "floor_ms": 1e3 * floor_s}
        for clock in ("events", "graph"):
            ms = row.get(clock + "_ms")
            row[f"pct_floor_{clock}"] = None if not ms else 100 * floor_s / (ms * 1e-3)
        row["tflops"] = flops / (row["events_ms"] * 1e-3) / 1e12
        row["peak_mb"] = peak_mb(fn, device, reset=lambda: (layer.zero_grad(set_to_none=True),
                                                            setattr(x, "grad", None)))
        if kind == "triton":
            row.update(_fused_columns(shape, batch, dtype, ctx, layout, pass_name))
        rows.append(row)
    return rows


def _fused_columns(shape, batch, dtype, ctx: Context, layout: str, pass_name: str) -> dict:
    elt = torch.empty(0, dtype=dtype).element_size()
    dense_s = floor_seconds(tm.dense_floor_bytes(shape, batch, elt, pass_name), tm.dense_flops(shape, batch, pass_name),
                            dtype, ctx.bytes_per_s)
    cfg = config_of(shape, batch, dtype, ctx.device, pass_name, layout)
    return {"config": config_text(cfg), "config_raw": cfg["raw"], "dense_floor_ms": 1e3 * dense_s,
            **model_columns(ctx.model, shape, batch, dtype, layout, pass_name, ctx.device_name, ctx.bytes_per_s,
                            ctx.sms)}


def ratio_rows(timing: list) -> list:
    """triton/torch, triton/dense, torch/dense, masking/dense (events and graph clocks), and the
    fused layer over the dense conv's floor, per (shape, dtype, pass), NCHW rows."""
    ms = {(r["shape"], r["dtype"], r["pass"], r["kind"]): r for r in timing
          if r.get("events_ms") and r.get("layout", "nchw") == "nchw"}
    out = []
    for shape, dtype, pass_name in sorted({key[:3] for key in ms}):
        row = {"shape": shape, "dtype": dtype, "pass": pass_name}
        for clock in ("events", "graph"):
            for a, b in (("triton", "torch"), ("triton", "dense"), ("torch", "dense"), ("masking", "dense")):
                ra, rb = ms.get((shape, dtype, pass_name, a)), ms.get((shape, dtype, pass_name, b))
                va, vb = (ra or {}).get(clock + "_ms"), (rb or {}).get(clock + "_ms")
                row[f"{a}/{b} {clock}"] = va / vb if va and vb else None
        fused = ms.get((shape, dtype, pass_name, "triton"))
        if fused and fused.get("dense_floor_ms"):
            row["triton/dense floor"] = fused["events_ms"] / fused["dense_floor_ms"]
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# the two routes, the pooled epilogue


def time_route(shape: LayerShape, batch: int, dtype: torch.dtype, ctx: Context) -> dict:
    """Forward of the fused layer with the one-launch forward (route + experts) and with the
    split route (scores, select, experts), both clocks, and what ROUTE="auto" picks."""
    from pmoe.kernels import configs

    torch.manual_seed(0)
    layer = make_layer(shape, "triton", ctx.device, dtype)
    randomize_router(layer)
    x = torch.randn(shape.input_shape(batch), device=ctx.device, dtype=dtype)
    fits = configs.route_fits(shape.num_patches, shape.num_experts)
    with forced_route("auto"):
        auto = config_of(shape, batch, dtype, ctx.device, "forward")["route"]
    row = {"shape": shape.name, "batch": batch, "dtype": dname(dtype), "auto_picks": auto}
    if not fits:
        return {**row, "note": "n, k over the one-launch route's cap: split only"}

    def forward():
        with torch.no_grad():
            layer(x)

    for route in ("fused", "split"):
        with forced_route(route):
            row.update({f"{route}_{k}": v for k, v in both_clocks(forward, ctx.device).items()})
    for clock in ("events", "graph"):
        a, b = row.get(f"fused_{clock}_ms"), row.get(f"split_{clock}_ms")
        row[f"fused/split {clock}"] = a / b if a and b else None
    return row


# ring caps (MB) the ring section times: 0 = no ring (copies of all B images), None = as shipped
# (configs.RING_BYTES_DEFAULT, whatever PMOE_RING_BYTES says).  A ring spans the groups in flight
# or is not used (configs.ring_images), so other caps only move the threshold between these two.
RING_SWEEP_MB = (0, None)


def ring_images_of(fn: Callable) -> dict:
    """{kernel: images its ring holds} (the `ring` / `t_ring` argument of each Triton launch)
    over one call of fn, which runs as usual."""
    from pmoe.kernels import launch

    seen = {}

    def record(kernel, grid, args, kwargs):
        named = dict(zip(kernel.arg_names, args))
        for key in ("ring", "t_ring"):
            if key in named:
                seen[gpu_model.kernel_name(kernel)] = int(named[key])
        kernel[grid](*args, **kwargs)

    saved, launch.RECORDER = launch.RECORDER, record
    try:
        fn()
    finally:
        launch.RECORDER = saved
    return seen


def time_rings(shape: LayerShape, batch: int, dtype: torch.dtype, ctx: Context) -> list:
    """The fused layer on an NCHW map with its rings (the forward's row copy, the backward's T;
    kernels/configs.RING_BYTES) capped at each of RING_SWEEP_MB: both passes, both clocks, the
    images each ring got, and the time over the shipped cap's.  The model counts a ring's bytes
    once in DRAM and does not time the writers' waits on a small ring, so whether a ring in L2
    beats a copy of the batch, and which size does best, is this section's question."""
    from pmoe.kernels import configs

    layer, x, dy = _fused_layer(shape, batch, dtype, ctx, "nchw")
    saved, rows = configs.RING_BYTES, []
    try:
        for mb in RING_SWEEP_MB:
            configs.RING_BYTES = configs.RING_BYTES_DEFAULT if mb is None else mb << 20
            for pass_name, fn in pass_fns(layer, x, dy).items():
                rings = ring_images_of(fn)
                rows.append({"shape": shape.name, "batch": batch, "dtype": dname(dtype), "pass": pass_name,
                             "ring_mb": configs.RING_BYTES / 2**20, "shipped": mb is None,
                             "ring_images": ", ".join(f"{k} {v}" for k, v in rings.items()) or None,
                             **both_clocks(fn, ctx.device)})
    finally:
        configs.RING_BYTES = saved
    for row in rows:
        ref = next(r for r in rows if r["shipped"] and r["pass"] == row["pass"])
        for clock in ("events", "graph"):
            a, b = row.get(f"{clock}_ms"), ref.get(f"{clock}_ms")
            row[f"/shipped {clock}"] = a / b if a and b else None
    return rows


def time_pre(shape: LayerShape, batch: int, dtype: torch.dtype, ctx: Context,
             layouts: tuple = ("nchw", "channels_last")) -> list:
    """Forward+backward of the fused layer with the experts' pre-activations saved by the forward
    (kernels/configs.SAVE_PRE, as shipped) and recomputed by the backward instead, on each of
    `layouts` (NCHW, channels-last): both clocks, peak memory, and the time over the saved run's.
    The model says saving wins by traffic (bench/results/model-2026-12-03-pre.md); this section
    measures it."""
    from pmoe.kernels import configs

    rows = []
    saved = configs.SAVE_PRE
    try:
        for layout in layouts:
            layer, x, dy = _fused_layer(shape, batch, dtype, ctx, layout)
            for keep in (True, False):
                configs.SAVE_PRE = keep
                fn = pass_fns(layer, x, dy)["forward+backward"]
                rows.append({"shape": shape.name, "batch": batch, "dtype": dname(dtype), "layout": layout,
                             "pre": "saved" if keep else "recomputed", **both_clocks(fn, ctx.device),
                             "peak_mb": peak_mb(fn, ctx.device, lambda: layer.zero_grad(set_to_none=True))})
    finally:
        configs.SAVE_PRE = saved
    for row in rows:
        ref = next(r for r in rows if r["pre"] == "saved" and r["layout"] == row["layout"])
        for clock in ("events", "graph"):
            a, b = row.get(f"{clock}_ms"), ref.get(f"{clock}_ms")
            row[f"/saved {clock}"] = a / b if a and b else None
    return rows


def time_pooled(shape: LayerShape, batch: int, backend: str, dtype: torch.dtype, ctx: Context) -> list:
    """forward_pooled vs layer(x).sum((2, 3)) on one backend, forward and forward+backward
    (events clock), with the bytes the pooled epilogue does not move: the map written and read
    back, less the (B, out) result."""
    torch.manual_seed(0)
    layer = make_layer(shape, backend, ctx.device, dtype)
    randomize_router(layer)
    x = torch.randn(shape.input_shape(batch), device=ctx.device, dtype=dtype)
    dy = torch.randn(batch, shape.out_channels, device=ctx.device, dtype=dtype)
    elt = x.element_size()
    impls = {"pooled": layer.forward_pooled, "layer+sum": lambda t: layer(t).sum((2, 3))}
    fns = {name: pass_fns(layer, x, dy, call) for name, call in impls.items()}
    fresh = lambda: (layer.zero_grad(set_to_none=True), setattr(x, "grad", None))  # noqa: E731
    rows = []
    for pass_name in PASSES:
        ms = {name: events_ms(f[pass_name], ctx.device) for name, f in fns.items()}
        peak = {name: peak_mb(f[pass_name], ctx.device, fresh) for name, f in fns.items()}
        nbytes = floor_bytes(shape, batch, elt, pass_name, pooled=True)
        map_bytes = batch * shape.out_channels * shape.num_patches * elt
        rows.append({"shape": shape.name, "batch": batch, "backend": backend, "dtype": dname(dtype),
                     "pass": pass_name, "pooled_ms": ms["pooled"], "layer_sum_ms": ms["layer+sum"],
                     "pooled/layer+sum": ms["pooled"] / ms["layer+sum"],
                     "bytes_avoided": 2 * map_bytes - batch * shape.out_channels * elt,
                     "pooled_pct_floor": 100 * floor_seconds(nbytes, 0, dtype, ctx.bytes_per_s) / (ms["pooled"] * 1e-3),
                     "pooled_peak_mb": peak["pooled"], "layer_sum_peak_mb": peak["layer+sum"]})
    return rows


# ---------------------------------------------------------------------------------------------
# per launch, against the model


class LaunchTimer:
    """Installed as pmoe.kernels.launch.RECORDER: runs each Triton launch between two CUDA events
    (wall clock on CPU) and keeps (kernel, config, grid, start, end)."""

    def __init__(self, device: torch.device):
        self.device, self.records = device, []

    def __call__(self, kernel, grid, args, kwargs):
        cuda = self.device.type == "cuda"
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        end = torch.cuda.Event(enable_timing=True) if cuda else None
        t0 = time.perf_counter()
        if cuda:
            start.record()
        kernel[grid](*args, **kwargs)
        if cuda:
            end.record()
        self.records.append((gpu_model.kernel_name(kernel), gpu_model.launch_config(kwargs), grid, start, end,
                             time.perf_counter() - t0))

    def durations_ms(self) -> list[float]:
        sync(self.device)
        return [s.elapsed_time(e) if s is not None else 1e3 * wall for _, _, _, s, e, wall in self.records]


def _timed_launches(fn: Callable, device: torch.device, reps: int) -> tuple[list, list[float]]:
    """Run fn reps times (L2 cleared before each on CUDA) with a LaunchTimer installed.
    -> [(kernel, config)] of one call, [median ms of each launch]."""
    from pmoe.kernels import launch

    flush = _l2_flush_buffer() if device.type == "cuda" else None
    per_call = []
    for _ in range(reps):
        timer = LaunchTimer(device)
        if flush is not None:
            flush.zero_()
        saved, launch.RECORDER = launch.RECORDER, timer
        try:
            fn()
        finally:
            launch.RECORDER = saved
        per_call.append((timer.records, timer.durations_ms()))
    launches = [(name, cfg) for name, cfg, *_ in per_call[0][0]]
    if any([(n, c) for n, c, *_ in recs] != launches for recs, _ in per_call):
        raise RuntimeError("the launch sequence changed between calls")
    return launches, [statistics.median(ms[i] for _, ms in per_call) for i in range(len(launches))]


def time_launches(shape: LayerShape, batch: int, dtype: torch.dtype, ctx: Context, layout: str = "nchw",
                  reps: Optional[int] = None) -> list:
    """Each Triton launch of the fused layer (forward, then forward+backward) timed on its own,
    beside the model's time for the same launch when the model report traced the same launch
    sequence; the torch ops between launches are not timed here (the pass's events_ms has them)."""
    reps = reps or (10 if ctx.device.type == "cuda" else 2)
    layer, x, dy = _fused_layer(shape, batch, dtype, ctx, layout)
    rows = []
    for pass_name, fn in pass_fns(layer, x, dy).items():
        fn()  # compiled and warm
        launches, ms = _timed_launches(fn, ctx.device, reps)
        rows += _pair_with_model(shape, batch, dtype, layout, pass_name, launches, ms, ctx)
    return rows


def _pair_with_model(shape, batch, dtype, layout, pass_name, launches, ms, ctx: Context) -> list:
    """Rows of measured launches, each beside the model's launch at the same position among the
    model's Triton launches when both sequences name the same kernels; config_matches says
    whether the model traced the config that ran."""
    s = None
    if ctx.model and ctx.model.get("doc"):
        s = gpu_model.summary(ctx.model["doc"], shape.name, layout, pass_name, dname(dtype), batch)
    modeled = []
    if s is not None:
        dev = gpu_model.device_for(ctx.model["doc"], ctx.device_name)
        modeled = [r for r in gpu_model.launch_rows(s, dev) if r["kind"] == "triton"]
    paired = [r["kernel"] for r in modeled] == [name for name, _ in launches]
    base = {"shape": shape.name, "batch": batch, "dtype": dname(dtype), "layout": layout, "pass": pass_name}
    rows = []
    for i, ((name, cfg), t) in enumerate(zip(launches, ms)):
        row = {**base, "index": i, "kernel": name, "config": _config_text(cfg), "measured_us": 1e3 * t}
        if paired:
            m = modeled[i]
            row.update(model_us=1e6 * m["model_s"], bound=m["bound"], config_matches=m["config"] == cfg,
                       **{"measured/model": 1e3 * t / (1e6 * m["model_s"])})
        rows.append(row)
    if s is not None and not paired:
        rows.append({**base, "kernel": "(model)", "note": "model traced " + ", ".join(r["kernel"] for r in modeled)
                     + ": not paired"})
    if s is None:
        rows.append({**base, "kernel": "(model)", "note": "no model summary for this configuration"})
    return rows


def _config_text(cfg: dict) -> str:
    """BLOCK_N=128 -> N=128; warps and stages last: "... w4 s3"."""
    parts = [f"{k[6:]}={v}" if k.startswith("BLOCK_") else f"{k}={v}" for k, v in cfg.items()
             if k not in ("num_warps", "num_stages")]
    return " ".join(parts + [f"{k[4]}{cfg[k]}" for k in ("num_warps", "num_stages") if k in cfg])


# ---------------------------------------------------------------------------------------------
# the largest training batch


def _train_step(net, batch: int, device: torch.device) -> None:
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    net.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    sync(device)


def _largest_activation_numel(net, device) -> int:
    """Per image, the largest tensor a module produces: kernels index with 32-bit offsets, so the
    search stays below 2^31 elements per tensor."""
    biggest = [3 * 32 * 32]
    hooks = [m.register_forward_hook(lambda m, i, o: biggest.append(o.numel() // 2 if torch.is_tensor(o) else 0))
             for m in net.modules()]
    with torch.no_grad():
        net(torch.randn(2, 3, 32, 32, device=device))
    for h in hooks:
        h.remove()
    return max(biggest)


def largest_batch(net, device: torch.device, start: int, cap: int, seconds: float) -> dict:
    """Doubling from `start` until a training step runs out of memory (or `cap`), then a few
    bisection steps; bounded in time."""
    cap = min(cap, 2 ** (int(math.log2((2**31 - 1) // _largest_activation_numel(net, device)))))
    end = time.monotonic() + seconds

    def fits(b: int) -> bool:
        try:
            _train_step(net, b, device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            net.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    ok, bad, b = None, None, start
    while b <= cap and time.monotonic() < end:
        if fits(b):
            ok, b = b, b * 2
        else:
            bad = b
            break
    for _ in range(4):
        if ok is None or bad is None or bad - ok <= max(1, ok // 16) or time.monotonic() > end:
            break
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if fits(mid) else (ok, mid)
    return {"largest_fitting": ok, "first_failing": bad, "cap": cap,
            "note": "reached the cap" if bad is None and ok == cap else ""}

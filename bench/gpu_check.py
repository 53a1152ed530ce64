"""The project's one GPU script: correctness of every fused-kernel path at real sizes, then speed,
roofline fraction and memory against the baselines, and the largest batch that fits.

    python bench/gpu_check.py --out bench/results          # on a CUDA machine (H100: < 8 minutes)
    python bench/gpu_check.py --cpu-smoke --out /tmp/smoke  # tiny shapes on CPU: exercises the logic
    TRITON_INTERPRET=1 python bench/gpu_check.py --cpu-smoke --out /tmp/smoke   # + kernels, interpreted

Writes DIR/<date>-<gpu>.md and .json (device, torch/triton/CUDA versions, date).  Every row
catches its own exception and reports it; the script goes on.

Correctness (backend="triton"; on CPU without the interpreter the torch backend stands in so the
logic still runs): fresh random inputs; the reference is the torch backend in float64 on the
same low-precision values (inputs and parameters rounded to the dtype first, then widened), so
only the kernels' arithmetic differs.  Checked: finite outputs; exact zeros where concat leaves
a (patch, expert) unselected (catches unwritten memory); a second run agrees (before each run
the CUDA caching allocator is handed a freed NaN-filled block, so memory the kernel forgets to
write shows as NaN); the fraction of identical chosen indices (as sets per image and expert),
with rows whose l-th and (l+1)-th reference scores are within a relative gap TIE_REL of each
other flagged as near-ties; outputs on the rows whose selection agrees; and, when every row
agrees, the gradients of x, router, weight (and bias).  Errors are normwise: max|a - ref| /
max|ref|.  Tolerances: TOLERANCE below (fp32 1e-4, bf16 2e-2, fp16 5e-3).

Speed: triton.testing.do_bench medians (it clears L2 between runs, so inputs are never
cache-resident), forward (no_grad) and forward+backward (grads of x and every parameter).
FLOPs: FlopCounterMode of each implementation (the fused op through its registered formula).
Roofline floor = max(bytes / 3.0 TB/s, FLOPs / 790 TFLOP/s) with bytes = input read once + output
written once + weights read once (forward); forward+backward adds dy read, x and weights read
again, dx and dW written.  The 790 TFLOP/s is the bf16 dense peak; it is used for every dtype,
so fp32 rows read low on purpose.

Routing: the fused kernels route either in one launch (scores, top-l and gates per image) or in
two (tiled scores, then select); pmoe.kernels.op.route_fused picks.  Both are checked (variants
"route") and timed against each other at every shape (bf16), with the choice "auto" makes, so
the rule can be tuned from a report.

Pooled epilogue (the paper's classifier reads the layer summed over patches): checked like the
layer (variants "pooled", against the float64 torch layer's map summed over patches), and timed
against the unpooled layer followed by .sum((2, 3)) on the same backend at every shape, with the
bytes it does not move: the (B, out, H/p, W/p) map written by the layer and read back by the sum,
2·B·n·out·elt, less the (B, out) result it writes instead.  (Backward moves the same bytes in
both: the sum's gradient reaches the kernels as a stride-0 view either way.)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import re
import statistics
import sys
import time
import traceback

# bench/ holds profile.py, which would shadow the stdlib `profile` (cProfile imports it, and
# torch._dynamo imports cProfile): keep bench/ importable, but after the standard library.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH] + [_BENCH]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import pmoe  # noqa: E402
from baselines import KINDS, make_layer, randomize_router, triton_usable  # noqa: E402
from machine import machine_info, machine_line  # noqa: E402
from pmoe.models.flagship import FlagshipDense, FlagshipPMoE  # noqa: E402
from pmoe.torch_backend import patches_from_map  # noqa: E402
from shapes import SHAPES, WRN, LayerShape, tiny  # noqa: E402

HBM_BYTES_PER_S = 3.0e12
PEAK_FLOPS = 790e12
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
TIE_REL = 1e-5  # the kernels score in fp32 on the same rounded inputs: gaps below this may flip
VARIANTS = (  # the kernel paths besides the default (concat, softmax, no bias, ReLU)
    {"combine": "sum"},
    {"gate": "indicator"},
    {"gate": "softmax_all"},
    {"bias": True, "activation": "gelu"},
    {"deterministic": True},
    {"combine": "sum", "deterministic": True},
    {"route": "split"},  # the two routing paths (pmoe.kernels.op.ROUTE), whichever "auto" picks here
    {"route": "fused"},
    {"route": "fused", "gate": "softmax_all"},
)
POOLED_VARIANTS = ({"pooled": True}, {"pooled": True, "combine": "sum"}, {"pooled": True, "deterministic": True},
                   {"pooled": True, "combine": "sum", "deterministic": True})
PASSES = ("forward", "forward+backward")


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class Budget:
    """Wall-clock budget: sections ask before each row and skip the rest once it is spent."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ---------------------------------------------------------------------------------------------
# correctness


def poison_allocator(device: torch.device, nbytes: int) -> None:
    """Hand the CUDA caching allocator a freed NaN-filled block of about nbytes: the next
    allocations of that size reuse it, so a kernel that leaves memory unwritten returns NaN."""
    if device.type == "cuda" and nbytes > 0:
        block = torch.full((nbytes // 4 + 1,), float("nan"), device=device)
        del block


def normwise_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    scale = ref.abs().max().item()
    diff = (a - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def _selection(indices: torch.Tensor, n: int) -> torch.Tensor:
    B, k, _ = indices.shape
    return torch.zeros(B, k, n, device=indices.device).scatter(2, indices, 1.0)


@torch.no_grad()
def near_ties(x64: torch.Tensor, router64: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    """(B, k) bool: rows whose l-th and (l+1)-th float64 scores are within TIE_REL (relative)."""
    scores = (patches_from_map(x64, shape.patch_size) @ router64.t()).transpose(1, 2)  # (B, k, n)
    l, n = shape.top_l, shape.num_patches
    if l == n:
        return torch.zeros(scores.shape[:2], dtype=torch.bool, device=scores.device)
    ranked = scores.sort(-1, descending=True).values
    return ranked[..., l - 1] - ranked[..., l] <= TIE_REL * ranked.abs().amax(-1)


@contextlib.contextmanager
def forced_route(route: str):
    """Run the fused kernels with pmoe.kernels.op.ROUTE = route ("fused" / "split")."""
    from pmoe.kernels import op
    was, op.ROUTE = op.ROUTE, route
    try:
        yield
    finally:
        op.ROUTE = was


def check_layer(shape: LayerShape, batch: int, dtype: torch.dtype, device: torch.device, backend: str,
                options: dict, seed: int) -> dict:
    opts = dict(options)
    route = opts.pop("route", None)
    if route is not None:  # a kernel option: main() plans these rows only when the kernels run
        with forced_route(route):
            return check_layer(shape, batch, dtype, device, backend, opts, seed)
    torch.manual_seed(seed)
    opts = {"combine": shape.combine, "gate": "softmax", "bias": False, "activation": "relu", **opts}
    deterministic = opts.pop("deterministic", False)
    if opts.pop("pooled", False):
        return check_pooled(shape, batch, dtype, device, backend, opts, deterministic)
    out = shape.out_channels if opts["combine"] == "concat" else shape.expert_features
    layer = pmoe.PMoEConv2d(shape.in_channels, out, shape.patch_size, shape.num_experts, shape.top_l,
                            backend=backend, deterministic=deterministic, **opts)
    randomize_router(layer)
    layer = layer.to(device=device, dtype=dtype)
    ref = copy.deepcopy(layer).double()
    ref.backend = "torch"

    x = torch.randn(shape.input_shape(batch), device=device, dtype=dtype)
    x64 = x.detach().double().requires_grad_(True)
    x = x.requires_grad_(True)
    k, n, l = shape.num_experts, shape.num_patches, shape.top_l
    out_bytes = batch * out * n * x.element_size()

    poison_allocator(device, 2 * out_bytes)
    y, routing = layer(x, return_routing=True)
    poison_allocator(device, 2 * out_bytes)
    with torch.no_grad():
        y_again, routing_again = layer(x, return_routing=True)
    y_ref, routing_ref = ref(x64, return_routing=True)

    row = {"finite": bool(torch.isfinite(y).all().item()),
           "repeat_max_diff": (y.detach().double() - y_again.double()).abs().max().item(),
           "repeat_same_indices": bool(torch.equal(routing.indices, routing_again.indices))}

    # selection agreement and near-ties (reference scores in float64)
    near_tie = near_ties(x64, ref.router, shape)
    sel, sel_ref = _selection(routing.indices, n), _selection(routing_ref.indices, n)
    row_agree = (sel == sel_ref).all(-1)  # (B, k)
    row["index_agreement"] = ((sel * sel_ref).sum() / (batch * k * l)).item()
    row["rows_differ"] = int((~row_agree).sum().item())
    row["near_tie_rows"] = int(near_tie.sum().item())
    row["rows_differ_not_near_tie"] = int((~row_agree & ~near_tie).sum().item())

    # outputs: concat compares the (image, expert) blocks whose selection agrees; sum the images
    yd = y.detach().double().reshape(batch, -1, n)
    yr = y_ref.detach().reshape(batch, -1, n)
    if opts["combine"] == "concat":
        yd, yr = yd.view(batch, k, -1, n), yr.view(batch, k, -1, n)
        keep = row_agree[:, :, None, None]
        unselected = (sel == 0)[:, :, None, :].expand_as(yd)
    else:
        keep = row_agree.all(1)[:, None, None]
        unselected = (sel.sum(1) == 0)[:, None, :].expand_as(yd)
    row["unselected_max_abs"] = torch.where(unselected, yd, torch.zeros_like(yd)).abs().max().item()
    keep = keep.expand_as(yd)
    row["y_err"] = normwise_err(yd[keep], yr[keep]) if keep.any() else None

    # gradients: comparable only when every selection agrees
    if row["rows_differ"] == 0:
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy.double())
        grads = {"dx": (x.grad, x64.grad)}
        for name, p in layer.named_parameters():
            grads["d" + name] = (p.grad, dict(ref.named_parameters())[name].grad)
        for name, (g, g_ref) in grads.items():
            row[name + "_err"] = None if g is None else normwise_err(g, g_ref)
    else:
        row["grads"] = f"not compared: selection differs in {row['rows_differ']} rows"

    tol = TOLERANCE[dtype]
    errs = [v for key, v in row.items() if key.endswith("_err") and v is not None]
    row["ok"] = (row["finite"] and row["unselected_max_abs"] == 0 and row["rows_differ_not_near_tie"] == 0
                 and row["repeat_same_indices"] and all(e <= tol for e in errs))
    row["tolerance"] = tol
    return row


def check_pooled(shape: LayerShape, batch: int, dtype: torch.dtype, device: torch.device, backend: str,
                 opts: dict, deterministic: bool) -> dict:
    """forward_pooled against the float64 torch layer's map summed over patches: selection,
    output, gradients (when every selection agrees), a repeat (bit-identical when deterministic)."""
    out = shape.out_channels if opts["combine"] == "concat" else shape.expert_features
    layer = pmoe.PMoEConv2d(shape.in_channels, out, shape.patch_size, shape.num_experts, shape.top_l,
                            backend=backend, deterministic=deterministic, **opts)
    randomize_router(layer)
    layer = layer.to(device=device, dtype=dtype)
    ref = copy.deepcopy(layer).double()
    ref.backend = "torch"
    x = torch.randn(shape.input_shape(batch), device=device, dtype=dtype)
    x64 = x.detach().double().requires_grad_(True)
    x = x.requires_grad_(True)

    poison_allocator(device, 2 * batch * out * x.element_size())
    y, routing = layer.forward_pooled(x, return_routing=True)
    with torch.no_grad():
        y_again = layer.forward_pooled(x)
    y_map, routing_ref = ref(x64, return_routing=True)
    y_ref = y_map.sum((2, 3))
    k, l = shape.num_experts, shape.top_l
    sel, sel_ref = _selection(routing.indices, shape.num_patches), _selection(routing_ref.indices, shape.num_patches)
    row_agree = (sel == sel_ref).all(-1)  # (B, k)
    near_tie = near_ties(x64, ref.router, shape)
    row = {"finite": bool(torch.isfinite(y).all().item()),
           "repeat_max_diff": (y.detach().double() - y_again.double()).abs().max().item(),
           "index_agreement": ((sel * sel_ref).sum() / (batch * k * l)).item(),
           "rows_differ": int((~row_agree).sum().item()), "near_tie_rows": int(near_tie.sum().item()),
           "rows_differ_not_near_tie": int((~row_agree & ~near_tie).sum().item())}
    keep = row_agree.all(1)  # an image whose every expert chose alike
    row["y_err"] = normwise_err(y.detach()[keep], y_ref.detach()[keep]) if keep.any() else None
    if row["rows_differ"] == 0:
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy.double())
        row["dx_err"] = normwise_err(x.grad, x64.grad)
        refs = dict(ref.named_parameters())
        for name, p in layer.named_parameters():
            row["d" + name + "_err"] = None if p.grad is None else normwise_err(p.grad, refs[name].grad)
    else:
        row["grads"] = f"not compared: selection differs in {row['rows_differ']} rows"
    tol = TOLERANCE[dtype]
    errs = [v for key, v in row.items() if key.endswith("_err") and v is not None]
    row["ok"] = (row["finite"] and (row["repeat_max_diff"] == 0 or not deterministic)
                 and row["rows_differ_not_near_tie"] == 0 and all(e <= tol for e in errs))
    row["tolerance"] = tol
    return row


def run_checks(plan, device, backend, batch_of, budget: Budget, report) -> list:
    """plan: (shape, dtype, variant options) triples."""
    rows = []
    for shape, dtype, variant in plan:
        label = {"shape": shape.name, "dtype": dname(dtype), "variant": variant or "default",
                 "backend": backend, "batch": batch_of(shape)}
        if budget.left() < 0:
            rows.append({**label, "error": "skipped: time budget spent"})
            continue
        try:
            rows.append({**label, **check_layer(shape, batch_of(shape), dtype, device, backend, variant, seed=len(rows))})
        except Exception as exc:
            rows.append({**label, "error": f"{type(exc).__name__}: {exc}"})
            report(traceback.format_exc())
        print(f"check {label}: {'ok' if rows[-1].get('ok') else rows[-1].get('error', 'FAIL')}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# speed, roofline, memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def peak_mb(fn, layer, x, device: torch.device):
    if device.type != "cuda":
        return None
    layer.zero_grad(set_to_none=True)
    x.grad = None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def floor_bytes(shape: LayerShape, batch: int, elt: int, pass_name: str, pooled: bool = False) -> int:
    """pooled: the output (and its gradient) is (B, out), not the (B, out, H/p, W/p) map."""
    x = batch * shape.in_channels * shape.height * shape.width
    y = batch * shape.out_channels * (1 if pooled else shape.num_patches)
    w = shape.num_experts * shape.expert_features * shape.patch_dim + shape.num_experts * shape.patch_dim
    fwd = x + y + w
    return elt * (fwd if pass_name == "forward" else fwd + y + x + w + x + w)


def time_layer(shape: LayerShape, batch: int, kind: str, dtype: torch.dtype, device: torch.device) -> list:
    torch.manual_seed(0)
    layer = make_layer(shape, kind, device, dtype)
    randomize_router(layer)
    x = torch.randn(shape.input_shape(batch), device=device, dtype=dtype)
    with torch.no_grad():
        dy = torch.randn_like(layer(x))

    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x.requires_grad_(True)).backward(dy)

    rows = []
    for pass_name, fn in (("forward", forward), ("forward+backward", forward_backward)):
        flops = counted_flops(fn)
        ms = bench_ms(fn, device)
        nbytes = floor_bytes(shape, batch, x.element_size(), pass_name)
        floor_s = max(nbytes / HBM_BYTES_PER_S, flops / PEAK_FLOPS)
        rows.append({"shape": shape.name, "batch": batch, "kind": kind, "dtype": dname(dtype), "pass": pass_name,
                     "ms": ms, "flops": flops, "floor_bytes": nbytes, "tflops": flops / (ms * 1e-3) / 1e12,
                     "gbps": nbytes / (ms * 1e-3) / 1e9, "roofline_pct": 100 * floor_s / (ms * 1e-3),
                     "peak_mb": peak_mb(fn, layer, x, device)})
    return rows


def run_timing(shapes, dtypes, kinds, device, batch_of, budget: Budget, report) -> list:
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for kind in kinds:
                label = {"shape": shape.name, "batch": batch_of(shape), "kind": kind, "dtype": dname(dtype)}
                if budget.left() < 0:
                    rows.append({**label, "error": "skipped: time budget spent"})
                    continue
                try:
                    rows += time_layer(shape, batch_of(shape), kind, dtype, device)
                    print(f"time {label}: " + ", ".join(f"{r['pass']} {r['ms']:.3f} ms" for r in rows[-2:]), flush=True)
                except Exception as exc:
                    rows.append({**label, "error": f"{type(exc).__name__}: {exc}"})
                    report(traceback.format_exc())
                    print(f"time {label}: {rows[-1]['error']}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def time_pooled(shape: LayerShape, batch: int, backend: str, dtype: torch.dtype, device: torch.device) -> list:
    """forward_pooled vs layer(x).sum((2, 3)) on one backend, forward and forward+backward."""
    torch.manual_seed(0)
    layer = make_layer(shape, backend, device, dtype)
    randomize_router(layer)
    x = torch.randn(shape.input_shape(batch), device=device, dtype=dtype)
    dy = torch.randn(batch, shape.out_channels, device=device, dtype=dtype)
    elt = x.element_size()
    map_bytes = batch * shape.out_channels * shape.num_patches * elt
    impls = {"pooled": layer.forward_pooled, "layer+sum": lambda t: layer(t).sum((2, 3))}
    rows = []
    for pass_name in PASSES:
        ms = {}
        for name, fn in impls.items():
            if pass_name == "forward":
                def run(fn=fn):
                    with torch.no_grad():
                        fn(x)
            else:
                def run(fn=fn):
                    layer.zero_grad(set_to_none=True)
                    x.grad = None
                    fn(x.requires_grad_(True)).backward(dy)
            ms[name] = bench_ms(run, device)
            peak = peak_mb(run, layer, x, device)
            ms[name + "_peak_mb"] = peak
        nbytes = floor_bytes(shape, batch, elt, pass_name, pooled=True)
        rows.append({"shape": shape.name, "batch": batch, "backend": backend, "dtype": dname(dtype),
                     "pass": pass_name, "pooled_ms": ms["pooled"], "layer_sum_ms": ms["layer+sum"],
                     "pooled/layer+sum": ms["pooled"] / ms["layer+sum"],
                     "bytes_avoided": 2 * map_bytes - batch * shape.out_channels * elt,
                     "pooled_floor_bytes": nbytes, "pooled_gbps": nbytes / (ms["pooled"] * 1e-3) / 1e9,
                     "pooled_peak_mb": ms["pooled_peak_mb"], "layer_sum_peak_mb": ms["layer+sum_peak_mb"]})
    return rows


def run_pooled_timing(shapes, dtypes, backend, device, batch_of, budget: Budget, report) -> list:
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            label = {"shape": shape.name, "batch": batch_of(shape), "backend": backend, "dtype": dname(dtype)}
            if budget.left() < 0:
                rows.append({**label, "error": "skipped: time budget spent"})
                continue
            try:
                rows += time_pooled(shape, batch_of(shape), backend, dtype, device)
                print(f"pooled {label}: " + ", ".join(f"{r['pass']} {r['pooled_ms']:.3f} vs {r['layer_sum_ms']:.3f} ms"
                                                      for r in rows[-2:]), flush=True)
            except Exception as exc:
                rows.append({**label, "error": f"{type(exc).__name__}: {exc}"})
                report(traceback.format_exc())
                print(f"pooled {label}: {rows[-1]['error']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def time_route(shape: LayerShape, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Forward of the fused-kernel layer with the one-launch route vs the split one (scores, then
    select), and which one ROUTE="auto" picks: the data to tune op.route_fused by."""
    from pmoe.kernels import op
    torch.manual_seed(0)
    layer = make_layer(shape, "triton", device, dtype)
    randomize_router(layer)
    x = torch.randn(shape.input_shape(batch), device=device, dtype=dtype)
    row = {"shape": shape.name, "batch": batch, "dtype": dname(dtype),
           "auto_picks": "fused" if op.route_fused(batch, shape.num_patches, shape.num_experts, device) else "split"}
    if not op._route_fits(shape.num_patches, shape.num_experts):
        return {**row, "note": "n, k over the fused route's cap: split only"}

    def forward():
        with torch.no_grad():
            layer(x)

    for route in ("fused", "split"):
        with forced_route(route):
            row[route + "_ms"] = bench_ms(forward, device)
    row["fused/split"] = row["fused_ms"] / row["split_ms"]
    return row


def run_route_timing(shapes, dtypes, device, batch_of, budget: Budget, report) -> list:
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            label = {"shape": shape.name, "batch": batch_of(shape), "dtype": dname(dtype)}
            if budget.left() < 0:
                rows.append({**label, "error": "skipped: time budget spent"})
                continue
            try:
                rows.append(time_route(shape, batch_of(shape), dtype, device))
                print(f"route {label}: {rows[-1].get('fused/split', rows[-1].get('note'))}", flush=True)
            except Exception as exc:
                rows.append({**label, "error": f"{type(exc).__name__}: {exc}"})
                report(traceback.format_exc())
    return rows


def ratio_rows(timing: list) -> list:
    """fused/torch and fused/dense (and masking/dense), forward and forward+backward."""
    ms = {(r["shape"], r["dtype"], r["pass"], r["kind"]): r["ms"] for r in timing if "ms" in r}
    out = []
    for shape, dtype, pass_name in sorted({key[:3] for key in ms}):
        get = lambda kind: ms.get((shape, dtype, pass_name, kind))  # noqa: E731
        row = {"shape": shape, "dtype": dtype, "pass": pass_name}
        for a, b in (("triton", "torch"), ("triton", "dense"), ("torch", "dense"), ("masking", "dense")):
            row[f"{a}/{b}"] = get(a) / get(b) if get(a) and get(b) else None
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# largest batch


def _train_step(net, batch: int, device: torch.device) -> None:
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
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


def run_max_batch(device, start, cap, seconds, report) -> list:
    rows = []
    for name, cls in (("flagship-pmoe", FlagshipPMoE), ("flagship-dense", FlagshipDense)):
        try:
            torch.manual_seed(0)
            net = cls(in_channels=3, num_classes=10).to(device)
            rows.append({"network": name, "dtype": "float32", **largest_batch(net, device, start, cap, seconds)})
            del net
        except Exception as exc:
            rows.append({"network": name, "error": f"{type(exc).__name__}: {exc}"})
            report(traceback.format_exc())
        print(f"max batch {rows[-1]}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# report


def _fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def md_table(rows: list, cols: list) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def markdown(doc: dict) -> str:
    m = doc["machine"]
    parts = [f"# pMoE GPU check — {m['device']}, {m['date']}", "",
             f"torch {m['torch']}, triton {m['triton']}, CUDA {m['cuda']}, python {m['python']}; "
             f"mode: {doc['mode']}; kernels checked via backend={doc['checked_backend']!r}; "
             f"fp32 matmul precision={doc['fp32_matmul_precision']}; wall {doc['wall_s']:.0f} s", "",
             "## Correctness (reference: torch backend in float64 on the same rounded values)", "",
             md_table(doc["correctness"], ["shape", "dtype", "variant", "batch", "ok", "index_agreement", "rows_differ",
                                           "near_tie_rows", "rows_differ_not_near_tie", "y_err", "dx_err",
                                           "drouter_err", "dweight_err", "dbias_err", "unselected_max_abs",
                                           "repeat_max_diff", "tolerance", "grads", "error"]), "",
             "## Speed (do_bench median), roofline and peak memory", "",
             md_table(doc["timing"], ["shape", "batch", "dtype", "pass", "kind", "ms", "tflops", "gbps", "roofline_pct",
                                      "peak_mb", "flops", "error"]), "",
             "## Ratios (time / time; < 1: the first is faster)", "",
             md_table(doc["ratios"], ["shape", "dtype", "pass", "triton/torch", "triton/dense", "torch/dense",
                                      "masking/dense"]), "",
             "## Routing: one launch (scores + top-l + gates) vs two (scores, then select), forward", "",
             md_table(doc["route_timing"], ["shape", "batch", "dtype", "auto_picks", "fused_ms", "split_ms",
                                            "fused/split", "note", "error"]), "",
             "## Pooled epilogue: forward_pooled vs layer + .sum((2, 3)), same backend", "",
             "bytes_avoided: the (B, out, H/p, W/p) map written and read back, less the (B, out) result.", "",
             md_table(doc["pooled_timing"], ["shape", "batch", "backend", "dtype", "pass", "pooled_ms", "layer_sum_ms",
                                             "pooled/layer+sum", "bytes_avoided", "pooled_gbps", "pooled_peak_mb",
                                             "layer_sum_peak_mb", "error"]), "",
             "## Largest training batch (flagship, 3x32x32, fp32, bounded search)", "",
             md_table(doc["max_batch"], ["network", "dtype", "largest_fitting", "first_failing", "cap", "note", "error"])]
    if doc["tracebacks"]:
        parts += ["", "## Errors", "", "```", *doc["tracebacks"], "```"]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(_BENCH, "results"), help="directory for the .md and .json")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (kernels only under TRITON_INTERPRET=1)")
    ap.add_argument("--budget-s", type=float, default=390, help="stop starting new rows after this many seconds")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="only these shapes")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-max-batch", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    budget = Budget(args.budget_s)
    tracebacks = []
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --cpu-smoke to exercise the script on CPU)")
    print(machine_line(device), flush=True)

    shapes = [SHAPES[s] for s in (args.shapes or SHAPES)]
    if args.cpu_smoke:
        shapes = [tiny(s) for s in shapes]
        dtypes = (torch.float32,)
        batch_of = lambda s: s.cpu_batch  # noqa: E731
    else:
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
        batch_of = lambda s: s.gpu_batch  # noqa: E731
    kernels = triton_usable(device)
    checked_backend = "triton" if kernels else "torch"
    kinds = [k for k in KINDS if k != "triton" or kernels]

    doc = {"machine": machine_info(device), "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
           "checked_backend": checked_backend,
           "fp32_matmul_precision": torch.get_float32_matmul_precision(),  # allow_tf32 raises once the new API is used
           "roofline": {"hbm_bytes_per_s": HBM_BYTES_PER_S, "peak_flops": PEAK_FLOPS},
           "tolerance": {dname(k): v for k, v in TOLERANCE.items()}, "tie_rel": TIE_REL}
    if not kernels:
        print("# pmoe.kernels not usable here: correctness checks run the torch backend as a stand-in", flush=True)
    # most valuable first, in case the budget runs out: default-path checks, timing, the variants
    doc["correctness"] = run_checks([(s, d, {}) for s in shapes for d in dtypes], device, checked_backend,
                                    batch_of, budget, tracebacks.append)
    doc["timing"] = [] if args.skip_timing else run_timing(shapes, dtypes, kinds, device, batch_of, budget,
                                                          tracebacks.append)
    variant_shape = next((s for s in shapes if s.name.startswith(WRN.name)), shapes[0])
    variants = [v for v in VARIANTS if kernels or "route" not in v]
    doc["correctness"] += run_checks([(variant_shape, d, v) for d in dtypes for v in variants], device,
                                     checked_backend, batch_of, budget, tracebacks.append)
    # cpu-smoke: the atomic concat and deterministic sum kernels cover both pooled kernels' code
    pooled_variants = POOLED_VARIANTS[::3] if args.cpu_smoke else POOLED_VARIANTS
    doc["correctness"] += run_checks([(variant_shape, d, v) for d in dtypes for v in pooled_variants], device,
                                     checked_backend, batch_of, budget, tracebacks.append)
    doc["pooled_timing"] = [] if args.skip_timing else run_pooled_timing(shapes, dtypes, checked_backend, device,
                                                                        batch_of, budget, tracebacks.append)
    doc["route_timing"] = ([] if args.skip_timing or not kernels else
                           run_route_timing(shapes, dtypes[1:2] or dtypes, device, batch_of, budget,  # bf16 on a GPU
                                            tracebacks.append))
    doc["ratios"] = ratio_rows(doc["timing"])
    if args.skip_max_batch:
        doc["max_batch"] = []
    elif args.cpu_smoke:
        doc["max_batch"] = run_max_batch(device, start=2, cap=8, seconds=10, report=tracebacks.append)
    else:
        doc["max_batch"] = run_max_batch(device, start=1024, cap=2**20, seconds=max(20.0, min(60.0, budget.left())),
                                         report=tracebacks.append)
    doc["wall_s"] = time.monotonic() - t0
    doc["tracebacks"] = tracebacks

    os.makedirs(args.out, exist_ok=True)
    gpu = re.sub(r"[^a-z0-9]+", "-", doc["machine"]["device"].lower()).strip("-") or "device"
    stem = os.path.join(args.out, f"{datetime.date.today().isoformat()}-{gpu}{'-cpu-smoke' if args.cpu_smoke else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(doc))
    failed = [r for r in doc["correctness"] if not r.get("ok")]
    print(f"wrote {stem}.md and .json in {doc['wall_s']:.0f} s; correctness: "
          f"{len(doc['correctness']) - len(failed)}/{len(doc['correctness'])} ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

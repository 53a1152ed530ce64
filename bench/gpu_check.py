"""The project's one GPU script: correctness of every fused-kernel path at real sizes, then speed
(two clocks), roofline fraction against the measured bandwidth, the traffic model's prediction
beside each time, memory, and the largest batch that fits.

    python bench/gpu_check.py --out bench/results           # on a CUDA machine: < 7 minutes, cold cache
    python bench/gpu_check.py --quick --only wrn --out DIR  # one shape, the essentials (e.g. under ncu)
    python bench/gpu_check.py --plan                        # what would run, and how many kernel compiles
    python bench/gpu_check.py --cpu-smoke --out /tmp/smoke  # tiny shapes on CPU: exercises the logic
    TRITON_INTERPRET=1 python bench/gpu_check.py --cpu-smoke --out /tmp/smoke   # + kernels, interpreted

Writes DIR/<date>-<gpu>[-quick][-only-...].md and .json (device, versions, date) at the start,
after every row and at the end, each file replaced whole; on SIGTERM or SIGINT it writes what it
has, marked as cut off, and exits 143 / 130.  Every row catches its own exception and reports it;
the script goes on.  Rows start only while --budget-s lasts (later ones are listed as skipped).
Exit status 1 when any correctness row fails.

Sections, in order of value (a cut-off run keeps the first ones):
  bandwidth    copy bandwidth of the device (torch copy_ of 1 GiB): the floors' bandwidth.
  correctness  the default path (concat, softmax, ReLU, no bias, NCHW, ROUTE "auto") at every
               shape and dtype: gpu_correctness.check_layer (selection agree / tie / mismatch,
               outputs and gradients vs float64 on the kernel's selection, poisoned memory,
               unselected zeros, repeats).
  timing       forward and forward+backward of the fused layer, the torch path, the dense conv
               and the authors' masking (gpu_timing.time_layer): CUDA events and CUDA graphs, %
               of floor, and for the fused layer its configs and the traffic model's prediction.
  variants     check_layer for every other kernel path, at one shape: sum, indicator,
               softmax_all, bias + GELU, deterministic (bit-identical), channels-last input, both
               routes (pmoe.kernels.launch.ROUTE), the pooled epilogue.
  route        the one-launch forward vs the split route, both clocks, at every shape.
  ring         the NCHW layer with its rings (forward row copy, backward T) as shipped and with
               none (copies of the whole batch; configs.RING_BYTES = 0), both passes and clocks.
  pre          forward+backward with the experts' pre-activations saved by the forward (as
               shipped) and recomputed by the backward (configs.SAVE_PRE = False), NCHW and
               (but --quick) channels-last, both clocks and peak memory.
  pooled       forward_pooled vs layer + .sum((2, 3)).
  launches     each Triton launch timed alone beside the model's time for that launch.
  max_batch    the largest flagship training batch that fits (bounded search).
On CPU without the interpreter the torch backend stands in for the kernels (the logic still
runs); kernel-only rows (routes, launches) are left out.

Compiles: a cold Triton cache compiles every distinct (kernel, constexprs, specialisation) once,
about 0.6 s each on an H100 host; --plan counts them for the plan (kernels/registry.py records
the launches on meta tensors) so the plan stays well inside the machine's time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

_BENCH = os.path.dirname(os.path.abspath(__file__))

from omp_wait import choose_omp_wait  # noqa: E402  (before torch starts its OpenMP runtime)

choose_omp_wait()

import torch  # noqa: E402

import gpu_correctness as gc  # noqa: E402
import gpu_model  # noqa: E402
import gpu_report  # noqa: E402
import gpu_timing as gt  # noqa: E402
from baselines import KINDS, triton_usable  # noqa: E402
from gpu_timing import floor_bytes  # noqa: E402,F401  (tests/test_traffic.py checks it against the model's)
from machine import machine_info, machine_line  # noqa: E402
from pmoe.models.flagship import FlagshipDense, FlagshipPMoE  # noqa: E402
from shapes import SHAPES, WRN, LayerShape, tiny  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAIN_DTYPE = torch.bfloat16
VARIANTS = ({"combine": "sum"}, {"gate": "indicator"}, {"gate": "softmax_all"},
            {"bias": True, "activation": "gelu"}, {"deterministic": True}, {"combine": "sum", "deterministic": True},
            {"layout": "channels_last"}, {"layout": "channels_last", "combine": "sum"})
ROUTE_VARIANTS = ({"route": "split"}, {"route": "split", "gate": "softmax_all"}, {"route": "fused"})
POOLED_VARIANTS = ({"pooled": True}, {"pooled": True, "combine": "sum"}, {"pooled": True, "deterministic": True},
                   {"pooled": True, "combine": "sum", "deterministic": True})
QUICK_VARIANTS = ({"combine": "sum", "deterministic": True}, {"gate": "softmax_all"}, {"layout": "channels_last"},
                  {"route": "split"}, {"pooled": True})
SECONDS_PER_COMPILE = 0.6


# ---------------------------------------------------------------------------------------------
# the plan


@dataclass
class Plan:
    """What a run does: rows per section, each a tuple of what its function takes."""
    shapes: list
    batch: dict                                    # shape name -> batch
    checks: list = field(default_factory=list)     # (shape, dtype, variant)
    timing: list = field(default_factory=list)     # (shape, dtype, kind, layout)
    variants: list = field(default_factory=list)   # (shape, dtype, variant)
    route: list = field(default_factory=list)      # (shape, dtype)
    rings: list = field(default_factory=list)      # (shape, dtype)
    pre: list = field(default_factory=list)        # (shape, dtype, layouts)
    pooled: list = field(default_factory=list)     # (shape, dtype)
    launches: list = field(default_factory=list)   # (shape, dtype)
    max_batch: Optional[dict] = None               # largest_batch's start, cap, seconds

    def summary(self) -> str:
        return (f"{len(self.checks)} default checks, {len(self.timing)} timings, {len(self.variants)} variant "
                f"checks, {len(self.route)} route, {len(self.rings)} ring, {len(self.pre)} pre, {len(self.pooled)} pooled, "
                f"{len(self.launches)} per-launch, "
                f"max batch {'yes' if self.max_batch else 'no'}; shapes "
                + ", ".join(f"{s.name} (B={self.batch[s.name]})" for s in self.shapes))


def select_shapes(only: Optional[list]) -> list:
    """The benchmark shapes named by --only (unique prefixes, comma-separated or repeated)."""
    if not only:
        return list(SHAPES.values())
    picked = []
    for word in (w for arg in only for w in arg.split(",") if w):
        hits = [s for name, s in SHAPES.items() if name.startswith(word)]
        if len(hits) != 1:
            raise SystemExit(f"gpu_check: --only {word!r} matches {[s.name for s in hits] or 'no shape'}; "
                             f"shapes: {', '.join(SHAPES)}")
        if hits[0] not in picked:
            picked.append(hits[0])
    return picked


def variant_rows(shape: LayerShape, dtype, kernels: bool, quick: bool) -> list:
    """(shape, dtype, variant) for the variants section: kernel-only ones (routes) when the
    kernels run, the one-launch route only where it fits."""
    from_routes = ROUTE_VARIANTS if not quick else ()
    chosen = QUICK_VARIANTS if quick else VARIANTS + from_routes + POOLED_VARIANTS
    if kernels:
        from pmoe.kernels import configs
        fits = configs.route_fits(shape.num_patches, shape.num_experts)
        chosen = [v for v in chosen if v.get("route") != "fused" or fits]
    else:
        chosen = [v for v in chosen if "route" not in v]
    return [(shape, dtype, dict(v)) for v in chosen]


def make_plan(args, kernels: bool) -> Plan:
    """Rows for a --cpu-smoke run, a --quick GPU run or a full one, over the --only shapes."""
    shapes = select_shapes(args.only)
    if args.cpu_smoke:
        shapes = [tiny(s) for s in shapes]
    plan = Plan(shapes, {s.name: (s.cpu_batch if args.cpu_smoke else s.gpu_batch) for s in shapes})
    variant_shape = next((s for s in shapes if s.name.startswith(WRN.name)), shapes[0])
    kinds = [k for k in KINDS if k != "triton" or kernels]
    fill = _smoke_rows if args.cpu_smoke else _quick_rows if args.quick else _full_rows
    main_dtype = fill(plan, variant_shape, kinds, kernels, args.quick)
    if kernels:
        plan.route = [(s, main_dtype) for s in shapes]
        plan.rings = [(s, main_dtype) for s in shapes]
        plan.pre = [(s, main_dtype, ("nchw",) if args.quick else ("nchw", "channels_last")) for s in shapes]
        plan.launches = [(s, main_dtype) for s in shapes]
    if not args.quick:
        plan.pooled = [(s, main_dtype) for s in shapes]
    if args.skip_timing:
        plan.timing, plan.route, plan.rings, plan.pre, plan.pooled, plan.launches = [], [], [], [], [], []
    if args.skip_max_batch:
        plan.max_batch = None
    return plan


def _smoke_rows(plan: Plan, variant_shape, kinds, kernels: bool, quick: bool):
    """fp32 at every tiny shape (and bf16 at one: the tie logic), every kind, the variants in
    fp32, a small batch search.  -> the dtype of the route / pooled / per-launch rows."""
    f32 = torch.float32
    plan.checks = [(s, f32, {}) for s in plan.shapes] + [(variant_shape, torch.bfloat16, {})]
    plan.timing = [(s, f32, k, "nchw") for s in plan.shapes for k in kinds]
    plan.variants = variant_rows(variant_shape, f32, kernels, quick)
    plan.max_batch = {"start": 2, "cap": 8, "seconds": 5.0}
    return f32


def _quick_rows(plan: Plan, variant_shape, kinds, kernels: bool, quick: bool):
    """bf16 at every shape (and fp32 at one), five variants, no masking baseline."""
    plan.checks = [(s, MAIN_DTYPE, {}) for s in plan.shapes] + [(variant_shape, torch.float32, {})]
    plan.timing = [(s, MAIN_DTYPE, k, "nchw") for s in plan.shapes for k in kinds if k != "masking"]
    plan.variants = variant_rows(variant_shape, MAIN_DTYPE, kernels, quick=True)
    return MAIN_DTYPE


def _full_rows(plan: Plan, variant_shape, kinds, kernels: bool, quick: bool):
    """Every dtype at every shape; bf16 timings of every kind, fp32 / fp16 of the fused layer
    (the torch path without the kernels) and the dense conv, channels-last input; every variant
    in bf16; the batch search."""
    fused = "triton" if kernels else "torch"
    plan.checks = [(s, d, {}) for s in plan.shapes for d in DTYPES]
    plan.timing = ([(s, MAIN_DTYPE, k, "nchw") for s in plan.shapes for k in kinds]
                   + [(s, d, k, "nchw") for s in plan.shapes for d in DTYPES if d != MAIN_DTYPE
                      for k in ("dense", fused)]
                   + [(s, MAIN_DTYPE, fused, "channels_last") for s in plan.shapes])
    plan.variants = variant_rows(variant_shape, MAIN_DTYPE, kernels, quick=False)
    plan.max_batch = {"start": 1024, "cap": 2**20, "seconds": 30.0}
    return MAIN_DTYPE


def _problem(shape: LayerShape, batch: int, variant: dict):
    from pmoe.kernels import registry
    keys = {"combine", "gate", "activation", "bias", "pooled", "deterministic", "route"}
    return registry.Problem(shape.name, batch, shape.in_channels, shape.height, shape.width, shape.patch_size,
                            shape.num_experts, shape.expert_features, shape.top_l,
                            channels_last=variant.get("layout") == "channels_last",
                            **{k: v for k, v in variant.items() if k in keys})


def plan_problems(plan: Plan) -> dict:
    """dtype name -> the kernel problems (kernels/registry.Problem) the plan runs."""
    by_dtype: dict = {}

    def add(shape, dtype, variant):
        by_dtype.setdefault(gpu_model.DTYPE_NAMES[gc.dname(dtype)], []).append(
            _problem(shape, plan.batch[shape.name], variant))

    for shape, dtype, variant in plan.checks + plan.variants:
        add(shape, dtype, variant)
    for shape, dtype, kind, layout in plan.timing:
        if kind == "triton":
            add(shape, dtype, {"layout": layout})
    for shape, dtype in plan.route:
        add(shape, dtype, {"route": "split"})
        add(shape, dtype, {"route": "fused"} if _route_fits(shape) else {})
    for shape, dtype, layouts in plan.pre:
        for layout in layouts:
            add(shape, dtype, {"layout": layout})
    for shape, dtype in plan.pooled:
        add(shape, dtype, {"pooled": True})
        add(shape, dtype, {})
    for shape, dtype in plan.launches:
        add(shape, dtype, {})
    return by_dtype


def _route_fits(shape: LayerShape) -> bool:
    from pmoe.kernels import configs
    return configs.route_fits(shape.num_patches, shape.num_experts)


def estimate_compiles(plan: Plan, sm: int) -> tuple[Optional[int], str]:
    """Distinct kernel compiles the plan's fused-kernel rows need on a cold cache (the launches
    kernels/registry.py records on meta tensors, for sm), and a note on what is not counted."""
    try:
        from pmoe.kernels import configs, registry
        total = 0
        for name, problems in plan_problems(plan).items():
            keys = {rec.key for rec in registry.launches(name, sm, problems)}
            no_ring = [_problem(s, plan.batch[s.name], {}) for s, d in plan.rings
                       if gpu_model.DTYPE_NAMES[gc.dname(d)] == name]
            saved, configs.RING_BYTES = configs.RING_BYTES, 0  # the ring section's rows without rings
            try:
                keys |= {rec.key for rec in registry.launches(name, sm, no_ring)}
            finally:
                configs.RING_BYTES = saved
            total += len(keys)
    except Exception as exc:  # e.g. under the interpreter, whose kernels carry no compile signature
        return None, f"not counted here: {type(exc).__name__}: {str(exc)[:120]}"
    note = f"about {total * SECONDS_PER_COMPILE:.0f} s at {SECONDS_PER_COMPILE} s each"
    return total, note + (", plus the flagship network's for the batch search" if plan.max_batch else "")


# ---------------------------------------------------------------------------------------------
# the run: its report, budget and sections


class Run:
    """The report being built (doc), where it is written (stem), the row budget, and the
    section now running (for a cut-off run's report)."""

    def __init__(self, doc: dict, stem: str, budget_s: float, device: torch.device):
        self.doc, self.stem, self.device = doc, stem, device
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.section_name = "start"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.doc["wall_s"] = time.monotonic() - self.t0
        gpu_report.write(self.doc, self.stem)

    @contextlib.contextmanager
    def section(self, name: str):
        self.section_name = name
        status = self.doc.setdefault("sections", {})
        status[name] = {"status": "running"}
        started = time.monotonic()
        self.write()
        try:
            yield
            status[name] = {"status": "done", "wall_s": time.monotonic() - started}
        finally:
            if status[name]["status"] == "running":
                status[name] = {"status": "stopped", "wall_s": time.monotonic() - started}
            self.write()

    def rows(self, key: str, items: list, label: Callable, work: Callable, line: Callable) -> None:
        """For each item: label(item) (a dict), then work(item) -> a row dict or a list of them,
        appended to doc[key] as they come; an exception becomes an error row (traceback kept);
        nothing starts after the deadline."""
        out = self.doc.setdefault(key, [])
        for item in items:
            base = label(item)
            if self.left() < 0:
                out.append({**base, "error": "skipped: time budget spent"})
                continue
            started = time.monotonic()
            try:
                got = work(item)
                new = [{**base, **r} for r in (got if isinstance(got, list) else [got])]
            except Exception as exc:
                new = [{**base, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}]
                self.doc.setdefault("tracebacks", []).append(traceback.format_exc())
            for r in new:
                r.setdefault("wall_s", time.monotonic() - started)
                print(f"{key} {line(r)}", flush=True)
            out.extend(new)
            _free(self.device)
            self.write()

    def interrupted(self, signum: int) -> None:
        self.doc["interrupted"] = {"signal": signal.Signals(signum).name, "section": self.section_name,
                                   "after_s": time.monotonic() - self.t0}
        self.write()


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _install_signal_handlers(run: Run) -> None:
    def handler(signum, frame):
        signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the write
        run.interrupted(signum)
        print(f"gpu_check: {signal.Signals(signum).name}: wrote what exists to {run.stem}.md / .json", flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# ---------------------------------------------------------------------------------------------
# sections


def _err(r: dict) -> str:
    return r.get("error") or r.get("failed") or ""


def _line_check(r):
    return (f"{r['shape']} {r['dtype']} {gpu_report._fmt(r['variant'])}: "
            + ("ok" if r.get("ok") else "FAIL " + _err(r))
            + (f" (ties {r['tie_rows']}/{r['rows']})" if r.get("tie_rows") else ""))


def _line_time(r):
    if "events_ms" not in r:
        return f"{r['shape']} {r['dtype']} {r['kind']}: {_err(r)}"
    g = r.get("graph_ms")
    return (f"{r['shape']} {r['dtype']} {r['layout']} {r['kind']} {r['pass']}: events {r['events_ms']:.4g} ms"
            + (f", graph {g:.4g} ms" if g else "") + f", floor {r['floor_ms']:.3g} ms"
            + (f", model {r['model_ms']:.3g} ms" if r.get("model_ms") else "")
            + (f" [{r['config']}]" if r.get("config") else ""))


def _line_generic(r):
    keys = [k for k in r if k not in ("wall_s",)]
    return ", ".join(f"{k}={gpu_report._fmt(r[k])}" for k in keys[:8])


def run_sections(run: Run, plan: Plan, device: torch.device, backend: str, ctx: gt.Context) -> None:
    """The sections after bandwidth, in order, each row appended to the report as it comes."""
    doc, batch = run.doc, plan.batch

    def check_label(item):
        shape, dtype, variant = item
        return {"shape": shape.name, "dtype": gc.dname(dtype), "variant": variant or "default", "backend": backend,
                "batch": batch[shape.name]}

    def check(item):
        shape, dtype, variant = item
        return gc.check_layer(shape, batch[shape.name], dtype, device, backend, variant, seed=len(doc["correctness"]))

    def time_label(item):
        shape, dtype, kind, layout = item
        return {"shape": shape.name, "batch": batch[shape.name], "kind": kind, "dtype": gc.dname(dtype),
                "layout": layout}

    def pair_label(item):
        shape, dtype = item
        return {"shape": shape.name, "batch": batch[shape.name], "dtype": gc.dname(dtype)}

    with run.section("correctness"):
        run.rows("correctness", plan.checks, check_label, check, _line_check)
    with run.section("timing"):
        run.rows("timing", plan.timing, time_label,
                 lambda it: gt.time_layer(it[0], batch[it[0].name], it[2], it[1], ctx, it[3]), _line_time)
        doc["ratios"] = gt.ratio_rows(doc["timing"])
        doc["targets"] = gpu_report.target_rows(doc["timing"])
    with run.section("variants"):
        run.rows("correctness", plan.variants, check_label, check, _line_check)
    with run.section("route"):
        run.rows("route_timing", plan.route, pair_label,
                 lambda it: gt.time_route(it[0], batch[it[0].name], it[1], ctx), _line_generic)
    with run.section("ring"):
        run.rows("ring_timing", plan.rings, pair_label,
                 lambda it: gt.time_rings(it[0], batch[it[0].name], it[1], ctx), _line_generic)
    with run.section("pre"):
        run.rows("pre_timing", plan.pre, lambda it: pair_label(it[:2]),
                 lambda it: gt.time_pre(it[0], batch[it[0].name], it[1], ctx, it[2]), _line_generic)
    with run.section("pooled"):
        run.rows("pooled_timing", plan.pooled, pair_label,
                 lambda it: gt.time_pooled(it[0], batch[it[0].name], backend, it[1], ctx), _line_generic)
    with run.section("launches"):
        run.rows("launch_timing", plan.launches, pair_label,
                 lambda it: gt.time_launches(it[0], batch[it[0].name], it[1], ctx), _line_generic)
    with run.section("max_batch"):
        if plan.max_batch:
            run.rows("max_batch", [("flagship-pmoe", FlagshipPMoE), ("flagship-dense", FlagshipDense)],
                     lambda it: {"network": it[0], "dtype": "float32"},
                     lambda it: _largest(it[1], device, **plan.max_batch), _line_generic)


def _largest(cls, device, start: int, cap: int, seconds: float) -> dict:
    """largest_batch for one flagship network, `seconds` for the two networks together."""
    torch.manual_seed(0)
    net = cls(in_channels=3, num_classes=10).to(device)
    return gt.largest_batch(net, device, start, cap, seconds / 2)


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(_BENCH, "results"), help="directory for the .md and .json")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny shapes on CPU (the kernels only under TRITON_INTERPRET=1)")
    ap.add_argument("--quick", action="store_true",
                    help="the essentials: default path in bf16 (+ fp32 at one shape), five variants, bf16 "
                         "timings of the fused layer, torch path and dense conv, routes, per-launch; no "
                         "pooled timing, no batch search")
    ap.add_argument("--only", action="append", metavar="SHAPE",
                    help="only these shapes (unique prefixes: wrn, large, mnist-k2, ...; comma-separated or repeated)")
    ap.add_argument("--budget-s", type=float, default=330, help="start no new row after this many seconds")
    ap.add_argument("--model", default=None, metavar="JSON",
                    help="traffic model report (bench/traffic.py --out); default: the newest model-*.json in "
                         "bench/results that describes the current kernels, else the newest")
    ap.add_argument("--plan", action="store_true", help="print the plan and its compile count, run nothing")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-max-batch", action="store_true")
    return ap.parse_args(argv)


def report_stem(out: str, device_name: str, args) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "device"
    tags = ("-quick" if args.quick else "") + ("-cpu-smoke" if args.cpu_smoke else "")
    if args.only:
        tags += "-only-" + "-".join(s.name for s in select_shapes(args.only))
    return os.path.join(out, f"{datetime.date.today().isoformat()}-{gpu}{tags}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    kernels = triton_usable(device)  # on a CUDA device: importable kernels (checked below: a device)
    plan = make_plan(args, kernels)
    sm, sms = gt.device_generation(device) if device.type == "cpu" or torch.cuda.is_available() else (90, 132)
    compiles, note = estimate_compiles(plan, sm) if kernels else (0, "the kernels do not run here")
    if args.plan:
        print(f"plan: {plan.summary()}\nkernel compiles on a cold cache: {compiles} ({note})")
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --cpu-smoke to exercise the script on CPU)")
    print(machine_line(device), flush=True)
    backend = "triton" if kernels else "torch"
    if not kernels:
        print("# pmoe.kernels not usable here: correctness checks run the torch backend as a stand-in", flush=True)
    doc = {"machine": machine_info(device), "mode": ("cpu-smoke" if args.cpu_smoke else "gpu")
           + (" quick" if args.quick else ""), "checked_backend": backend,
           "fp32_matmul_precision": torch.get_float32_matmul_precision(),
           "plan": {"summary": plan.summary(), "compiles": compiles, "compiles_note": note},
           "tolerance": {gc.dname(k): v for k, v in gc.TOLERANCE.items()}, "tie_steps": gc.TIE_STEPS,
           "correctness": [], "timing": [], "route_timing": [], "ring_timing": [], "pre_timing": [], "pooled_timing": [],
           "launch_timing": [], "max_batch": [], "tracebacks": []}
    os.makedirs(args.out, exist_ok=True)
    run = Run(doc, report_stem(args.out, doc["machine"]["device"], args), args.budget_s, device)
    _install_signal_handlers(run)
    run.write()
    print(f"# plan: {plan.summary()}; kernel compiles on a cold cache: {compiles} ({note})", flush=True)
    try:
        run_sections(run, plan, device, backend, _context(run, device, args, sm, sms))
    except Exception:  # a bug outside the rows: keep what was measured, and say where it broke
        doc["tracebacks"].append(traceback.format_exc())
        doc["crashed"] = run.section_name
        print(doc["tracebacks"][-1], flush=True)
    run.section_name = "end"
    run.write()
    failed = [r for r in doc["correctness"] if not r.get("ok") and not str(r.get("error", "")).startswith("skipped")]
    skipped = sum(1 for r in doc["correctness"] if str(r.get("error", "")).startswith("skipped"))
    print(f"wrote {run.stem}.md and .json in {doc['wall_s']:.0f} s; correctness: "
          f"{len(doc['correctness']) - len(failed) - skipped}/{len(doc['correctness'])} ok, {len(failed)} failed, "
          f"{skipped} skipped", flush=True)
    return 1 if failed or doc.get("crashed") else 0


def _context(run: Run, device: torch.device, args, sm: int, sms: int) -> gt.Context:
    """The bandwidth section and the model report: what every timing row is set beside."""
    with run.section("bandwidth"):
        run.doc["bandwidth"] = gt.measure_bandwidth(device)
    try:
        model = gpu_model.choose(os.path.join(_BENCH, "results"), SHAPES, 90, args.model)
    except Exception as exc:
        model = {"doc": None, "path": args.model, "stale": [f"not read: {type(exc).__name__}: {exc}"]}
    name = run.doc["machine"]["device"]
    device_entry = gpu_model.device_for(model["doc"], name)["name"] if model["doc"] else None
    run.doc["model"] = {"path": model["path"] and os.path.relpath(model["path"], os.path.dirname(_BENCH)),
                        "device": device_entry, "stale": model["stale"],
                        "date": model["doc"] and model["doc"].get("date"),
                        "commit": model["doc"] and model["doc"].get("git", {}).get("commit")}
    print(f"# bandwidth {run.doc['bandwidth']['bytes_per_s'] / 1e12:.3g} TB/s; model {run.doc['model']['path']}"
          + (" (stale)" if model["stale"] else ""), flush=True)
    run.write()
    return gt.Context(device, name, run.doc["bandwidth"]["bytes_per_s"], sms, model)


if __name__ == "__main__":
    sys.exit(main())

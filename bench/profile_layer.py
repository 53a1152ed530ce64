"""A steady-state training loop of the flagship pMoE network, for profilers.

    nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi python bench/profile_layer.py
    python bench/profile_layer.py --torch-profiler trace.json     # Chrome trace (chrome://tracing, Perfetto); CPU too
    python bench/profile_layer.py --dense                          # the dense twin, for comparison

Warm-up steps first (kernel compilation, autotuning, allocator), then --steps profiled steps.
On CUDA, cudaProfilerStart/Stop bracket the profiled steps (so nsys with
--capture-range=cudaProfilerApi records only them) and pmoe.profiling's NVTX ranges are on,
with one range per step and per phase (forward, backward, optimizer).
Note: this file shadows the stdlib `profile` module only for scripts run from bench/.

On CPU, freed memory stays with the process, as in the benchmark suite (allocator.py), and the
minor page faults per step are printed for the warm-up and the profiled steps.  torch.profiler's
own allocations split the heap's free blocks, so a step's buffers land on fresh pages that
fault in: memory-bound ops then look slower in the trace than they run.  Measured on the
2-core Xeon (torch 2.13, batch 256, 1 thread, two runs each): 0-205 faults a step unprofiled,
9268-9473 under --torch-profiler (36 MB of fresh pages), and 124-129 against 159-207 ms a step.
Compare op times in a trace with each other, not with unprofiled timings, or give the process an
allocator that keeps freed memory by size class and the profiler's events out of the tensors'
blocks: with jemalloc (Debian's libjemalloc2) preloaded, decay off,

    export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
    python bench/profile_layer.py --device cpu --torch-profiler trace.json

two runs each likewise gave 0 faults a step unprofiled and 56-57 profiled, and 114.8-116.8
against 119.7-121.2 ms a step.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from allocator import keep_freed_memory

FREED_MEMORY = keep_freed_memory()  # before torch allocates anything, as in the suite (conftest.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from machine import machine_line  # noqa: E402

from pmoe import profiling  # noqa: E402
from pmoe.models.flagship import DEFAULT_WIDTHS, FlagshipDense, FlagshipPMoE  # noqa: E402
from pmoe.profiling import nvtx_range  # noqa: E402


def minor_faults() -> Optional[int]:
    """Minor page faults of this process so far; None where the `resource` module is missing."""
    try:
        import resource
    except ImportError:  # not Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_per_step(before: Optional[int], after: Optional[int], steps: int) -> str:
    """The faults between two minor_faults() readings, per step, as printed ("?" if unknown)."""
    return "?" if before is None or after is None or steps <= 0 else f"{(after - before) / steps:.0f}"


def build(args, device: torch.device):
    cls = FlagshipDense if args.dense else FlagshipPMoE
    net = cls(in_channels=args.in_channels, num_classes=args.classes, widths=args.widths).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, args.in_channels, 32, 32, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    return net, opt, x, y


def step(net, opt, x, y, i: int) -> None:
    with nvtx_range(f"step {i}"):
        with nvtx_range("forward"):
            loss = F.cross_entropy(net(x), y)
        with nvtx_range("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with nvtx_range("optimizer"):
            opt.step()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="profiled steps")
    ap.add_argument("--warmup", type=int, default=10, help="unprofiled steps first")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS),
                    help="flagship widths (stem, stages; default %(default)s)")
    ap.add_argument("--dense", action="store_true", help="profile the dense twin instead")
    ap.add_argument("--torch-profiler", metavar="TRACE.json", help="write a torch.profiler Chrome trace here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(machine_line(device) + f" | freed memory: {FREED_MEMORY}")
    net, opt, x, y = build(args, device)
    warm_faults = None  # counted over the warm-up's second half, past the first allocations
    for i in range(args.warmup):
        if i == args.warmup // 2:
            warm_faults = minor_faults()
        step(net, opt, x, y, i)
    warm = faults_per_step(warm_faults, minor_faults(), args.warmup - args.warmup // 2)
    if cuda:
        torch.cuda.synchronize()

    profiling.enable(True)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=activities) if args.torch_profiler else None
    if cuda:
        torch.cuda.cudart().cudaProfilerStart()
    t0 = time.perf_counter()
    if prof is not None:
        prof.__enter__()
    faults = minor_faults()
    for i in range(args.warmup, args.warmup + args.steps):
        step(net, opt, x, y, i)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    profiled = faults_per_step(faults, minor_faults(), args.steps)
    if prof is not None:
        prof.__exit__(None, None, None)
    if cuda:
        torch.cuda.cudart().cudaProfilerStop()
    profiling.enable(False)

    name = "flagship-dense" if args.dense else "flagship-pmoe"
    print(f"{name}: {args.steps} profiled steps, batch {args.batch}, {1e3 * elapsed / args.steps:.2f} ms/step"
          f"{' (with torch.profiler overhead)' if prof is not None else ''}")
    print(f"minor page faults per step: {warm} in the warm-up's second half, {profiled} profiled")
    if prof is not None:
        prof.export_chrome_trace(args.torch_profiler)
        print(f"wrote {args.torch_profiler}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

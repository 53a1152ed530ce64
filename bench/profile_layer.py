"""A steady-state training loop of the flagship pMoE network, for profilers.

    nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi python bench/profile_layer.py
    python bench/profile_layer.py --torch-profiler trace.json     # Chrome trace (chrome://tracing, Perfetto); CPU too
    python bench/profile_layer.py --dense                          # the dense twin, for comparison

Warm-up steps first (kernel compilation, autotuning, allocator), then --steps profiled steps.
On CUDA, cudaProfilerStart/Stop bracket the profiled steps (so nsys with
--capture-range=cudaProfilerApi records only them) and pmoe.profiling's NVTX ranges are on,
with one range per step and per phase (forward, backward, optimizer).
Note: this file shadows the stdlib `profile` module only for scripts run from bench/.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from machine import machine_line  # noqa: E402

from pmoe import profiling  # noqa: E402
from pmoe.models.flagship import DEFAULT_WIDTHS, FlagshipDense, FlagshipPMoE  # noqa: E402
from pmoe.profiling import nvtx_range  # noqa: E402


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
    print(machine_line(device))
    net, opt, x, y = build(args, device)
    for i in range(args.warmup):
        step(net, opt, x, y, i)
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
    for i in range(args.warmup, args.warmup + args.steps):
        step(net, opt, x, y, i)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if prof is not None:
        prof.__exit__(None, None, None)
    if cuda:
        torch.cuda.cudart().cudaProfilerStop()
    profiling.enable(False)

    name = "flagship-dense" if args.dense else "flagship-pmoe"
    print(f"{name}: {args.steps} profiled steps, batch {args.batch}, {1e3 * elapsed / args.steps:.2f} ms/step"
          f"{' (with torch.profiler overhead)' if prof is not None else ''}")
    if prof is not None:
        prof.export_chrome_trace(args.torch_profiler)
        print(f"wrote {args.torch_profiler}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

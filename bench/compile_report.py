"""Compile every pMoE Triton kernel, variant, config and dtype to a cubin, without a GPU.

    python bench/compile_report.py --arch 90            # every launch of every problem, H100 (sm_90a)
    python bench/compile_report.py --arch 80 --quick    # the benchmark shapes, bf16: a smoke test

What is compiled is what the launchers launch (kernels/registry.py records their launches on meta
tensors, with the configs kernels/configs.py picks for the arch): nothing is listed by hand.

For each compile: registers, spill bytes (the `ptxas -v` log of the backend's own ptxas run: the
ptxas it picks for the arch, with its flags),
shared memory (Triton's metadata), CTAs per SM (registers, shared memory and threads allow), and which matrix instructions the PTX uses (wgmma on sm_90,
mma.sync on sm_80, "fma" for exact-fp32 dots, "-" for kernels without a dot).
Exits 1 on any compile failure or any spill.  Must run with TRITON_INTERPRET unset/0.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_report: unset TRITON_INTERPRET (the interpreter does not compile)")

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pmoe.kernels import registry  # noqa: E402

def ptxas_info(arch: int) -> str:
    """The ptxas the NVIDIA backend itself runs for this arch (newer Tritons bundle two: one for
    sm_100+, one for the rest, and emit PTX only the matching one reads), with its version."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    return f"{tool.path} ({tool.version})"


def compile_with_ptxas_log(src, arch: int, options: dict):
    """triton.compile with the backend's own ptxas -v log captured: the registers and spills of
    the cubin Triton builds, with the flags its version passes (e.g. Triton 3.8's
    --regAllocOptLevel=2), not those of a second ptxas run of ours.  always_compile bypasses the
    compile cache, so ptxas runs (and logs) every time."""
    buf = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    with contextlib.redirect_stdout(buf):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled, ptxas_stats(buf.getvalue())


def ptxas_stats(log: str) -> dict:
    """Registers and spill bytes from a `ptxas -v` log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None:
        raise RuntimeError("no ptxas -v log captured (was the compile served from a cache?)")
    return {"regs": int(regs.group(1)),
            "spill": (int(spill.group(1)) + int(spill.group(2))) if spill else 0}


def matrix_insts(ptx: str) -> str:
    if "wgmma" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "-"


def compile_one(rec, dtype: str, arch: int) -> dict:
    """Compile one recorded launch (kernels/registry.py) for the arch; registers, spills, shared
    memory and matrix instructions."""
    src = ASTSource(rec.fn, rec.signature, rec.constexprs, rec.attrs)
    t0 = time.time()
    compiled, stats = compile_with_ptxas_log(src, arch, rec.options)
    ptx = compiled.asm["ptx"]
    has_dot = "tt.dot" in compiled.asm.get("ttir", "")
    mi = matrix_insts(ptx)
    if mi == "-" and has_dot:
        mi = "fma"
    smem = compiled.metadata.shared
    return {"kernel": rec.name, "problem": rec.problem, "config": config_label(rec), "dtype": dtype,
            "warps": rec.num_warps, "regs": stats["regs"], "spill": stats["spill"], "smem": smem,
            "ctas": ctas_per_sm(stats["regs"], rec.num_warps, smem, arch), "mma": mi, "secs": time.time() - t0}


def config_label(rec) -> str:
    blocks = "x".join(str(v) for k, v in rec.constexprs.items() if k.startswith("BLOCK") or k.endswith("_POW2"))
    return f"{blocks}/w{rec.num_warps}s{rec.num_stages}"


# per-SM limits (registers, shared memory in bytes, threads)
SM_LIMITS = {90: (65536, 227 * 1024, 2048), 89: (65536, 99 * 1024, 1536), 86: (65536, 99 * 1024, 1536),
             80: (65536, 163 * 1024, 2048)}


def ctas_per_sm(regs: int, warps: int, smem: int, arch: int) -> int:
    """CTAs of this kernel one SM holds at once (registers are allocated per warp in units of 256)."""
    reg_file, smem_max, threads_max = SM_LIMITS[arch]
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = reg_file // (per_warp * warps) if regs > 0 else 64
    by_smem = smem_max // smem if smem > 0 else 64
    return max(0, min(by_regs, by_smem, threads_max // (32 * warps), 32))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=[80, 86, 89, 90])
    ap.add_argument("--quick", action="store_true", help="the benchmark shapes only (wrn-pmoe, large), bf16")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: all; --quick: bf16)")
    ap.add_argument("--kernels", default=None, help="comma list of kernel names (default: all)")
    ap.add_argument("--match", default=None, help="only the problems whose label contains this (kernels/registry.py)")
    args = ap.parse_args(argv)
    dtypes = (args.dtypes or ("bf16" if args.quick else "fp32,bf16,fp16")).split(",")
    names = set(args.kernels.split(",")) if args.kernels else None
    problems = [p for p in registry.PROBLEMS if (not args.quick or p.label in ("wrn-pmoe", "large"))
                and (args.match is None or args.match in p.label)]

    rows, failures = [], []
    for dtype in dtypes:
        for rec in registry.launches(dtype, args.arch, problems):
            if names and rec.name not in names:
                continue
            try:
                rows.append(compile_one(rec, dtype, args.arch))
            except Exception as exc:  # report every failure, then exit non-zero
                failures.append((rec.name, rec.problem, config_label(rec), dtype, exc))
                traceback.print_exc()

    head = (f"{'kernel':<16} {'first problem':<24} {'config':<40} {'dtype':<5} {'regs':>4} {'spill':>5} {'smem':>6} "
            f"{'CTA/SM':>6} {'mma':<6}")
    print(f"triton {triton.__version__}, ptxas {ptxas_info(args.arch)}")
    print(f"sm_{args.arch}: {len(rows)} compiled, {len(failures)} failed")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kernel']:<16} {r['problem']:<24} {r['config']:<40} {r['dtype']:<5} {r['regs']:>4} {r['spill']:>5} "
              f"{r['smem']:>6} {r['ctas']:>6} {r['mma']:<6}")
    spills = [r for r in rows if r["spill"] > 0]
    for name, problem, config, dt, exc in failures:
        print(f"FAILED {name} [{problem}] {config} {dt}: {type(exc).__name__}: {str(exc)[:300]}")
    for r in spills:
        print(f"SPILL {r['kernel']} [{r['problem']}] {r['config']} {r['dtype']}: {r['spill']} bytes")
    return 1 if failures or spills or not rows else 0


if __name__ == "__main__":
    sys.exit(main())

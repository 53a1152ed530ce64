"""Compile every pMoE Triton kernel, variant, config and dtype to a cubin, without a GPU.

    python bench/compile_report.py --arch 90            # all, H100 (sm_90a)
    python bench/compile_report.py --arch 80 --quick    # first config, one dtype: a smoke test

For each compile: registers, spill bytes (the `ptxas -v` log of the backend's own ptxas run: the
ptxas it picks for the arch, with its flags),
shared memory (Triton's metadata), and which matrix instructions the PTX uses (wgmma on sm_90,
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

from pmoe.kernels.registry import KERNELS, dot_precision_for  # noqa: E402

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


def compile_one(spec, variant, config, dtype: str, arch: int) -> dict:
    vlabel, constexprs, ptr_over = variant
    clabel, meta, num_warps, num_stages = config
    constexprs = dict(constexprs)
    num_warps = constexprs.pop("num_warps", num_warps)
    sig = spec.signature(dtype, ptr_over)
    consts = {**constexprs, **meta}
    if "PREC" in sig:
        consts["PREC"] = dot_precision_for(dtype)
    missing = [k for k, v in sig.items() if v == "constexpr" and k not in consts]
    if missing:
        raise KeyError(f"{spec.name}: no value for constexprs {missing}")
    # pointers 16-byte aligned, as torch allocations are (what the launcher would specialise on)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items()) if v.startswith("*")}
    attrs.update(spec.int_attrs(sig, ptr_over))  # ints the variant declares multiples of 16 (registry)
    src = ASTSource(spec.fn, sig, consts, attrs)
    t0 = time.time()
    compiled, stats = compile_with_ptxas_log(src, arch, {"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    has_dot = "tl.dot" in spec.fn.src or "tt.dot" in compiled.asm.get("ttir", "")
    mi = matrix_insts(ptx)
    if mi == "-" and has_dot:
        mi = "fma"
    return {"kernel": spec.name, "variant": vlabel, "config": clabel, "dtype": dtype, "warps": num_warps,
            "regs": stats["regs"], "spill": stats["spill"], "smem": compiled.metadata.shared, "mma": mi,
            "secs": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, choices=[80, 86, 89, 90])
    ap.add_argument("--quick", action="store_true", help="first config and first variant only, one dtype")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: all; --quick: bf16)")
    ap.add_argument("--kernels", default=None, help="comma list of kernel names (default: all)")
    args = ap.parse_args(argv)
    dtypes = (args.dtypes or ("bf16" if args.quick else "fp32,bf16,fp16")).split(",")
    names = set(args.kernels.split(",")) if args.kernels else None

    rows, failures = [], []
    for spec in KERNELS:
        if names and spec.name not in names:
            continue
        variants = spec.variants[:1] if args.quick else spec.variants
        for dtype in dtypes:
            configs = spec.launch_configs(dtype, args.arch)
            configs = configs[:1] if args.quick else configs
            for variant in variants:
                for config in configs:
                    try:
                        rows.append(compile_one(spec, variant, config, dtype, args.arch))
                    except Exception as exc:  # report every failure, then exit non-zero
                        failures.append((spec.name, variant[0], config[0], dtype, exc))
                        traceback.print_exc()

    head = f"{'kernel':<20} {'variant':<26} {'config':<22} {'dtype':<5} {'regs':>4} {'spill':>5} {'smem':>6} {'mma':<6}"
    print(f"triton {triton.__version__}, ptxas {ptxas_info(args.arch)}")
    print(f"sm_{args.arch}: {len(rows)} compiled, {len(failures)} failed")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['kernel']:<20} {r['variant']:<26} {r['config']:<22} {r['dtype']:<5} {r['regs']:>4} "
              f"{r['spill']:>5} {r['smem']:>6} {r['mma']:<6}")
    spills = [r for r in rows if r["spill"] > 0]
    for name, v, c, dt, exc in failures:
        print(f"FAILED {name} [{v}] {c} {dt}: {type(exc).__name__}: {str(exc)[:300]}")
    for r in spills:
        print(f"SPILL {r['kernel']} [{r['variant']}] {r['config']} {r['dtype']}: {r['spill']} bytes")
    return 1 if failures or spills or not rows else 0


if __name__ == "__main__":
    sys.exit(main())

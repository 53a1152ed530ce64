"""Turn a pytest-benchmark JSON from bench/test_bench_layer.py into a markdown table of ratios.

    python bench/ratios.py bench.json [--stat median] [--out ratios.md]

One row per (shape, pass, dtype, threads): the median time of each baseline and the ratios
pMoE(torch)/dense, masking/dense, compiled/dense and compiled/torch (the PyTorch path under
torch.compile, CPU), and when Triton rows are present triton/torch and triton/dense.
A ratio below 1 means the numerator is faster.  The suite times the baselines interleaved, round
by round; a ratio is then the median over rounds of the round's ratio (paired), and the times
are each kind's median.  A JSON with one benchmark per kind (the suite's earlier form, no
thread count) gives ratios of the chosen statistic instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

RATIOS = (("torch", "dense"), ("masking", "dense"), ("compiled", "dense"), ("compiled", "torch"),
          ("triton", "torch"), ("triton", "dense"))
KIND_ORDER = ("dense", "masking", "torch", "compiled", "triton")


def collect(data: dict, stat: str = "median") -> dict:
    """{(shape, pass, dtype, threads): {"times": {kind: seconds}, "ratios": {"a/b": ratio}}} from a
    pytest-benchmark JSON document (threads None for per-kind benchmarks)."""
    groups: dict = defaultdict(lambda: {"times": {}, "ratios": {}})
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not {"shape", "pass_name", "dtype"} <= info.keys():
            continue  # not a layer benchmark
        key = (info["shape"], info["pass_name"], info["dtype"], info.get("threads"))
        if "times" in info:  # interleaved: every kind in one benchmark
            groups[key]["times"].update(info["times"])
            groups[key]["ratios"].update(info.get("ratios", {}))
        elif "kind" in info:
            groups[key]["times"][info["kind"]] = bench["stats"][stat]
    for group in groups.values():
        times = group["times"]
        for a, b in RATIOS:
            if f"{a}/{b}" not in group["ratios"] and times.get(a) is not None and times.get(b):
                group["ratios"][f"{a}/{b}"] = times[a] / times[b]
    return dict(groups)


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def markdown(groups: dict, machine: str = "") -> str:
    kinds = [k for k in KIND_ORDER if any(k in g["times"] for g in groups.values())]
    ratios = [f"{a}/{b}" for a, b in RATIOS if a in kinds and b in kinds]
    with_threads = any(key[3] is not None for key in groups)
    head = ["shape", "pass", "dtype"] + (["threads"] if with_threads else []) + [f"{k} ms" for k in kinds] + ratios
    lines = [machine, ""] if machine else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (shape, pass_name, dtype, threads), group in sorted(groups.items(), key=lambda kv: (kv[0][:3], kv[0][3] or 0)):
        cells = [shape, pass_name, dtype] + ([str(threads)] if with_threads else [])
        cells += [_ms(group["times"].get(k)) for k in kinds]
        cells += [f"{group['ratios'][r]:.2f}" if r in group["ratios"] else "-" for r in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_summary(data: dict) -> str:
    """The range of the 1-minute load average the interleaved benchmarks saw ("" if none)."""
    loads = [v for b in data.get("benchmarks", []) for v in b.get("extra_info", {}).get("loadavg_1min", [])]
    return f", 1-min load average {min(loads):.1f}-{max(loads):.1f}" if loads else ""


def machine_summary(data: dict) -> str:
    info = data.get("machine_info", {})
    extra = info.get("pmoe", {})
    if extra:
        return (f"Machine: {extra.get('device')} ({extra.get('device_type')}, {extra.get('cpu_count')} CPUs), "
                f"torch {extra.get('torch')}, triton {extra.get('triton')}, CUDA {extra.get('cuda')}, "
                f"run {data.get('datetime', extra.get('date', '?'))}{load_summary(data)}, "
                f"OMP_WAIT_POLICY={extra.get('omp_wait_policy') or 'unset (OpenMP default)'}, "
                f"freed memory: {extra.get('freed_memory', '?')} (bench/allocator.py)")
    return f"Machine: {info.get('cpu', {}).get('brand_raw', info.get('machine', '?'))}{load_summary(data)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json_path", help="file written by pytest --benchmark-json")
    ap.add_argument("--stat", default="median", choices=("median", "mean", "min"),
                    help="for per-kind benchmarks: which pytest-benchmark statistic to compare "
                         "(default: median, robust to noise); interleaved ones always use medians")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args(argv)
    with open(args.json_path) as f:
        data = json.load(f)
    groups = collect(data, args.stat)
    if not groups:
        print("no layer benchmarks in", args.json_path, file=sys.stderr)
        return 1
    table = markdown(groups, machine_summary(data) + f" (statistic: {args.stat})")
    print(table, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

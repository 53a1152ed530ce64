"""Turn a pytest-benchmark JSON from bench/test_bench_layer.py into a markdown table of ratios.

    python bench/ratios.py bench.json [--stat median] [--out ratios.md]

One row per (shape, pass, dtype): the median time of each baseline and the ratios
pMoE(torch)/dense, masking/dense, and when Triton rows are present triton/torch and triton/dense.
A ratio below 1 means the numerator is faster.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

RATIOS = (("torch", "dense"), ("masking", "dense"), ("triton", "torch"), ("triton", "dense"))
KIND_ORDER = ("dense", "masking", "torch", "triton")


def collect(data: dict, stat: str = "median") -> dict:
    """{(shape, pass, dtype): {kind: seconds}} from a pytest-benchmark JSON document."""
    groups: dict = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not {"shape", "kind", "pass_name", "dtype"} <= info.keys():
            continue  # not a layer benchmark
        key = (info["shape"], info["pass_name"], info["dtype"])
        groups[key][info["kind"]] = bench["stats"][stat]
    return dict(groups)


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def markdown(groups: dict, machine: str = "") -> str:
    kinds = [k for k in KIND_ORDER if any(k in t for t in groups.values())]
    ratios = [(a, b) for a, b in RATIOS if a in kinds and b in kinds]
    head = ["shape", "pass", "dtype"] + [f"{k} ms" for k in kinds] + [f"{a}/{b}" for a, b in ratios]
    lines = []
    if machine:
        lines += [machine, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (shape, pass_name, dtype), times in sorted(groups.items()):
        cells = [shape, pass_name, dtype] + [_ms(times.get(k)) for k in kinds]
        for a, b in ratios:
            ok = times.get(a) is not None and times.get(b)
            cells.append(f"{times[a] / times[b]:.2f}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine_summary(data: dict) -> str:
    info = data.get("machine_info", {})
    extra = info.get("pmoe", {})
    if extra:
        return (f"Machine: {extra.get('device')} ({extra.get('device_type')}, {extra.get('cpu_count')} CPUs), "
                f"torch {extra.get('torch')}, triton {extra.get('triton')}, CUDA {extra.get('cuda')}, "
                f"run {data.get('datetime', extra.get('date', '?'))}")
    return f"Machine: {info.get('cpu', {}).get('brand_raw', info.get('machine', '?'))}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json_path", help="file written by pytest --benchmark-json")
    ap.add_argument("--stat", default="median", choices=("median", "mean", "min"),
                    help="which pytest-benchmark statistic to compare (default: median, robust to noise)")
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

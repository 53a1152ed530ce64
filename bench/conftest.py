"""Suite-wide setup for `pytest bench --benchmark-only`: machine/version info in the JSON, the
bench directory importable as plain modules (the scripts import each other that way), and an
optional thread count (PMOE_BENCH_THREADS)."""
from __future__ import annotations

import os
import sys

# bench/ holds profile.py, which would shadow the stdlib `profile` (cProfile imports it, and
# torch._dynamo imports cProfile): keep bench/ importable, but after the standard library.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH] + [_BENCH]

import torch  # noqa: E402

from machine import machine_info  # noqa: E402

# PMOE_BENCH_THREADS=1 steadies CPU timings on a shared machine (OpenMP threads otherwise stall
# waiting for a descheduled sibling); unset, torch picks its default.
if os.environ.get("PMOE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PMOE_BENCH_THREADS"]))


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:  # noqa: F811
    machine_info["pmoe"] = _machine()


def _machine() -> dict:
    return machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_report_header(config):
    return "pmoe bench: " + " ".join(f"{k}={v}" for k, v in _machine().items())


def pytest_collection_modifyitems(config, items):
    """A bare `pytest` from the repository root would also collect this suite and spend minutes
    timing layers: run it only when bench/ is named on the command line or with --benchmark-only."""
    named = any(os.path.abspath(str(a).split("::")[0]).startswith(_BENCH) for a in config.args)
    if named or config.getoption("benchmark_only", False):
        return
    import pytest

    skip = pytest.mark.skip(reason="layer benchmarks: run `pytest bench --benchmark-only`")
    for item in items:
        if str(item.fspath).startswith(_BENCH):
            item.add_marker(skip)

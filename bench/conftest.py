"""Suite-wide setup for `pytest bench --benchmark-only`: machine/version info in the JSON, the
bench directory importable as plain modules (the scripts import each other that way), and
OMP_WAIT_POLICY=PASSIVE on a shared CPU unless it is set (see omp_wait.py), and freed memory kept by
the allocator (see allocator.py).  The thread counts
(PMOE_BENCH_THREADS, default "1,2") are a parameter of the suite's tests."""
from __future__ import annotations

import os
import sys

_BENCH = os.path.dirname(os.path.abspath(__file__))
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

from allocator import keep_freed_memory  # noqa: E402
from omp_wait import choose_omp_wait  # noqa: E402  (before torch starts its OpenMP runtime)

choose_omp_wait()
_FREED_MEMORY = keep_freed_memory()

import torch  # noqa: E402

from machine import machine_info  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:  # noqa: F811
    machine_info["pmoe"] = _machine()


def _machine() -> dict:
    info = machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    info["freed_memory"] = _FREED_MEMORY
    return info


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

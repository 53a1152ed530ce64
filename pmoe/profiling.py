"""NVTX ranges for Nsight Systems timelines, free when profiling is off.

    from pmoe.profiling import nvtx_range
    with nvtx_range("pmoe.route"):
        ...

Off by default; switched on by `pmoe.profiling.enable(True)` or the environment variable
PMOE_NVTX=1 (read at import).  When off, nvtx_range returns one shared no-op context manager:
a function call, a global read and two empty method calls, no allocation.  When on, it pushes an
NVTX range on CUDA builds (seen by `nsys profile -t cuda,nvtx`) and opens a
torch.profiler.record_function of the same name (seen by torch.profiler, on CPU as well).
"""
from __future__ import annotations

import contextlib
import os

import torch

_enabled = os.environ.get("PMOE_NVTX", "0") not in ("", "0")
_OFF = contextlib.nullcontext()  # reusable: its __enter__/__exit__ keep no state


def enable(flag: bool = True) -> None:
    """Switch the ranges on or off for the whole process."""
    global _enabled
    _enabled = bool(flag)


def is_enabled() -> bool:
    return _enabled


class _Range:
    __slots__ = ("name", "_record", "_nvtx")

    def __init__(self, name: str):
        self.name = name
        self._record = None
        self._nvtx = False

    def __enter__(self):
        # NVTX needs a CUDA build; torch.cuda.nvtx raises on CPU-only builds
        if torch.cuda.is_available():
            torch.cuda.nvtx.range_push(self.name)
            self._nvtx = True
        self._record = torch.profiler.record_function(self.name)
        self._record.__enter__()
        return self

    def __exit__(self, *exc):
        self._record.__exit__(*exc)
        if self._nvtx:
            torch.cuda.nvtx.range_pop()
        return False


def nvtx_range(name: str):
    """Context manager marking a named range when profiling is on; a shared no-op when off."""
    return _Range(name) if _enabled else _OFF

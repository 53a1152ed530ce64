"""Freed memory stays with the process during the benchmarks (glibc), unless the environment
already chooses (MALLOC_* variables, glibc malloc tunables, a preloaded allocator).

glibc serves a large buffer by mmap and unmaps it on free (above a threshold that starts at
128 KiB), and returns the heap's free top to the OS above another: a layer call that allocates
its output and temporaries afresh then page-faults them in again.  On the 2-core development VM
that cost a call several milliseconds, at random, and not the same for every kind of a
comparison (they allocate different amounts): the large layer's forward (PyTorch path, one
thread) took 29 and 35 ms in two runs of the suite on the same code, its ratio to the dense
conv 0.47 and 0.52.  With mmap off for allocations and trimming off, freed buffers are reused,
as under the caching allocators (jemalloc, tcmalloc) that PyTorch's CPU performance guides
recommend: 24-26 ms and 0.41-0.45 in three runs.  The setting is recorded in the suite's JSON
(machine_info "freed_memory").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def _user_allocator() -> bool:
    """Whether the environment already chooses: MALLOC_* variables, glibc malloc tunables, or an
    allocator preloaded in glibc's place (jemalloc, tcmalloc, mimalloc)."""
    return (any(name.startswith("MALLOC_") for name in os.environ)
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")))


def keep_freed_memory() -> str:
    """Tell glibc to keep freed memory (no mmap for allocations, no trimming); -> "kept", or why
    not: "environment" (the environment chooses: yours stays, see _user_allocator),
    "unsupported" (not glibc), "partly" (mmap off, trimming not)."""
    if _user_allocator():
        return "environment"
    if not sys.platform.startswith("linux"):
        return "unsupported"
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no libc by that name, or one without mallopt (musl)
        return "unsupported"
    if mallopt(_M_MMAP_MAX, 0) != 1:
        return "unsupported"
    return "kept" if mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1 else "partly"

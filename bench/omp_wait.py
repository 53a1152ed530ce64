"""OMP_WAIT_POLICY=PASSIVE for the benchmarks, unless the environment sets a policy.

On a CPU shared with other work (load average above the core count), OpenMP's default wait
(spin, then sleep) makes a multi-threaded run pay about one scheduler time slice per parallel
region: a worker that spun its fair share away waits in the run queue while the region's other
thread waits for it at the barrier: milliseconds per region where PASSIVE costs microseconds
(threads sleep at once, and a woken sleeper runs at once).  That cost is per op, so it swamps a path of many ops (the pMoE torch
path, the masking baseline) far more than one big convolution, and the 2-thread timings would
measure the scheduler.  PASSIVE costs a 1-thread run nothing.  The setting must be in the
environment before torch starts its OpenMP runtime: call passive_omp_wait() before importing
torch.  `OMP_WAIT_POLICY=ACTIVE pytest bench ...` (or any value) keeps yours.
"""
from __future__ import annotations

import os
import sys


def passive_omp_wait() -> str:
    """Set OMP_WAIT_POLICY=PASSIVE if unset and torch is not imported yet (afterwards it could no
    longer take effect, so it is left alone); -> the policy in force ("" for OpenMP's default)."""
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY", "")

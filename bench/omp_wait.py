"""The OpenMP wait policy of the benchmarks: PASSIVE on a CPU shared with other work, OpenMP's
default otherwise, unless the environment sets a policy.

On a CPU shared with other work (1-minute load average at or above the core count), OpenMP's
default wait (spin, then sleep) makes a multi-threaded run pay about one scheduler time slice
per parallel region: a worker that spun its fair share away waits in the run queue while the
region's other thread waits for it at the barrier: milliseconds per region where PASSIVE costs
microseconds (threads sleep at once, and a woken sleeper runs at once).  That cost is per op, so
it swamps a path of many ops (the pMoE torch path, the masking baseline) far more than one big
convolution, and the 2-thread timings would measure the scheduler.
On an idle CPU the default is right: there PASSIVE makes every parallel region wake a sleeping
thread, tens of microseconds an op (measured on the 2-core development VM, idle: the PyTorch
path at WRN-pMoE, forward, 2 threads, 8.7 ms with PASSIVE against 7.6 ms with the default),
which is not what a user of an idle machine sees.  Either way both kinds of a comparison run
under the same policy, and the JSON records it (machine_info "omp_wait_policy").
The setting must be in the environment before torch starts its OpenMP runtime: call
choose_omp_wait() before importing torch.  `OMP_WAIT_POLICY=ACTIVE pytest bench ...` (or any
value) keeps yours.
"""
from __future__ import annotations

import os
import sys


def cores() -> int:
    """The cores this process may run on (its CPU affinity, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def shared_cpu() -> bool:
    """Whether other work already keeps every core busy (1-minute load average >= cores).  The
    average also counts a benchmark that just finished on this machine: run the next one after
    a minute's pause, or set the policy, to keep a series of runs under one policy."""
    try:
        return os.getloadavg()[0] >= cores()
    except OSError:  # no load average on this platform
        return False


def choose_omp_wait() -> str:
    """Set OMP_WAIT_POLICY=PASSIVE on a shared CPU if the policy is unset and torch is not imported
    yet (afterwards it could no longer take effect, so it is left alone); -> the policy in force
    ("" for OpenMP's default)."""
    if "OMP_WAIT_POLICY" not in os.environ and "torch" not in sys.modules and shared_cpu():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY", "")

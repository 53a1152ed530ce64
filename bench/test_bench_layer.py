"""The layer benchmark suite: every shape family x pass x dtype x thread count, each baseline
timed interleaved with the others, in one run.

    pytest bench --benchmark-only --benchmark-json=bench.json && python bench/ratios.py bench.json

One test per (shape, pass, dtype, threads) times every kind (dense, masking, torch; compiled,
the PyTorch path under torch.compile, on CPU; triton on CUDA) in rounds: each round calls every
kind once, so that all of them see the same machine load, in an order that changes from round to
round (every permutation in turn).  What it records (benchmark.extra_info): each kind's median
time, and each ratio as the median over rounds of that round's ratio (a paired comparison,
steady under a load that drifts).  pytest-benchmark's own statistics are of whole rounds.  Where
torch.compile cannot build (no C++ compiler), compiled is left out and extra_info says why.

CPU: fp32 at each shape's cpu_batch, with torch's thread count set to each of
PMOE_BENCH_THREADS (comma-separated, default "1,2": the README tables show both).  Each test
runs rounds for about PMOE_BENCH_SECONDS (default 8) after one warm-up call of each kind (the
compile, for compiled: each test compiles its own static graphs) and two warm-up rounds, at least
PMOE_BENCH_MIN_ROUNDS (default 18) and at most about 400, a multiple of the number of orders.
OMP_WAIT_POLICY is PASSIVE on a shared CPU unless set (bench/conftest.py, bench/omp_wait.py:
there the default wait costs a multi-threaded run a scheduler slice per op; on an idle CPU the
default stays).
CUDA: bf16/fp16/fp32 at gpu_batch, with the Triton rows; each timed call ends in a synchronize.
"""
from __future__ import annotations

import gc
import itertools
import os
import statistics
import time
import warnings

import pytest
import torch

from baselines import available_kinds, make_layer, randomize_router
from ratios import RATIOS  # the ratios the suite records are the ones ratios.py prints
from shapes import SHAPES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.bfloat16, torch.float16, torch.float32) if DEVICE.type == "cuda" else (torch.float32,)
PASSES = ("forward", "forward+backward")


def bench_threads() -> tuple:
    """The CPU thread counts to run (PMOE_BENCH_THREADS, default 1 and 2); on CUDA only torch's
    current count (host threads barely matter there)."""
    if DEVICE.type == "cuda":
        return (torch.get_num_threads(),)
    return tuple(int(t) for t in os.environ.get("PMOE_BENCH_THREADS", "1,2").split(",") if t.strip())


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed_call(layer: torch.nn.Module, x: torch.Tensor, pass_name: str):
    """The function the benchmark times: inference forward, or a forward and backward producing
    the gradients of the input and of every parameter (as inside a network)."""
    if pass_name == "forward":
        def run():
            with torch.no_grad():
                layer(x)
            _sync()
        return run

    x = x.detach().requires_grad_(True)
    with torch.no_grad():
        dy = torch.randn_like(layer(x))

    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)
        _sync()
    return run


class Interleaved:
    """Calls every kind once per round and keeps each call's seconds.  The rounds go through every
    order of the kinds in turn, so that each kind follows each other kind equally often: what ran
    just before (its cache footprint, the memory it freed) changes a call's time by tens of
    percent on a small CPU."""

    def __init__(self, runs: dict):
        self.runs = runs
        self.orders = list(itertools.permutations(runs))
        self.times = {k: [] for k in runs}
        self.rounds = 0

    def __call__(self) -> None:
        for kind in self.orders[self.rounds % len(self.orders)]:
            t0 = time.perf_counter()
            self.runs[kind]()
            self.times[kind].append(time.perf_counter() - t0)
        self.rounds += 1

    def summary(self) -> dict:
        """{"times": {kind: median s}, "ratios": {"a/b": median over rounds of a/b}}."""
        ratios = {f"{a}/{b}": statistics.median(x / y for x, y in zip(self.times[a], self.times[b]))
                  for a, b in RATIOS if a in self.times and b in self.times}
        return {"times": {k: statistics.median(v) for k, v in self.times.items()}, "ratios": ratios}


def _rounds(pair: Interleaved) -> int:
    """How many timed rounds fit PMOE_BENCH_SECONDS, judged by two warm-up rounds; a whole number
    of passes through the orders."""
    t0 = time.perf_counter()
    pair()
    pair()
    per_round = (time.perf_counter() - t0) / 2
    seconds = float(os.environ.get("PMOE_BENCH_SECONDS", "8"))
    low = int(os.environ.get("PMOE_BENCH_MIN_ROUNDS", "18"))
    rounds = max(low, min(400, int(seconds / max(per_round, 1e-6))))
    return -(-rounds // len(pair.orders)) * len(pair.orders)


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", bench_threads(), indirect=True, ids=lambda t: f"{t}thr")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_layer(benchmark, shape_name: str, pass_name: str, dtype: torch.dtype, threads: int):
    shape = SHAPES[shape_name]
    batch = shape.batch(DEVICE.type)
    torch.manual_seed(0)
    x = torch.randn(shape.input_shape(batch), device=DEVICE, dtype=dtype)
    runs = {}
    torch._dynamo.reset()  # "compiled": this test's graphs only, never a cache limit reached
    for kind in available_kinds(DEVICE):
        if kind == "triton" and DEVICE.type != "cuda":
            continue  # the CPU interpreter is a correctness tool, not a timing
        layer = make_layer(shape, kind, DEVICE, dtype)
        randomize_router(layer)
        runs[kind] = timed_call(layer, x, pass_name)
        try:
            runs[kind]()  # "compiled" compiles here, outside the rounds and the round-time estimate
        except Exception as exc:  # noqa: BLE001 (inductor's errors have no common type)
            if kind != "compiled":
                raise
            del runs[kind]
            benchmark.extra_info["compiled_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            warnings.warn(f"compiled left out: {benchmark.extra_info['compiled_error']}")
    gc.collect()  # the compile's garbage, collected now rather than inside a timed round
    pair = Interleaved(runs)
    load = os.getloadavg()[0]
    rounds = _rounds(pair)
    pair.times = {k: [] for k in runs}  # the warm-up rounds are not kept
    benchmark.group = f"{shape_name} | {pass_name} | {str(dtype).replace('torch.', '')} | {threads} threads"
    benchmark.pedantic(pair, rounds=rounds, iterations=1)
    benchmark.extra_info.update(shape=shape_name, pass_name=pass_name, dtype=str(dtype).replace("torch.", ""),
                                threads=threads, batch=batch, device=DEVICE.type, layer=shape.describe(),
                                rounds=rounds, loadavg_1min=[load, os.getloadavg()[0]], **pair.summary())

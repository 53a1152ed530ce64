"""The layer benchmark suite: every shape family x baseline x pass x dtype, in one run.

    pytest bench --benchmark-only --benchmark-json=bench.json && python bench/ratios.py bench.json

CPU: fp32 at each shape's cpu_batch (the whole suite runs in under three minutes).
CUDA: bf16/fp16/fp32 at gpu_batch, with the Triton rows; each timed call ends in a synchronize.
Rows are grouped by (shape, pass, dtype), so pytest-benchmark's table compares the baselines.
"""
from __future__ import annotations

import pytest
import torch

from baselines import KINDS, make_layer, randomize_router, triton_usable
from shapes import SHAPES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.bfloat16, torch.float16, torch.float32) if DEVICE.type == "cuda" else (torch.float32,)
PASSES = ("forward", "forward+backward")


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

    x.requires_grad_(True)
    with torch.no_grad():
        dy = torch.randn_like(layer(x))

    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)
        _sync()
    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_layer(benchmark, shape_name: str, kind: str, pass_name: str, dtype: torch.dtype):
    if kind == "triton" and DEVICE.type != "cuda":
        pytest.skip("triton rows need CUDA (the CPU interpreter is a correctness tool, not a timing)")
    if kind == "triton" and not triton_usable(DEVICE):
        pytest.skip("pmoe.kernels not importable")
    shape = SHAPES[shape_name]
    batch = shape.batch(DEVICE.type)
    torch.manual_seed(0)
    layer = make_layer(shape, kind, DEVICE, dtype)
    randomize_router(layer)
    x = torch.randn(shape.input_shape(batch), device=DEVICE, dtype=dtype)
    run = timed_call(layer, x, pass_name)
    run()  # warm-up: kernel compilation, allocator
    benchmark.group = f"{shape_name} | {pass_name} | {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(shape=shape_name, kind=kind, pass_name=pass_name,
                                dtype=str(dtype).replace("torch.", ""), batch=batch, device=DEVICE.type,
                                layer=shape.describe())
    benchmark(run)

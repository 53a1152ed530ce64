"""pmoe.functional: the backend table, and the path from a layer to a kernel launch, which must
stay short enough to read (docs/ARCHITECTURE.md): at most five of the project's frames from
PMoEConv2d.forward (or PMoE.forward, or forward_pooled) to the function that launches a kernel,
in at most three files, with nothing but torch's own dispatch frames between them."""
from __future__ import annotations

import inspect
import os

import pytest
import torch

import pmoe
import pmoe.functional as PF

triton = pytest.importorskip("triton")

from pmoe.kernels import launch  # noqa: E402

PROJECT = tuple(os.path.dirname(m.__file__) + os.sep for m in (pmoe, pmoe.kernels))
TORCH = os.path.dirname(torch.__file__) + os.sep
MAX_FRAMES, MAX_FILES = 5, 3


def test_backend_table():
    assert set(PF.BACKENDS) == {"torch", "triton"}
    sigs = {name: list(inspect.signature(fn).parameters) for name, fn in PF.BACKENDS.items()}
    assert sigs["torch"] == sigs["triton"] == ["x", "router", "weight", "bias", "o"]


def _path_to_launch(call) -> list:
    """The frames from the layer's forward (outermost) to the function that calls launch.run."""
    stacks = []
    saved = launch.RECORDER
    launch.RECORDER = lambda kernel, grid, args, kwargs: (stacks.append(inspect.stack(0)),
                                                          kernel[grid](*args, **kwargs))
    try:
        call()
    finally:
        launch.RECORDER = saved
    frames = stacks[0]
    first = next(i for i, f in enumerate(frames) if f.function == "run" and f.filename == launch.__file__) + 1
    last = next(i for i, f in enumerate(frames) if f.filename == pmoe.layers.__file__)
    return frames[first:last + 1][::-1]


@pytest.mark.parametrize("form", ["conv2d", "conv2d pooled", "tokens"])
def test_layer_reaches_the_launch_in_five_frames_three_files(form):
    x = torch.randn(2, 3, 8, 6)
    if form == "tokens":
        layer = pmoe.PMoE(12, 8, 4, 3, backend="triton")
        call = lambda: layer(x.view(2, 12, 12))  # noqa: E731
    else:
        layer = pmoe.PMoEConv2d(3, 8, 2, 4, 3, backend="triton")
        call = (lambda: layer.forward_pooled(x)) if form.endswith("pooled") else (lambda: layer(x))  # noqa: E731
    path = _path_to_launch(call)
    ours = [f for f in path if f.filename.startswith(PROJECT)]
    others = [f for f in path if not f.filename.startswith(PROJECT) and not f.filename.startswith(TORCH)]
    shown = " -> ".join(f"{os.path.basename(f.filename)}:{f.function}" for f in ours)
    assert not others, [f"{f.filename}:{f.function}" for f in others]
    assert ours[0].function in ("forward", "forward_pooled") and ours[-1].function == "forward", shown
    assert len(ours) <= MAX_FRAMES, shown
    assert len({f.filename for f in ours}) <= MAX_FILES, shown

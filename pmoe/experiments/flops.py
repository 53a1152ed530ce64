"""Counted FLOPs of a model's inference and training step (shared with bench/compute_savings.py).

    flops = model_flops(model, x, loss_fn)   # {"infer_flops": ..., "train_flops": ...} for the batch x

torch.utils.flop_counter.FlopCounterMode counts what actually runs: convs and matmuls by torch's
own formulas, the fused Triton op by the formula registered with its custom op.  There is no
FLOP formula here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything fn() runs (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclass
class Steps:
    """The three calls a measurement times or counts.

    infer(): eval mode, no_grad forward.  forward_train(): train mode, forward + loss (returns the
    loss, graph attached).  train(): zero the grads, forward_train, backward."""

    infer: Callable[[], None]
    forward_train: Callable[[], torch.Tensor]
    train: Callable[[], None]


def step_functions(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                   input_grad: bool = False) -> Steps:
    """Steps of `model` on the batch x; input_grad: whether x needs a gradient (a layer inside a
    network) or not (a network's input)."""
    xg = x.detach().requires_grad_(input_grad)

    def infer():
        model.eval()
        with torch.no_grad():
            model(x)

    def forward_train():
        model.train()
        return loss_fn(model(xg))

    def train():
        model.zero_grad(set_to_none=True)
        forward_train().backward()

    return Steps(infer, forward_train, train)


def model_flops(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                input_grad: bool = False) -> dict:
    """{"infer_flops", "train_flops"} of one step on the batch x (train = forward + loss +
    backward).  Leaves the model in train mode with no gradients."""
    steps = step_functions(model, x, loss_fn, input_grad)
    out = {"infer_flops": count_flops(steps.infer), "train_flops": count_flops(steps.train)}
    model.zero_grad(set_to_none=True)
    return out

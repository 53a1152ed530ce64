"""Expert activations by name (the names: pmoe.vocab.ACTIVATIONS) for the torch path and the
benchmarks: each one's function and its backward.  pmoe.reference keeps its own on purpose."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import vocab

_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) form, torch's default
    "silu": F.silu,
    "identity": lambda t: t,
}
_BACKWARDS: dict[str, Callable] = {  # d act(pre) / d pre applied to grad, by the kernels autograd uses
    "relu": lambda grad, pre: torch.ops.aten.threshold_backward(grad, pre, 0),
    "gelu": torch.ops.aten.gelu_backward,
    "silu": torch.ops.aten.silu_backward,
    "identity": lambda grad, pre: grad,
}
if not set(_FUNCTIONS) == set(_BACKWARDS) == set(vocab.ACTIVATIONS):
    raise ImportError(f"pmoe.activations defines {sorted(_FUNCTIONS)}, pmoe.vocab {vocab.ACTIVATIONS}")


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    vocab.check("activation", name)
    return _FUNCTIONS[name]


def activation_backward(name: str, grad: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The gradient through act at the pre-activations `pre`."""
    return _BACKWARDS[name](grad, pre)

"""Models by name with the paper's settings as defaults, for the CLI and the experiments.

    model = build_model("pmoe", in_channels=1, patch_size=8, training="joint")   # k=8, l=6, m=5
"""
from __future__ import annotations

from torch import nn

from .paper import CNNClassifier, PMoEClassifier
from .wrn import WideResNet, WRNPMoE

MODELS = ("pmoe", "cnn", "wrn", "wrn-pmoe")
TRAININGS = ("joint", "separate")


def default_model_args(name: str, training: str = "joint") -> dict:
    """The paper's settings (SPEC §3): pMoE joint k=8, l=6, 5 neurons per expert, Gaussian head;
    pMoE separate k=2, l=2, 20 neurons per expert, +-1 head; CNN 40 neurons (as many as the
    joint pMoE), +-1 head; WRN-16-4; WRN-pMoE k=4, l=16, gate softmax_all."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    if training not in TRAININGS:
        raise ValueError(f"unknown training {training!r}; expected one of {TRAININGS}")
    if training == "separate" and name != "pmoe":
        raise ValueError(f"separate training trains a pMoE's routers first: it needs --model pmoe, not {name!r}")
    if name == "pmoe":
        if training == "separate":
            return {"num_experts": 2, "top_l": 2, "neurons_per_expert": 20, "head": "sign"}
        return {"num_experts": 8, "top_l": 6, "neurons_per_expert": 5, "head": "gaussian"}
    if name == "cnn":
        return {"neurons": 40, "head": "sign"}
    wrn = {"depth": 16, "widen_factor": 4, "dropout": 0.0}
    return wrn if name == "wrn" else {**wrn, "num_experts": 4, "top_l": 16, "gate": "softmax_all"}


def build_model(name: str, in_channels: int, patch_size: int, num_classes: int = 2, training: str = "joint",
                **overrides) -> nn.Module:
    """A model for images with `in_channels` channels made of `patch_size` tiles.

    The paper's models (pmoe, cnn) are binary classifiers returning one logit; the Wide-ResNets
    return num_classes logits.  overrides replace default_model_args(name, training) entries;
    an unknown key raises TypeError.
    """
    args = default_model_args(name, training)
    unknown = set(overrides) - set(args) - ({"gate", "backend"} if name == "pmoe" else set())
    if unknown:
        raise TypeError(f"model {name!r} takes no argument(s) {sorted(unknown)}; it takes {sorted(args)}")
    args.update(overrides)
    if name in ("pmoe", "cnn"):
        if num_classes != 2:
            raise ValueError(f"the paper's {name} model is a binary classifier; this data has {num_classes} classes")
        if name == "pmoe":
            return PMoEClassifier(in_channels, patch_size, **args)
        return CNNClassifier(in_channels, patch_size, **args)
    cls = WideResNet if name == "wrn" else WRNPMoE
    return cls(num_classes=num_classes, in_channels=in_channels, **args)

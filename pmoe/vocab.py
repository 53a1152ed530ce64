"""The layer's vocabulary and options: gates, combines and activations by name, for every backend,
and `Options`, one call's options as one value.

One place for the names.  The torch path maps a name to its function (pmoe.activations,
pmoe.routing); the Triton kernels compile a name's position in its tuple as an integer mode code
(pmoe.kernels.modes names each code and checks, at import, that it matches this table).
Adding a gate, combine or activation starts here; docs/ARCHITECTURE.md lists the other places.
"""
from __future__ import annotations

from dataclasses import dataclass

GATES = ("softmax", "indicator", "softmax_all")
COMBINES = ("concat", "sum")
ACTIVATIONS = ("relu", "gelu", "silu", "identity")
VOCABULARY = {"gate": GATES, "combine": COMBINES, "activation": ACTIVATIONS}


def check(kind: str, name) -> None:
    """Raise ValueError unless `name` is one of the vocabulary's `kind`s ("gate", "combine", ...)."""
    allowed = VOCABULARY[kind]
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {allowed}")


def code(vocabulary: tuple, name: str) -> int:
    """The kernels' integer code of `name` (its position in `vocabulary`)."""
    try:
        return vocabulary.index(name)
    except ValueError:
        raise ValueError(f"unknown option {name!r}; expected one of {vocabulary}") from None


@dataclass(frozen=True)
class Options:
    """One call's options, checked and resolved (pmoe.functional builds it): patch size p, patches
    per expert l (a count), the names, deterministic (bit-identical runs), and pooled (the output
    summed over the patches).  Backends take it whole; the custom ops take plain arguments, in
    this field order (op_args)."""

    p: int
    l: int
    combine: str
    gate: str
    activation: str
    deterministic: bool
    pooled: bool

    def op_args(self) -> tuple:
        """The fields in order: the custom ops' arguments after the tensors."""
        return (self.p, self.l, self.combine, self.gate, self.activation, self.deterministic, self.pooled)

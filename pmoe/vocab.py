"""The layer's vocabulary: gates, combines and activations, by name, for every backend.

One place for the names.  The torch path maps a name to its function (pmoe.activations,
pmoe.routing); the Triton kernels compile a name's position in its tuple as an integer mode code
(pmoe.kernels.modes names each code and checks, at import, that it matches this table).
Adding a gate, combine or activation starts here; docs/ARCHITECTURE.md lists the other places.
"""
from __future__ import annotations

GATES = ("softmax", "indicator", "softmax_all")
COMBINES = ("concat", "sum")
ACTIVATIONS = ("relu", "gelu", "silu", "identity")


def code(vocabulary: tuple, name: str) -> int:
    """The kernels' integer code of `name` (its position in `vocabulary`)."""
    try:
        return vocabulary.index(name)
    except ValueError:
        raise ValueError(f"unknown option {name!r}; expected one of {vocabulary}") from None

"""Named constexpr mode codes of the kernels, checked against pmoe.vocab at import.

Kernels branch on these (`if GATE == GATE_SOFTMAX: ... elif ...: ... else: tl.static_assert(False)`),
never on bare integers, and every chain ends in a static_assert, so an unknown code fails to
compile instead of silently taking the last branch.
"""
import triton.language as tl

from pmoe import vocab

GATE_SOFTMAX = tl.constexpr(0)
GATE_INDICATOR = tl.constexpr(1)
GATE_SOFTMAX_ALL = tl.constexpr(2)

COMBINE_CONCAT = tl.constexpr(0)
COMBINE_SUM = tl.constexpr(1)

ACT_RELU = tl.constexpr(0)
ACT_GELU = tl.constexpr(1)
ACT_SILU = tl.constexpr(2)
ACT_IDENTITY = tl.constexpr(3)

# where the expert GEMM reads its gathered patch rows
SRC_MAP = tl.constexpr(0)   # straight from the (B, C, H, W) map through its strides (channels-last: rows contiguous)
SRC_ROWS = tl.constexpr(1)  # from the (B*n, d) row copy the route pass wrote (NCHW input: see forward.py)

# what one launch of the forward kernel does
FWD_FUSED = tl.constexpr(0)    # route and experts in one launch, ordered by tickets
FWD_ROUTE = tl.constexpr(1)    # route only (grid: B)
FWD_EXPERTS = tl.constexpr(2)  # experts only (grid: groups x tiles)

_TABLES = {
    "gate": (vocab.GATES, {"softmax": GATE_SOFTMAX, "indicator": GATE_INDICATOR, "softmax_all": GATE_SOFTMAX_ALL}),
    "combine": (vocab.COMBINES, {"concat": COMBINE_CONCAT, "sum": COMBINE_SUM}),
    "activation": (vocab.ACTIVATIONS, {"relu": ACT_RELU, "gelu": ACT_GELU, "silu": ACT_SILU,
                                       "identity": ACT_IDENTITY}),
}


def _check_codes() -> None:
    """Every name of pmoe.vocab has a named code here, equal to vocab.code(name), and nothing more."""
    for kind, (names, named) in _TABLES.items():
        if set(names) != set(named):
            raise ImportError(f"pmoe.kernels.modes: {kind} codes {sorted(named)} do not cover pmoe.vocab's {names}")
        for name, const in named.items():
            if const.value != vocab.code(names, name):
                raise ImportError(f"pmoe.kernels.modes: {kind} {name!r} is {const.value} here but "
                                  f"{vocab.code(names, name)} in pmoe.vocab")


_check_codes()


def gate_code(name: str) -> int:
    return vocab.code(vocab.GATES, name)


def combine_code(name: str) -> int:
    return vocab.code(vocab.COMBINES, name)


def activation_code(name: str) -> int:
    return vocab.code(vocab.ACTIVATIONS, name)

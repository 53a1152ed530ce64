"""Discriminative routing: does each expert pick the class-discriminative patch and leave the
class-irrelevant ones alone?

`pmoe.train` already records, at every evaluation of a routed model, `capture` (per expert, the
fraction of test images whose chosen l patches contain the discriminative patch), `capture_any`
and `routing.unrouted_fraction`.  The fraction of class-irrelevant patches routed follows from
those exactly, so it is derived here rather than counted a second time:

    per expert s:  E_b[(l - [sig_b in J_s(b)]) / (n - 1)]        = (l - capture_s) / (n - 1)
    any expert:    E_b[(covered_b - [sig_b covered]) / (n - 1)]  = (n (1 - unrouted) - capture_any) / (n - 1)

(exact when every test image has a discriminative patch, as in the synthetic and digit-tile data).
"""
from __future__ import annotations

from torch import nn

from ..routing import resolve_top_l


def discriminative_routing(record: dict, num_patches: int, top_l: int) -> dict:
    """Routing metrics from one `pmoe.train` evaluation record of a routed model.

    record: holds "capture" (k,), "capture_any" and "routing"["unrouted_fraction"] -- what
    `pmoe.train.evaluate` returns when every test image has signal_index >= 0.
    Returns capture (k,), capture_any, irrelevant_routed_per_expert (k,): the fraction of an
    image's n - 1 class-irrelevant patches expert s took; irrelevant_routed: the fraction some
    expert took; chance_capture = l / n, the capture of routing that ignores the content.
    """
    for key in ("capture", "capture_any", "routing"):
        if key not in record:
            raise ValueError(f"the record has no {key!r}: evaluate a routed model on data with signal_index >= 0")
    n, l = num_patches, top_l
    if n < 2 or not 1 <= l <= n:
        raise ValueError(f"need n >= 2 patches and 1 <= l <= n, got n={n}, l={l}")
    covered = n * (1.0 - record["routing"]["unrouted_fraction"])

    def frac(v: float) -> float:  # clamp float rounding only
        return min(1.0, max(0.0, v))

    return {
        "capture": [float(c) for c in record["capture"]],
        "capture_any": float(record["capture_any"]),
        "irrelevant_routed_per_expert": [frac((l - c) / (n - 1)) for c in record["capture"]],
        "irrelevant_routed": frac((covered - record["capture_any"]) / (n - 1)),
        "chance_capture": l / n,
    }


def routed_layer_size(model: nn.Module, num_patches: int) -> int:
    """l of a paper pMoE classifier (its `moe` layer), resolved against n patches."""
    return resolve_top_l(model.moe.top_l, num_patches)


def routing_metrics(model: nn.Module, test) -> dict:
    """Evaluate a routed paper model (`model.moe`) on `test` (a PatchDataset whose every image has
    a discriminative patch) and return `discriminative_routing` plus test_acc."""
    from ..train import evaluate

    if not bool((test.signal_index >= 0).all()):
        raise ValueError("every test image needs a discriminative patch (signal_index >= 0)")
    rec = evaluate(model, test)
    n = test.num_patches
    return {"test_acc": rec["test_acc"], **discriminative_routing(rec, n, routed_layer_size(model, n))}


def format_routing(metrics: dict) -> str:
    """One short log line."""
    caps = " ".join(f"{c:.2f}" for c in metrics["capture"])
    return (f"capture {caps} (any {metrics['capture_any']:.2f}, chance {metrics['chance_capture']:.2f})  "
            f"irrelevant routed {metrics['irrelevant_routed']:.2f}")

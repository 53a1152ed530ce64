"""Counted compute, wall time and saved-activation bytes: pMoE vs its dense twin (and the masking
approach), for each benchmark layer shape and for whole networks.

    python bench/compute_savings.py                 # readable table
    python bench/compute_savings.py --json          # list of rows (keys below)
    python bench/compute_savings.py --only flagship-digits --repeats 1

FLOPs: torch.utils.flop_counter.FlopCounterMode around the real forward (inference, no_grad)
and forward + backward (training), by pmoe.experiments.flops (shared with `pmoe equal-compute`).
The torch path's matmul/bmm and the convs are counted by torch itself; the fused Triton op
reports through the formula registered with its custom op.  There is no FLOP formula in this script.
Saved bytes: every tensor autograd saves for backward in one training forward, caught with
torch.autograd.graph.saved_tensors_hooks and counted once per storage (a tensor saved twice, or
two views of one buffer, count once).  Parameters are left out: they are kept whether or not
autograd saves them.
Wall time: median of --repeats calls after one warm-up, on this machine (synchronised on CUDA).

Row keys: name, dense_/pmoe_/masking_ x infer_flops, train_flops, infer_s, train_s, saved_bytes
(masking_* is None where a network cannot be converted), pmoe_backend, batch, input.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Callable, Iterable, Optional

from omp_wait import choose_omp_wait  # noqa: E402

choose_omp_wait()  # before torch starts its OpenMP runtime (see bench/omp_wait.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from baselines import make_layer, randomize_router, to_masking, triton_usable  # noqa: E402
from machine import machine_line  # noqa: E402
from shapes import SHAPES  # noqa: E402

from pmoe.experiments.flops import count_flops, step_functions  # noqa: E402
from pmoe.models.flagship import flagship_pair  # noqa: E402

METRICS = ("infer_flops", "train_flops", "infer_s", "train_s", "saved_bytes")


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs (storages of
    `exclude`, e.g. the parameters, left out).  The graph fn builds is kept alive by its result
    until the count is done, so nothing is freed and re-used under a counted address."""
    def key(t: torch.Tensor):
        return (t.device, t.untyped_storage().data_ptr())

    skip = {key(t) for t in exclude}
    seen: dict = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
            return t
        k = key(t)
        if k not in skip:
            seen[k] = max(seen.get(k, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    del out
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def wall_time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model: nn.Module, x: torch.Tensor, loss_fn: Callable, repeats: int, input_grad: bool) -> dict:
    """The five metrics of one model on input x.  Training = forward + loss + backward;
    input_grad: whether x needs a gradient (a layer inside a network) or not (a network's input)."""
    device = x.device
    params = list(model.parameters())
    steps = step_functions(model, x, loss_fn, input_grad)
    row = {"infer_flops": count_flops(steps.infer), "train_flops": count_flops(steps.train)}
    row["infer_s"] = wall_time(steps.infer, device, repeats)
    row["train_s"] = wall_time(steps.train, device, repeats)
    row["saved_bytes"] = saved_bytes(steps.forward_train, exclude=params)
    model.zero_grad(set_to_none=True)
    return row


def _merge(name: str, results: dict, **extra) -> dict:
    row = {"name": name, **extra}
    for prefix in ("dense", "pmoe", "masking"):
        for m in METRICS:
            r = results.get(prefix)
            row[f"{prefix}_{m}"] = None if r is None else r[m]
    return row


def _sum_loss(y: torch.Tensor) -> torch.Tensor:
    return y.float().sum()


def layer_rows(device: torch.device, backend: str, repeats: int, only: Optional[set]) -> list:
    rows = []
    for shape in SHAPES.values():
        if only and f"layer:{shape.name}" not in only:
            continue
        batch = shape.batch(device.type)
        torch.manual_seed(0)
        x = torch.randn(shape.input_shape(batch), device=device)
        results = {}
        for prefix, kind in (("dense", "dense"), ("pmoe", backend), ("masking", "masking")):
            layer = make_layer(shape, kind, device)
            randomize_router(layer)
            results[prefix] = measure(layer, x, _sum_loss, repeats, input_grad=True)
        rows.append(_merge(f"layer:{shape.name}", results, pmoe_backend=backend, batch=batch,
                           input=list(x.shape[1:]), layer=shape.describe()))
    return rows


def _networks(backend: str):
    """(name, pmoe net, dense twin, masking net or None, input shape without batch, loss)."""
    def ce(classes):
        return lambda logits: F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device) % classes)

    for name, cin, classes in (("flagship-digits", 1, 2), ("flagship-cifar", 3, 10)):
        net, twin = flagship_pair(in_channels=cin, num_classes=classes, backend=backend)
        yield name, net, twin, to_masking(copy.deepcopy(net)), (cin, 32, 32), ce(classes)
    from pmoe.models import CNNClassifier, PMoEClassifier  # another agent's module: optional here
    for name, k, l, m in (("paper-mnist-separate", 2, 2, 20), ("paper-mnist-joint", 8, 6, 5)):
        net = PMoEClassifier(1, 28, num_experts=k, top_l=l, neurons_per_expert=m, backend=backend)
        twin = CNNClassifier(1, 28, neurons=k * m)
        yield name, net, twin, None, (1, 112, 112), lambda logit: F.softplus(-logit).mean()


def network_rows(device: torch.device, backend: str, batch: int, repeats: int, only: Optional[set]) -> list:
    rows = []
    try:
        nets = list(_networks(backend))
    except ImportError as exc:  # the paper models are optional for this script
        print(f"# skipping paper networks: {exc}", file=sys.stderr)
        nets = []
    for name, net, twin, masking, in_shape, loss in nets:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        x = torch.randn(batch, *in_shape, device=device)
        results = {"pmoe": measure(net.to(device), x, loss, repeats, input_grad=False),
                   "dense": measure(twin.to(device), x, loss, repeats, input_grad=False)}
        if masking is not None:
            results["masking"] = measure(masking.to(device), x, loss, repeats, input_grad=False)
        rows.append(_merge(name, results, pmoe_backend=backend, batch=batch, input=list(in_shape)))
    return rows


def _ratio(a, b) -> str:
    return "-" if a is None or not b else f"{a / b:.3f}"


def table(rows: list) -> str:
    head = ("name", "batch", "dense GFLOP inf/train", "pMoE/dense FLOPs inf", "pMoE/dense FLOPs train",
            "masking/dense FLOPs train", "pMoE/dense time inf", "pMoE/dense time train",
            "masking/dense time train", "saved MB dense/pMoE/masking", "pMoE/dense saved bytes")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mb = lambda v: "-" if v is None else f"{v / 2**20:.2f}"  # noqa: E731
        out.append("| " + " | ".join([
            r["name"], str(r["batch"]),
            f"{r['dense_infer_flops'] / 1e9:.3f} / {r['dense_train_flops'] / 1e9:.3f}",
            _ratio(r["pmoe_infer_flops"], r["dense_infer_flops"]),
            _ratio(r["pmoe_train_flops"], r["dense_train_flops"]),
            _ratio(r["masking_train_flops"], r["dense_train_flops"]),
            _ratio(r["pmoe_infer_s"], r["dense_infer_s"]),
            _ratio(r["pmoe_train_s"], r["dense_train_s"]),
            _ratio(r["masking_train_s"], r["dense_train_s"]),
            f"{mb(r['dense_saved_bytes'])} / {mb(r['pmoe_saved_bytes'])} / {mb(r['masking_saved_bytes'])}",
            _ratio(r["pmoe_saved_bytes"], r["dense_saved_bytes"]),
        ]) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    ap.add_argument("--net-batch", type=int, default=None,
                    help="batch for the whole networks (default 32 on CPU, 256 on CUDA)")
    ap.add_argument("--only", nargs="+", help="row names to run, e.g. flagship-digits layer:wrn-pmoe")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    backend = "triton" if device.type == "cuda" and triton_usable(device) else "torch"
    only = set(args.only) if args.only else None
    net_batch = args.net_batch or (256 if device.type == "cuda" else 32)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = layer_rows(device, backend, args.repeats, only) + network_rows(device, backend, net_batch,
                                                                          args.repeats, only)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(machine_line(device))
    print(f"# pMoE backend: {backend}; FLOPs by FlopCounterMode; saved bytes: unique storages saved for "
          f"backward, parameters excluded; times: median of {args.repeats}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

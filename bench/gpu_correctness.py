"""Correctness of the fused pMoE kernels at real sizes, for bench/gpu_check.py.

One check (check_layer) runs one layer configuration on fresh random inputs and compares it with
a float64 reference on the same values: the inputs and parameters are drawn in the layer's dtype
and widened, so only arithmetic differs.  It reports, per configuration:

  selection   each (image, expert) row of the kernel's chosen patches (as a set) against the
              float64 selection (ties to the lower index): "agree", "tie" or "mismatch".  A row is
              a tie when every patch on which the two selections differ has a float64 score within
              tie_band of the l-th largest score: the kernels round scores to the input dtype
              before choosing (as the torch path, whose matmul runs in that dtype, does), so two
              scores within about TIE_STEPS steps of that dtype may order either way; in fp32 the
              band is the accumulation error of a d-term fp32 dot product.  Only mismatches fail.
  outputs     y (or the pooled sum) against reference_given_selection with the KERNEL's
              selection: every row is compared, ties included, and the gates (Routing.gates);
  gradients   of x, router, weight (and bias), always (the selection has no gradient, so the
              reference's are exact for the kernel's choice);
  memory      the CUDA caching allocator is handed a freed NaN-filled block before each run, so
              output or gradient memory a kernel forgets to write shows as non-finite; exact
              zeros where concat leaves a (patch, expert) unselected;
  repeats     a second run chooses the same indices; with deterministic=True the outputs and
              every gradient are bit-identical run to run.

Errors are normwise, max|a - ref| / max|ref|, against TOLERANCE[dtype].
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import pmoe
from baselines import randomize_router
from pmoe.activations import get_activation
from shapes import LayerShape

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
TIE_STEPS = 2  # steps of the input dtype within which two scores may order either way
FP32_EPS = torch.finfo(torch.float32).eps


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# helpers


def poison_allocator(device: torch.device, nbytes: int) -> None:
    """Hand the CUDA caching allocator a freed NaN-filled block of about nbytes: the next
    allocations of that size reuse it, so a kernel that leaves memory unwritten returns NaN."""
    if device.type == "cuda" and nbytes > 0:
        block = torch.full((nbytes // 4 + 1,), float("nan"), device=device)
        del block


def normwise_err(a: Optional[Tensor], ref: Optional[Tensor]) -> float:
    """max|a - ref| / max|ref| (max|a - ref| where ref is all zero); None stands for zeros."""
    if a is None and ref is None:
        return 0.0
    a = torch.zeros_like(ref, dtype=torch.float64) if a is None else a.detach().double()
    ref = torch.zeros_like(a) if ref is None else ref.detach().double()
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (a - ref).abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


@contextlib.contextmanager
def forced_route(route: Optional[str]):
    """Run the fused kernels with pmoe.kernels.launch.ROUTE = route ("auto" / "fused" / "split");
    None leaves it alone."""
    if route is None:
        yield
        return
    from pmoe.kernels import launch
    was, launch.ROUTE = launch.ROUTE, route
    try:
        yield
    finally:
        launch.ROUTE = was


# ---------------------------------------------------------------------------------------------
# selection: agree / tie / mismatch


def dtype_step(v: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of dtype's values at |v| (one ulp), in v's (float64) dtype:
    eps(dtype) * 2^floor(log2 |v|), and that of the smallest normal at 0."""
    info = torch.finfo(dtype)
    a = v.abs().clamp_min(info.tiny)
    _, exp = torch.frexp(a)  # a = mantissa * 2^exp, mantissa in [0.5, 1)
    return info.eps * torch.ldexp(torch.full_like(a, 0.5), exp)


def tie_band(scores: Tensor, abs_scores: Tensor, boundary: Tensor, abs_boundary: Tensor, dtype: torch.dtype,
             d: int) -> Tensor:
    """How far (float64) from the boundary score a patch's score may lie and still order either
    way in the kernels: TIE_STEPS steps of dtype at the larger magnitude (the scores are rounded
    to dtype before the choice), plus the fp32 accumulation error of the two d-term dot
    products, sqrt(d)·eps32·sum|x_i·r_i| each (the kernels and the torch path sum in fp32)."""
    steps = TIE_STEPS * dtype_step(torch.maximum(scores.abs(), boundary.abs()), dtype)
    return steps + math.sqrt(d) * FP32_EPS * (abs_scores + abs_boundary)


def reference_selection(scores: Tensor, l: int) -> Tensor:
    """(B, k, n) float64 scores -> (B, k, l) indices of the l largest, ties to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :l]


def classify_rows(idx: Tensor, scores: Tensor, abs_scores: Tensor, dtype: torch.dtype, d: int) -> dict:
    """Each (image, expert) row of the kernel's choice idx (B, k, l) against the float64 scores
    (B, k, n) (abs_scores: sum_i |x_i·r_i| per score, for the accumulation bound).
    -> {"agree", "tie", "mismatch"}: (B, k) bool masks, one True per row.  A row whose indices
    are out of range or repeat a patch is a mismatch."""
    B, k, l = idx.shape
    n = scores.shape[-1]
    in_range = ((idx >= 0) & (idx < n)).all(-1)
    chosen = torch.zeros(B, k, n, dtype=torch.bool, device=idx.device).scatter(2, idx.clamp(0, n - 1), True)
    well_formed = in_range & (chosen.sum(-1) == l)
    ref_idx = reference_selection(scores, l)
    chosen_ref = torch.zeros_like(chosen).scatter(2, ref_idx, True)
    differ = chosen ^ chosen_ref
    last = ref_idx[..., l - 1:]  # the l-th largest: the boundary
    band = tie_band(scores, abs_scores, scores.gather(2, last), abs_scores.gather(2, last), dtype, d)
    near = (scores - scores.gather(2, last)).abs() <= band
    agree = well_formed & ~differ.any(-1)
    tie = well_formed & differ.any(-1) & (near | ~differ).all(-1)
    return {"agree": agree, "tie": tie, "mismatch": ~(agree | tie)}


# ---------------------------------------------------------------------------------------------
# the float64 reference for a given selection


def patch_rows(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, n, C·p·p) in F.unfold's order (SPEC's definition of a patch)."""
    return F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)


def scores_and_bounds(x64: Tensor, router64: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """-> float64 scores (B, k, n) and sum_i |x_i·r_i| (B, k, n), without gradient."""
    with torch.no_grad():
        rows = patch_rows(x64, p)
        return (torch.einsum("bnd,kd->bkn", rows, router64),
                torch.einsum("bnd,kd->bkn", rows.abs(), router64.abs()))


def round_through(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t rounded to dtype and widened back, with the identity as its gradient."""
    return t + (t.detach().to(dtype).to(t.dtype) - t.detach())


def reference_given_selection(x: Tensor, router: Tensor, weight: Tensor, bias: Optional[Tensor], p: int,
                              idx: Tensor, combine: str, gate: str, activation: str, dtype: torch.dtype
                              ) -> tuple[Tensor, Tensor]:
    """SPEC §1 in float64 with the choice given: x (B, C, H, W), router (k, d), weight (k, m, C, p, p),
    bias (k, m) or None, idx (B, k, l) the chosen patches.  The scores are rounded to `dtype`
    (straight through), as the kernels and the torch path round them; gates from those scores.
    Differentiable in x, router, weight and bias.
    -> y (B, k·m | m, H/p, W/p), gates (B, k, l)."""
    B, C, H, W = x.shape
    k, m = weight.shape[:2]
    l = idx.shape[-1]
    rows = patch_rows(x, p)  # (B, n, d)
    n, d = rows.shape[1:]
    scores = round_through(torch.einsum("bnd,kd->bkn", rows, router), dtype)
    chosen = scores.gather(2, idx)
    if gate == "softmax":
        gates = torch.softmax(chosen, dim=-1)
    elif gate == "indicator":
        gates = torch.ones_like(chosen)
    elif gate == "softmax_all":
        gates = torch.exp(chosen - torch.logsumexp(scores, dim=-1, keepdim=True))
    else:
        raise ValueError(f"unknown gate {gate!r}")
    picked = rows.gather(1, idx.reshape(B, k * l, 1).expand(B, k * l, d)).view(B, k, l, d)
    pre = torch.einsum("bkld,kmd->bklm", picked, weight.reshape(k, m, d))
    if bias is not None:
        pre = pre + bias[None, :, None, :]
    h = gates[..., None] * get_activation(activation)(pre)  # (B, k, l, m)
    per_expert = h.new_zeros(B, k, n, m).scatter_add(2, idx[..., None].expand(B, k, l, m), h)
    y = per_expert.permute(0, 2, 1, 3).reshape(B, n, k * m) if combine == "concat" else per_expert.sum(1)
    return y.transpose(1, 2).reshape(B, -1, H // p, W // p), gates


# ---------------------------------------------------------------------------------------------
# one check


def _make_layer(shape: LayerShape, dtype, device, backend: str, opts: dict, deterministic: bool):
    out = shape.out_channels if opts["combine"] == "concat" else shape.expert_features
    layer = pmoe.PMoEConv2d(shape.in_channels, out, shape.patch_size, shape.num_experts, shape.top_l,
                            backend=backend, deterministic=deterministic, **opts)
    randomize_router(layer)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_(0.0, 0.5)
    return layer.to(device=device, dtype=dtype)


def _run(layer, x: Tensor, pooled: bool):
    """-> y (map, or its sum over patches), routing."""
    return layer.forward_pooled(x, return_routing=True) if pooled else layer(x, return_routing=True)


def _grads(layer, x: Tensor) -> dict:
    grads = {"dx": x.grad}
    grads.update({"d" + name: p.grad for name, p in layer.named_parameters()})
    return grads


def _forward_backward(layer, x: Tensor, dy: Tensor, pooled: bool, poison_bytes: int):
    """One poisoned forward and backward from fresh grads -> y, routing, {name: grad}."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    poison_allocator(x.device, poison_bytes)
    y, routing = _run(layer, x, pooled)
    poison_allocator(x.device, poison_bytes)
    y.backward(dy)
    return y, routing, _grads(layer, x)


def _unselected_max_abs(y: Tensor, idx: Tensor, n: int, combine: str) -> float:
    """max |y| where no expert of the combine chose the patch (concat: per expert block)."""
    B, k, _ = idx.shape
    taken = torch.zeros(B, k, n, dtype=torch.bool, device=idx.device).scatter(2, idx, True)
    yd = y.detach().reshape(B, -1, n)
    if combine == "concat":
        yd = yd.view(B, k, -1, n)
        free = ~taken[:, :, None, :]
    else:
        free = ~taken.any(1)[:, None, :]
    return yd.masked_fill(~free.expand_as(yd), 0).abs().max().item()


def check_layer(shape: LayerShape, batch: int, dtype: torch.dtype, device: torch.device, backend: str,
                options: dict, seed: int) -> dict:
    """One configuration (options: the variant, over concat / softmax / no bias / ReLU / NCHW:
    combine, gate, bias, activation, deterministic, pooled, route, layout) -> a report row
    (see the module docstring); row["ok"] is the verdict."""
    opts = dict(options)
    route, layout = opts.pop("route", None), opts.pop("layout", "nchw")
    pooled, deterministic = opts.pop("pooled", False), opts.pop("deterministic", False)
    opts = {"combine": shape.combine, "gate": "softmax", "bias": False, "activation": "relu", **opts}
    torch.manual_seed(seed)
    layer = _make_layer(shape, dtype, device, backend, opts, deterministic)
    x = torch.randn(shape.input_shape(batch), device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    params64 = {name: p.detach().double().requires_grad_(True) for name, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_(True)
    n, l, p = shape.num_patches, shape.top_l, shape.patch_size
    poison_bytes = 2 * max(x.numel(), batch * layer.out_channels * n) * x.element_size()
    out_shape = (batch, layer.out_channels) if pooled else (batch, layer.out_channels, shape.height // p,
                                                            shape.width // p)
    dy = torch.randn(out_shape, device=device, dtype=dtype)

    with forced_route(route):
        y, routing, grads = _forward_backward(layer, x, dy, pooled, poison_bytes)
        y, grads = y.detach(), {k: (None if g is None else g.clone()) for k, g in grads.items()}
        y2, routing2, grads2 = _forward_backward(layer, x, dy, pooled, poison_bytes)

    row = {"finite": bool(torch.isfinite(y).all().item()),
           "grads_finite": all(bool(torch.isfinite(g).all().item()) for g in grads.values() if g is not None),
           "repeat_same_indices": bool(torch.equal(routing.indices, routing2.indices)),
           "repeat_max_diff": (y.double() - y2.detach().double()).abs().max().item()}
    row["bit_identical"] = (torch.equal(y, y2.detach()) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(grads.values(), grads2.values())))

    scores, abs_scores = scores_and_bounds(x64, params64["router"], p)
    rows = classify_rows(routing.indices, scores, abs_scores, dtype, shape.patch_dim)
    row.update({name + "_rows": int(mask.sum().item()) for name, mask in rows.items()})
    row["rows"] = batch * shape.num_experts

    y_ref, gates_ref = reference_given_selection(x64, params64["router"], params64["weight"], params64.get("bias"),
                                                 p, routing.indices, opts["combine"], opts["gate"],
                                                 opts["activation"], dtype)
    if pooled:
        y_ref = y_ref.sum((2, 3))
    else:
        row["unselected_max_abs"] = _unselected_max_abs(y, routing.indices, n, opts["combine"])
    row["y_err"] = normwise_err(y, y_ref)
    row["gates_err"] = normwise_err(routing.gates, gates_ref)
    y_ref.backward(dy.double())
    refs = {"dx": x64.grad, **{"d" + name: t.grad for name, t in params64.items()}}
    for name, g in grads.items():
        row[name + "_err"] = normwise_err(g, refs[name])
    return _verdict(row, dtype, deterministic)


def _verdict(row: dict, dtype: torch.dtype, deterministic: bool) -> dict:
    tol = TOLERANCE[dtype]
    errs = [v for key, v in row.items() if key.endswith("_err")]
    failed = [name for name, bad in (
        ("non-finite output", not row["finite"]), ("non-finite gradient", not row["grads_finite"]),
        ("unselected not zero", row.get("unselected_max_abs", 0.0) != 0.0),
        ("selection mismatch", row["mismatch_rows"] > 0),
        ("indices differ run to run", not row["repeat_same_indices"]),
        ("not bit-identical", deterministic and not row["bit_identical"]),
        ("error over tolerance", not all(e <= tol for e in errs))) if bad]
    row["tolerance"] = tol
    row["ok"] = not failed
    if failed:
        row["failed"] = ", ".join(failed)
    return row

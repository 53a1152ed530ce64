"""pMoE as functions on tensors, for people who manage their own parameters.

    y = pmoe_conv2d(x, router, weight, bias, patch_size=p, top_l=l)      # (B,C,H,W) -> (B,out,H/p,W/p)
    y = pmoe(x, router, weight, bias, top_l=l)                           # (B,n,d)   -> (B,n,out)
    s = pmoe_conv2d_pooled(x, router, weight, bias, patch_size=p, top_l=l)  # (B,C,H,W) -> (B,out)
    s = pmoe_pooled(x, router, weight, bias, top_l=l)                    # (B,n,d)   -> (B,out)

The pooled forms (the same as pooled=True) return the layer's output summed over all patches
(what a sum- or average-pooling head reads) without ever making the (B, out, H/p, W/p) map, nor
its gradient.

Every argument is checked here, before any kernel launch, and the options become one
pmoe.vocab.Options; the computation itself is an entry of the table BACKENDS: `torch_backend`
(vectorised PyTorch) or `pmoe.kernels` (fused Triton), one signature for both.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from . import vocab
from .routing import Routing, resolve_top_l
from .torch_backend import autocast_dtype, channels_last, patches_from_map_hwc, pmoe_patches_torch
from .vocab import Options

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """Whether the Triton kernels can be imported on this machine."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_tensors(x: torch.Tensor, router: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """Types, devices and dtypes.  Mixed float dtypes are allowed only under autocast, and then
    only among the autocast-eligible ones (float64 never mixes: autocast does not cast it)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be a real floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    params = {"router": router, "weight": weight}
    if bias is not None:
        params["bias"] = bias
    autocast = autocast_dtype(x.device.type) is not None
    for name, t in params.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"input is on {x.device} but {name} is on {t.device}; move them to one device")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a real floating tensor, got {t.dtype}")
        if t.dtype != x.dtype and not (autocast and torch.float64 not in (t.dtype, x.dtype)):
            raise TypeError(
                f"input dtype {x.dtype} does not match {name} dtype {t.dtype}; cast one of them "
                f"or run under torch.autocast (float16/bfloat16/float32 only)"
            )


def check_options(combine: str, gate: str, activation: str, backend: str) -> None:
    """ValueError for a name outside pmoe.vocab, or a backend outside "auto" and BACKENDS."""
    vocab.check("combine", combine)
    vocab.check("gate", gate)
    vocab.check("activation", activation)
    allowed = ("auto", *BACKENDS)
    if not isinstance(backend, str) or backend not in allowed:
        raise ValueError(f"unknown backend {backend!r}; expected one of {allowed}")


def _choose_backend(backend: str, x: torch.Tensor) -> str:
    """The BACKENDS key to run; raises for an explicit backend that cannot run x.  An empty batch
    runs on the torch path (nothing to launch)."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        usable = x.is_cuda and x.dtype in _KERNEL_DTYPES and triton_available()
        return "triton" if usable and x.shape[0] else "torch"
    # explicit triton
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
    if not (x.is_cuda or (_interpreting() and x.device.type == "cpu")):
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (got one on {x.device}); on a CPU set "
            f"TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's interpreter"
        )
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"backend='triton' supports float32, bfloat16 and float16, got {x.dtype}")
    return "triton" if x.shape[0] else "torch"


def _check_shapes(d: int, router: torch.Tensor, weight2d_shape: tuple, bias: Optional[torch.Tensor]) -> tuple[int, int]:
    if router.dim() != 2 or router.shape[1] != d:
        raise ValueError(f"router must have shape (num_experts, {d}), got {tuple(router.shape)}")
    k = router.shape[0]
    if k < 1:
        raise ValueError("need at least one expert")
    if weight2d_shape[0] != k:
        raise ValueError(f"weight has {weight2d_shape[0]} experts but router has {k}")
    m = weight2d_shape[1]
    if m < 1:
        raise ValueError(f"weight has {m} output channels per expert; need at least 1")
    if bias is not None and tuple(bias.shape) != (k, m):
        raise ValueError(f"bias must have shape ({k}, {m}), got {tuple(bias.shape)}")
    return k, m


def _torch(x: torch.Tensor, router: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           o: Options) -> tuple[torch.Tensor, Routing]:
    """The PyTorch path on the patch rows, each patch's features in (p, p, C) order (the
    parameters follow inside the path): the same dot products, but the patch copy moves C-long
    runs of the NHWC view, several times faster on CPU than the unfold order's p-long runs.  The
    output follows x's memory format (channels-last or not)."""
    return pmoe_patches_torch(patches_from_map_hwc(x, o.p), router, weight, bias, o, cp=(x.shape[1], o.p),
                              map_out=not channels_last(x))


def _triton(x: torch.Tensor, router: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            o: Options) -> tuple[torch.Tensor, Routing]:
    """The fused kernels (importing them imports triton): the custom op, its plain arguments
    unpacked from o, and whether to keep the pre-activations for a backward (only where autograd
    will record the call; kernels.configs.SAVE_PRE).  Autocast does not reach inside the kernels: cast here, so that they always
    see one floating dtype (.to() is differentiable: gradients still reach fp32 parameters)."""
    from pmoe.kernels import configs, fused_fwd

    ac = autocast_dtype(x.device.type)
    if ac is not None:
        x, router, weight = x.to(ac), router.to(ac), weight.to(ac)
        bias = bias.to(ac) if bias is not None else None
    save_pre = configs.SAVE_PRE and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, router, weight, bias))
    y, idx, gates, *_ = fused_fwd(x, router, weight, bias, *o.op_args(), save_pre)
    return y, Routing(idx, gates.detach(), (x.shape[2] // o.p) * (x.shape[3] // o.p))


# Every backend: (x (B, C, H, W) map, router (k, d), weight (k, m, d), bias (k, m) or None, Options)
# -> (y (B, n, out), or with o.pooled its sum over the n patches (B, out); Routing).
BACKENDS = {"torch": _torch, "triton": _triton}


def _check_conv2d(x, router, weight, bias, patch_size, combine, gate, activation, backend):
    """pmoe_conv2d's checks, top_l's aside.  -> (n, weight as (k, m, d))."""
    check_options(combine, gate, activation, backend)
    _check_tensors(x, router, weight, bias)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 5 or weight.shape[3] != patch_size or weight.shape[4] != patch_size:
        raise ValueError(f"weight must have shape (k, m, C, {patch_size}, {patch_size}), got {tuple(weight.shape)}")
    B, C, H, W = x.shape
    p = patch_size
    if C != weight.shape[2]:
        raise ValueError(f"input has {C} channels but the layer expects {weight.shape[2]}")
    if H % p or W % p:
        raise ValueError(f"H={H} and W={W} must be divisible by patch_size={p}")
    if H == 0 or W == 0:
        raise ValueError(f"input has an empty spatial size {H}x{W}")
    n, d = (H // p) * (W // p), C * p * p
    k, m = _check_shapes(d, router, weight.shape[:2], bias)
    return n, weight.reshape(k, m, d)


def _check_tokens(x, router, weight, bias, combine, gate, activation, backend) -> int:
    """pmoe's checks, top_l's aside.  -> n."""
    check_options(combine, gate, activation, backend)
    _check_tensors(x, router, weight, bias)
    if x.dim() != 3:
        raise ValueError(f"input must be 3-D (B, n, d), got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"weight must have shape (k, m, d), got {tuple(weight.shape)}")
    B, n, d = x.shape
    if d != weight.shape[2]:
        raise ValueError(f"input has {d} features but the layer expects {weight.shape[2]}")
    if n == 0:
        raise ValueError("input has no patches (n = 0)")
    _check_shapes(d, router, weight.shape[:2], bias)
    return n


def _options(p, top_l, n, combine, gate, activation, deterministic, pooled) -> Options:
    """The call's Options: top_l resolved against n, torch's global deterministic flag honoured."""
    deterministic = bool(deterministic) or torch.are_deterministic_algorithms_enabled()
    return Options(p, resolve_top_l(top_l, n), combine, gate, activation, deterministic, pooled)


def pmoe_conv2d(
    x: torch.Tensor,
    router: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    patch_size: int,
    top_l: Union[int, float],
    combine: str = "concat",
    gate: str = "softmax",
    activation: str = "relu",
    backend: str = "auto",
    deterministic: bool = False,
    return_routing: bool = False,
    pooled: bool = False,
):
    """Patch-level routed MoE on a feature map (SPEC §1).

    x: (B, C, H, W); router: (k, C*p*p) in unfold order; weight: (k, m, C, p, p); bias: (k, m).
    Returns y: (B, k*m, H/p, W/p) for "concat", (B, m, H/p, W/p) for "sum", and, with
    return_routing, the Routing (indices (B, k, l) int64, gates (B, k, l)).  pooled: see
    pmoe_conv2d_pooled.  Memory format: the PyTorch path's y is x's (NCHW unless x is
    channels-last, as from nn.Conv2d); the fused kernels' is a channels-last view (they write
    each patch's channels contiguously).
    """
    n, weight2d = _check_conv2d(x, router, weight, bias, patch_size, combine, gate, activation, backend)
    o = _options(patch_size, top_l, n, combine, gate, activation, deterministic, pooled)
    y, routing = BACKENDS[_choose_backend(backend, x)](x, router, weight2d, bias, o)
    if not pooled:
        B, _, H, W = x.shape
        y = y.view(B, H // o.p, W // o.p, y.shape[-1]).permute(0, 3, 1, 2)
    return (y, routing) if return_routing else y


def pmoe_conv2d_pooled(x: torch.Tensor, router: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, **options):
    """pmoe_conv2d summed over all patches: ``pmoe_conv2d(x, ...).sum((2, 3))``, (B, out), without
    making the (B, out, H/p, W/p) map (forward) or its gradient (backward).

    The paper's classifier (SPEC §2) is this divided by l, then a linear head.  Same arguments
    and checks as pmoe_conv2d (it is pmoe_conv2d(..., pooled=True)); returns (B, k*m) for
    "concat", (B, m) for "sum", and, with return_routing, the Routing.  Equal to the unpooled
    layer's sum up to float rounding (the sum runs over the chosen patches in rank order instead
    of over the map).
    """
    return pmoe_conv2d(x, router, weight, bias, pooled=True, **options)


def pmoe(
    x: torch.Tensor,
    router: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    top_l: Union[int, float],
    combine: str = "concat",
    gate: str = "softmax",
    activation: str = "relu",
    backend: str = "auto",
    deterministic: bool = False,
    return_routing: bool = False,
    pooled: bool = False,
):
    """Patch-level routed MoE on a patch/token tensor (SPEC §1, the (B, n, d) form).

    x: (B, n, d); router: (k, d); weight: (k, m, d); bias: (k, m).
    Returns y: (B, n, k*m) for "concat", (B, n, m) for "sum", and optionally the Routing.
    A token is run as a 1x1 patch of the (B, d, 1, n) map x.transpose(1, 2).unsqueeze(2): no
    copy, just strides.  pooled: see pmoe_pooled.
    """
    n = _check_tokens(x, router, weight, bias, combine, gate, activation, backend)
    o = _options(1, top_l, n, combine, gate, activation, deterministic, pooled)
    x_map = x.transpose(1, 2).unsqueeze(2)
    y, routing = BACKENDS[_choose_backend(backend, x)](x_map, router, weight, bias, o)
    return (y, routing) if return_routing else y


def pmoe_pooled(x: torch.Tensor, router: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None, **options):
    """pmoe summed over the n tokens: ``pmoe(x, ...).sum(1)``, (B, out), without the (B, n, out)
    output (it is pmoe(..., pooled=True)).  x: (B, n, d); returns (B, k*m) for "concat", (B, m)
    for "sum" [, Routing]."""
    return pmoe(x, router, weight, bias, pooled=True, **options)

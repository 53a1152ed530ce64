"""Every kernel launch the layer makes, for bench/compile_report.py: compiled to cubin without a GPU.

Nothing here lists kernels, configs or constexprs by hand.  The launchers (launch.py) are run on
meta tensors (no memory, no data) for a set of problems that covers every branch of the kernels'
constexpr code (gates, combines, activations, bias, pooled, deterministic, NCHW and channels-last,
the split route, l beyond a tile, m beyond a pass) at the benchmark shapes, with launch.RECORDER
catching each launch instead of running it.  So the report compiles exactly what the launchers
launch, with the configs configs.py picks for the arch, and nothing else.

Each recorded launch becomes (kernel, signature, constexprs, attributes, warps, stages) as the
launcher would specialise it: a tensor is a pointer of its dtype, 16-byte aligned (torch's
allocations); an int equal to 1 becomes a constexpr and one divisible by 16 gets the divisibility
hint (Triton's "1" and "D" specialisations).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from . import launch

_PTR_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
              torch.int32: "i32"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Problem:
    """One layer call: sizes, options, input layout."""
    label: str
    B: int
    C: int
    H: int
    W: int
    p: int
    k: int
    m: int
    l: int
    combine: str = "concat"
    gate: str = "softmax"
    activation: str = "relu"
    bias: bool = False
    pooled: bool = False
    deterministic: bool = False
    channels_last: bool = False
    route: str = "auto"


# The benchmark shapes (bench/shapes.py, at their GPU batches), then every other branch.
PROBLEMS = [
    Problem("wrn-pmoe", 256, 640, 8, 8, 1, 4, 160, 16),
    Problem("wrn-pmoe,cl", 256, 640, 8, 8, 1, 4, 160, 16, channels_last=True),
    Problem("large", 64, 256, 32, 32, 2, 8, 128, 32),
    Problem("large,cl", 64, 256, 32, 32, 2, 8, 128, 32, channels_last=True),
    Problem("mnist-k2-l2", 1024, 1, 112, 112, 28, 2, 20, 2),
    Problem("mnist-k8-l6", 1024, 1, 112, 112, 28, 8, 5, 6, gate="softmax_all"),
    Problem("sum,gelu,bias,det", 32, 64, 16, 16, 2, 4, 64, 8, combine="sum", activation="gelu", bias=True,
            deterministic=True),
    Problem("sum,silu,softmax_all", 32, 64, 16, 16, 2, 4, 96, 8, combine="sum", activation="silu",
            gate="softmax_all"),
    Problem("pooled,indicator,bias", 64, 640, 8, 8, 1, 4, 160, 16, gate="indicator", bias=True, pooled=True),
    Problem("pooled,sum,det,identity", 64, 128, 8, 8, 1, 4, 128, 16, combine="sum", activation="identity",
            pooled=True, deterministic=True),
    Problem("l>tile,softmax", 4, 32, 32, 32, 2, 2, 32, 200),
    Problem("m>pass,sum", 8, 64, 8, 8, 1, 2, 300, 16, combine="sum"),
    Problem("split route", 8, 32, 64, 64, 1, 4, 32, 512, route="split"),
]


@dataclass
class Launch:
    """One kernel launch as the compiler sees it."""
    name: str
    problem: str
    fn: object                      # the JITFunction
    signature: dict                 # {arg: "*bf16" | "i32" | "constexpr"}
    constexprs: dict                # {arg: value}
    attrs: dict = field(default_factory=dict)  # {(index,): [["tt.divisibility", 16]]}
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int | None = None

    @property
    def options(self) -> dict:
        """triton.compile options, as the launch passes them."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts

    @property
    def key(self):
        return (self.name, tuple(sorted(self.signature.items())), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.attrs)), self.num_warps, self.num_stages, self.maxnreg)


def _jit_fn(kernel):
    """The JITFunction (or, under the interpreter, the InterpretedFunction) of a kernel."""
    while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _params(fn) -> list[tuple[str, bool]]:
    """[(name, is_constexpr)] of a kernel's parameters."""
    if hasattr(fn, "params"):
        return [(p.name, p.is_constexpr) for p in fn.params]
    py = fn
    while hasattr(py, "fn"):
        py = py.fn
    return [(name, "constexpr" in str(p.annotation)) for name, p in inspect.signature(py).parameters.items()]


def tensor_args(kernel, args) -> tuple[str, dict]:
    """A recorded launch's kernel name and {parameter name: tensor} of its positional arguments."""
    fn = _jit_fn(kernel)
    names = [name for name, is_constexpr in _params(fn) if not is_constexpr]
    return (getattr(fn, "__name__", None) or fn.fn.__name__,
            {name: value for name, value in zip(names, args) if isinstance(value, torch.Tensor)})


def _specialise(fn, args, kwargs, problem: str) -> Launch:
    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    num_stages = kwargs.pop("num_stages", 2)
    maxnreg = kwargs.pop("maxnreg", None)
    signature, constexprs, attrs = {}, {}, {}
    positional = iter(args)
    for i, (name, is_constexpr) in enumerate(_params(fn)):
        if is_constexpr:
            signature[name] = "constexpr"
            value = kwargs[name]
            constexprs[name] = getattr(value, "value", value)  # modes.py's named codes are tl.constexpr
            continue
        value = next(positional)
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _PTR_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{fn.__name__}: unexpected argument {name}={value!r}")
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    name = getattr(fn, "__name__", None) or fn.fn.__name__
    return Launch(name.strip("_").removesuffix("_kernel"), problem, fn, signature, constexprs, attrs,
                  num_warps, num_stages, maxnreg)


def record(problem: Problem, dtype: torch.dtype, sm: int = 90, save_pre: bool = True) -> tuple[list, list]:
    """The launches of `problem`'s forward and of its backward, as (kernel, grid, args, kwargs),
    made by the launchers on meta tensors for a GPU of capability sm (nothing runs).  save_pre:
    the forward keeps the pre-activations, as for training (the layer's call under autograd);
    without, the forward is inference's and the backward recomputes them."""
    P = problem
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(P.B, P.C, P.H, P.W, **meta)
    if P.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    d = P.C * P.p * P.p
    router, weight = torch.empty(P.k, d, **meta), torch.empty(P.k, P.m, d, **meta)
    bias = torch.empty(P.k, P.m, **meta) if P.bias else None
    forward, backward = [], []
    saved = (launch.RECORDER, launch.FORCE_SM, launch.ROUTE)
    launch.FORCE_SM, launch.ROUTE = sm, P.route
    try:
        launch.RECORDER = lambda *call: forward.append(call)
        y, idx, _, gates, inv, scores, lse, pre = launch.forward(x, router, weight, bias, P.p, P.l, P.combine,
                                                                 P.gate, P.activation, P.deterministic, P.pooled,
                                                                 save_pre)
        n = (P.H // P.p) * (P.W // P.p)
        dy = torch.empty(y.shape, **meta)
        if P.pooled:
            dy = dy.unsqueeze(1).expand(P.B, n, y.shape[1])
        launch.RECORDER = lambda *call: backward.append(call)
        launch.backward(dy, x, router, weight, bias, idx, gates, inv, scores, lse, pre, P.p, P.l, P.combine,
                        P.gate, P.activation)
    finally:
        launch.RECORDER, launch.FORCE_SM, launch.ROUTE = saved
    return forward, backward


def launches(dtype: str = "bf16", sm: int = 90, problems=PROBLEMS) -> list[Launch]:
    """The distinct launches of every problem for this dtype on this arch, in first-seen order:
    training's (pre-activations saved) and inference's forward, and the backward reading them or
    recomputing them."""
    seen, found = set(), []
    for problem in problems:
        calls = [call for save_pre in (True, False) for call in sum(record(problem, DTYPES[dtype], sm, save_pre), [])]
        for kernel, grid, args, kwargs in calls:
            rec = _specialise(_jit_fn(kernel), args, kwargs, problem.label)
            if rec.key not in seen:
                seen.add(rec.key)
                found.append(rec)
    return found


"""Traffic model of the fused pMoE op, counted without a GPU: every memory access and tl.dot of
every kernel the op launches, traced in Triton's interpreter, turned into a MODELED time on an
H100 and an H200 (bench/traffic_model.py).  A model, not a measured time.

    python bench/traffic.py                                   # both shapes, NCHW, fwd and fwd+bwd, bf16
    python bench/traffic.py --shape wrn-pmoe --layout all --pass fwd --out bench/results

It runs the layer the way bench/gpu_check.py times it (pmoe.PMoEConv2d, backend="triton",
concat / softmax / relu, no bias, the router randomised so choices are well separated) through
the public module and autograd, so whatever launch sequence the op has today is what is traced:
nothing here names a kernel.  Each traced launch gives, per kernel argument tensor:

  requested   bytes the active lanes ask for (lanes x element size), loads / stores / atomics;
  L2<->SM     32-byte sectors per access instruction: for each tl.load / tl.store / atomic call
              of each program, the unique sectors of its active lanes, summed over calls.  This is
              the traffic between L2 and the SMs with L1 out of the way (cp.async.cg, TMA,
              ld.global.cg, and every store): the model's L2 term;
  prog-unique unique sectors per program, summed over programs: what a perfect per-CTA cache
              (L1 / shared memory reuse) would fetch.  Reported, not used by the model;
  DRAM        unique sectors over the whole launch: HBM traffic with a perfect L2 that starts cold
              for every launch.  Writes: every sector stored or atomically updated, once (the
              write-back).  Reads: every sector loaded or atomically updated whose first touch in
              the launch is not a write by an earlier program (data a launch writes and reads
              back, e.g. a row copy, comes back from L2);
  dot FLOPs   2·M·N·K per tl.dot, the full tile (padding included), by operand class.

Every other kernel the layer runs (torch ops: zero fills, dtype casts, copies; inside the custom
op and around it, backward and AccumulateGrad included) is traced by a TorchDispatchMode and
counted as streaming traffic: each input read once, each output written once, L2 = DRAM = those
bytes, sector efficiency 1.  Views and allocations cost nothing.

Counts are taken at two interpreter batches (B and 2B) and fitted per launch and tensor as
a + b·B, then evaluated at the shape's gpu_batch: activation traffic is per image (a = 0) while
the weights' DRAM reads and dW's writes are per launch (b = 0).  Both runs must launch the same
sequence.  Tensors get roles by storage: x, y, dy, dx (x.grad), the parameters and their grads,
through any copy the layer makes of them (a dtype cast of an fp32 dX buffer into x.grad makes
that buffer "dx"); everything else is scratch.

Assumptions (also printed in the report):
  - masked-off lanes issue no memory request (the GPU predicates them off): not counted;
  - per-instruction sectors: a tl.load of a tile is one access instruction here; on the GPU it
    is split into warp instructions, and a sector shared by two warps' instructions is fetched
    twice, so for gathers whose runs are shorter than a sector this is a lower bound.  The
    split depends on the layout the compiler picks (TTGIR); --split cols / rows counts every
    tile column / row separately (warps along one column: threadsPerWarp [32, 1], as today's
    dpre/dW/dX gathers compile) to bracket it;
  - sectors of one instruction are not shared across programs (no L1 reuse between programs,
    nor within a program across instructions: see prog-unique);
  - DRAM: a perfect L2 within a launch, cold between launches (the L2 is 50 MB; a launch whose
    unique bytes exceed that would spill), partial-sector writes cost a whole sector; a tensor
    moves at most its own size each way (its size at the GPU batch, from a meta-device dry run
    of the launchers: a ring, e.g. the forward's row copy, is a fixed size however large B is);
  - only tensor-core work (tl.dot) is timed; CUDA-core arithmetic (the routing sort, softmax,
    activations) and latency are not; occupancy enters only through the grid-fill factor.
Each kernel runs the config the GPU would run (kernels/configs.py: a fixed per-arch table, no
autotuning); the config column shows what ran.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere
_BENCH = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import traffic_model as tm  # noqa: E402

SECTOR = tm.SECTOR_BYTES
_SHIFT = 5  # log2(SECTOR)
assert 1 << _SHIFT == SECTOR

# per-tensor counters of one launch (rows: tensors, then one row for unmapped addresses)
STATS = ("ld_req", "st_req", "at_req", "ld_sec", "st_sec", "at_sec", "ld_psec", "st_psec", "at_psec",
         "rd_dram", "wr_dram")
_S = {name: i for i, name in enumerate(STATS)}
KINDS = ("ld", "st", "at")
SPLITS = ("tile", "cols", "rows")
ACTIVATION_ROLES = ("x", "y", "dy", "dx")


# =============================================================================================
# The interpreter hook points: the one place that knows Triton's interpreter.
#
# Stable across Triton 3.6 and 3.8 (and, as far as its interpreter keeps these names, 3.9):
#   triton.runtime.interpreter.InterpreterBuilder
#       create_masked_load(ptrs, mask, ...)   every tl.load (create_load, block pointers and
#       create_masked_store(ptrs, value, mask, ...)   tensor descriptors all end here), every store
#       create_atomic_rmw(op, ptr, val, mask, ...), create_atomic_cas(ptr, cmp, val, ...)
#       create_dot(a, b, d, input_precision, ...)
#       set_grid_idx(x, y, z)                 called once per program, before it runs
#   triton.runtime.interpreter.GridExecutor.__call__(*args, **kwargs)   one launch
#       (self.fn: the kernel's function, self.arg_names: its parameter names)
# Arguments are found by parameter name (inspect.signature of the method as installed), not by
# position, so a version that reorders or adds parameters still works; a missing method or
# parameter raises here, at install time, naming it.


def _interpreter():
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("bench/traffic.py needs TRITON_INTERPRET=1 set before triton is imported")
    from triton.runtime import interpreter
    return interpreter


_ACCESS_METHODS = {  # method -> (kind, pointer parameter, mask parameter or None)
    "create_masked_load": ("ld", ("ptrs", "ptr"), ("mask",)),
    "create_masked_store": ("st", ("ptrs", "ptr"), ("mask",)),
    "create_atomic_rmw": ("at", ("ptr", "ptrs"), ("mask",)),
    "create_atomic_cas": ("at", ("ptr", "ptrs"), None),
}


_POSITIONS: dict = {}  # (method, names) -> (index, name), from the first signature that has them


def _param_index(fn, names, method):
    """Where parameter `names[0]` (or an alias) sits in method's signature.  Read once from the
    interpreter's own signature; a patch installed on top with (*args, **kwargs) reuses it."""
    import inspect

    params = list(inspect.signature(fn).parameters)
    for name in names:
        if name in params:
            return _POSITIONS.setdefault((method, names), (params.index(name), name))
    if (method, names) in _POSITIONS:
        return _POSITIONS[(method, names)]
    raise RuntimeError(f"traffic: {method} has no parameter among {names} (parameters: {params}); "
                       f"this Triton's interpreter changed: update bench/traffic.py's hook table")


class _Guard(threading.local):
    depth = 0  # >0 inside one of our wrappers: a wrapped wrapper must not count twice


_GUARD = _Guard()
_ACTIVE: list = []  # the tracer that records (at most one)


def _wrap(method, orig, on_call):
    """orig wrapped: on_call(self, args, kwargs) runs first, at the outermost of our wrappers only."""
    def wrapper(self, *args, **kwargs):
        if _ACTIVE and _GUARD.depth == 0:
            on_call(self, args, kwargs)
        _GUARD.depth += 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            _GUARD.depth -= 1
    wrapper.__name__ = method
    wrapper._traffic_hook = orig
    return wrapper


def _ours(fn) -> bool:
    return getattr(fn, "_traffic_hook", None) is not None


def _arg(args, kwargs, pos_name):
    pos, name = pos_name
    if name in kwargs:
        return kwargs[name]
    pos -= 1  # the signature counts self
    return args[pos] if pos < len(args) else None


def install_hooks():
    """Install the recording wrappers, outermost.  Idempotent; a patch applied to the same methods
    after ours (kernels/utils.py widens bf16 dot operands when it is imported) gets wrapped again,
    and the depth guard keeps the inner copy of ours from counting twice."""
    interp = _interpreter()
    builder = interp.InterpreterBuilder
    for method, (kind, ptr_names, mask_names) in _ACCESS_METHODS.items():
        orig = getattr(builder, method, None)
        if orig is None:
            raise RuntimeError(f"traffic: InterpreterBuilder.{method} is missing in this Triton")
        if _ours(orig):
            continue
        ptr_at = _param_index(orig, ptr_names, method)
        mask_at = _param_index(orig, mask_names, method) if mask_names else None

        def on_access(self, args, kwargs, kind=kind, ptr_at=ptr_at, mask_at=mask_at):
            ptrs = _arg(args, kwargs, ptr_at)
            mask = _arg(args, kwargs, mask_at) if mask_at else None
            _ACTIVE[0]._access(kind, ptrs, mask)
        setattr(builder, method, _wrap(method, orig, on_access))

    orig = builder.create_dot
    if not _ours(orig):
        a_at, b_at = _param_index(orig, ("a", "lhs"), "create_dot"), _param_index(orig, ("b", "rhs"), "create_dot")
        p_at = _param_index(orig, ("input_precision",), "create_dot")

        def on_dot(self, args, kwargs):
            _ACTIVE[0]._dot(_arg(args, kwargs, a_at), _arg(args, kwargs, b_at), _arg(args, kwargs, p_at))
        builder.create_dot = _wrap("create_dot", orig, on_dot)

    orig = builder.set_grid_idx
    if not _ours(orig):
        builder.set_grid_idx = _wrap("set_grid_idx", orig, lambda self, args, kwargs: _ACTIVE[0]._program())

    executor = interp.GridExecutor
    orig = executor.__call__
    if not _ours(orig):
        def call(self, *args, **kwargs):
            tracer = _ACTIVE[0] if _ACTIVE else None
            if tracer is None or tracer.paused or tracer._cur is not None:  # (a wrapped copy of ours)
                return orig(self, *args, **kwargs)
            tracer._begin_launch(getattr(self.fn, "__name__", "kernel"), list(self.arg_names), args, kwargs)
            try:
                return orig(self, *args, **kwargs)
            finally:
                tracer._end_launch()
        call._traffic_hook = orig
        executor.__call__ = call


def _dtype_name(tl_dtype) -> str:
    return str(tl_dtype)


def _elt_bytes(ptr_handle) -> int:
    ty = ptr_handle.get_element_ty()
    return max(1, ty.primitive_bitwidth // 8)


# =============================================================================================
# records


@dataclass
class TensorInfo:
    label: str  # kernel argument name(s) sharing this storage, or in/out for a torch op
    key: int  # storage data_ptr (storages are kept alive while tracing: unique)
    nbytes: int
    dtype: str
    shape: tuple
    role: str = "scratch"


@dataclass
class Launch:
    name: str
    kind: str  # "triton" | "torch"
    phase: str
    meta: dict
    tensors: list  # TensorInfo; stats has one more row: unmapped addresses
    stats: np.ndarray
    flops: dict = field(default_factory=dict)  # dot class -> FLOPs
    programs: Optional[float] = None

    def row(self, name: str) -> np.ndarray:
        return self.stats[:, _S[name]]


def _first_touch(parts):
    """(sorted unique sectors, the first program that touched each) of [(program, sectors)]."""
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sectors = np.concatenate([u for _, u in parts])
    progs = np.concatenate([np.full(u.shape, prog, np.int64) for prog, u in parts])
    order = np.lexsort((progs, sectors))  # by sector, then program
    sectors, progs = sectors[order], progs[order]
    first = np.ones(sectors.shape, bool)
    first[1:] = sectors[1:] != sectors[:-1]
    return sectors[first], progs[first]


class _TensorMap:
    """address -> tensor row, over a launch's argument storages (distinct, so non-overlapping);
    rows in argument order, unmapped addresses -> the last row."""

    def __init__(self, ranges):
        order = np.argsort(np.array([r[0] for r in ranges], dtype=np.int64), kind="stable")
        self.order = order.astype(np.int64)
        self.starts = np.array([ranges[i][0] for i in order], dtype=np.int64)
        self.ends = np.array([ranges[i][1] for i in order], dtype=np.int64)
        self.unmapped = len(ranges)

    def __call__(self, addr: np.ndarray) -> np.ndarray:
        if not self.unmapped:
            return np.zeros(addr.shape, np.int64)
        pos = np.searchsorted(self.starts, addr, side="right") - 1
        safe = np.clip(pos, 0, self.unmapped - 1)
        ok = (pos >= 0) & (addr < self.ends[safe])
        return np.where(ok, self.order[safe], self.unmapped)


def _storage(t: torch.Tensor):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _flat_tensors(name, value):
    """(name, tensor) pairs of a kernel argument: tensors, TensorWrapper / descriptors (.base),
    tuples of them."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _flat_tensors(f"{name}[{i}]", v)
    elif hasattr(value, "base") and isinstance(getattr(value, "base"), torch.Tensor):
        yield name, value.base


class Tracer:
    """Records every Triton launch (through the interpreter hooks) and every torch op (through a
    dispatch mode) run inside `with tracer:`.  One active at a time."""

    def __init__(self, torch_ops: bool = True, split: str = "tile"):
        """split: how one access instruction's lanes fetch sectors.  "tile" (the model): the unique
        sectors of the whole tl.load/tl.store, as if no sector were split between warps; "cols" /
        "rows": every column / row of a 2-D tile fetches its sectors separately, as with a layout
        whose warp instructions each cover one column (threadsPerWarp [32, 1]) / one row."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.launches: list[Launch] = []
        self.links: list[tuple[int, int]] = []  # storages one op copied into another
        self.phase = "forward"
        self.paused = False
        self._torch_ops = torch_ops
        # storages seen, alive until the tracer goes so that storage keys stay unique.  Storages, not
        # tensors: an extra reference to a gradient tensor would stop AccumulateGrad from stealing
        # it (it would copy it, a launch the layer does not make on its own)
        self._keep: list = []
        self._cur = None
        self._mode = None

    # -- context
    def __enter__(self):
        install_hooks()
        if _ACTIVE:
            raise RuntimeError("a traffic Tracer is already active")
        _ACTIVE.append(self)
        if self._torch_ops:
            self._mode = _TorchOps(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
        finally:
            _ACTIVE.clear()
            self._mode = None
        return False

    @contextlib.contextmanager
    def pause(self):
        self.paused, old = True, self.paused
        try:
            yield
        finally:
            self.paused = old

    # -- a Triton launch
    def _begin_launch(self, name, arg_names, args, kwargs):
        named = list(zip(arg_names, args)) + list(kwargs.items())
        by_key: dict = {}
        for arg_name, value in named:
            for label, t in _flat_tensors(arg_name, value):
                key, nbytes = _storage(t)
                self._keep.append(t.untyped_storage())
                if key in by_key:
                    if label not in by_key[key].label.split("|"):
                        by_key[key].label += "|" + label
                else:
                    by_key[key] = TensorInfo(label, key, nbytes, str(t.dtype).replace("torch.", ""), tuple(t.shape))
        tensors = list(by_key.values())  # argument order: the same in every run
        meta = {k: v for k, v in kwargs.items()
                if isinstance(v, (int, bool)) and not isinstance(v, torch.Tensor)
                and (k.startswith("BLOCK") or k in ("num_warps", "num_stages") or k.endswith("_POW2"))}
        launch = Launch(name, "triton", self.phase, meta, tensors, np.zeros((len(tensors) + 1, len(STATS)), np.int64),
                        programs=0)
        self._cur = {"launch": launch, "map": _TensorMap([(t.key, t.key + t.nbytes) for t in tensors]),
                     "prog": {k: [] for k in KINDS}, "all": {k: [] for k in KINDS}}

    def _program(self):
        cur = self._cur
        if cur is None:
            return
        self._flush_program()
        cur["launch"].programs += 1

    def _flush_program(self):
        cur = self._cur
        launch, tmap = cur["launch"], cur["map"]
        for kind in KINDS:
            pending = cur["prog"][kind]
            if not pending:
                continue
            u = np.unique(np.concatenate(pending))
            pending.clear()
            launch.stats[:, _S[kind + "_psec"]] += np.bincount(tmap(u << _SHIFT), minlength=tmap.unmapped + 1)
            cur["all"][kind].append((launch.programs, u))

    def _end_launch(self):
        cur = self._cur
        if cur is None:
            return
        self._flush_program()
        launch, tmap = cur["launch"], cur["map"]
        reads, first_read = _first_touch([a for k in ("ld", "at") for a in cur["all"][k]])
        writes, first_write = _first_touch([a for k in ("st", "at") for a in cur["all"][k]])
        # a perfect L2: a sector's DRAM read happens only if it is read before any program of
        # the launch wrote it (data written in the launch is read back from L2); every written
        # sector is written back once
        if reads.size:
            pos = np.searchsorted(writes, reads)
            pos_c = np.minimum(pos, max(writes.size - 1, 0))
            written_before = (writes.size > 0) & (writes[pos_c] == reads) & (first_write[pos_c] < first_read)
            u = reads[~written_before]
            launch.stats[:, _S["rd_dram"]] += np.bincount(tmap(u << _SHIFT), minlength=tmap.unmapped + 1)
        if writes.size:
            launch.stats[:, _S["wr_dram"]] += np.bincount(tmap(writes << _SHIFT), minlength=tmap.unmapped + 1)
        self.launches.append(launch)
        self._cur = None

    # -- memory instructions and dots (from the interpreter hooks)
    def _access(self, kind, ptrs, mask):
        cur = self._cur
        if cur is None or ptrs is None:
            return
        addr = np.asarray(ptrs.data).astype(np.int64)
        live = None if mask is None else np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        # the instruction's lanes as (group, address): one group per access instruction ("tile"),
        # or one per tile column / row (split="cols" / "rows": a layout whose warps each take one)
        if self.split == "tile" or addr.ndim < 2:
            group = np.zeros(addr.shape, np.int64)
        else:
            rows, cols = np.indices(addr.shape[-2:])
            group = np.broadcast_to(cols if self.split == "cols" else rows, addr.shape).astype(np.int64)
        if live is not None:
            addr, group = addr[live], group[live]
        addr, group = addr.reshape(-1), group.reshape(-1)
        if addr.size == 0:
            return
        esz = _elt_bytes(ptrs)
        first = addr >> _SHIFT
        last = (addr + (esz - 1)) >> _SHIFT
        if esz > 1 and not np.array_equal(first, last):  # an element across a sector boundary (unaligned)
            first, group = np.concatenate([first, last]), np.concatenate([group, group])
        ngroups = int(group.max()) + 1
        pairs = np.unique(first * ngroups + group)  # unique sectors per group
        u = np.unique(first) if ngroups > 1 else pairs
        tmap, stats = cur["map"], cur["launch"].stats
        n = tmap.unmapped + 1
        stats[:, _S[kind + "_req"]] += np.bincount(tmap(addr), minlength=n) * esz
        stats[:, _S[kind + "_sec"]] += np.bincount(tmap((pairs // ngroups) << _SHIFT), minlength=n)
        cur["prog"][kind].append(u)

    def _dot(self, a, b, precision):
        cur = self._cur
        if cur is None:
            return
        ashape, bshape = np.shape(a.data), np.shape(b.data)
        flops = 2 * int(np.prod(ashape[:-1])) * int(ashape[-1]) * int(bshape[-1])
        cls = tm.dot_class(_dtype_name(a.get_element_ty()), str(precision).split(".")[-1])
        flops_by = cur["launch"].flops
        flops_by[cls] = flops_by.get(cls, 0) + flops

    # -- torch ops (from _TorchOps)
    def _torch_op(self, func, args, kwargs, out):
        op = func._schema.name.split("::")[-1]
        if op in _NO_TRAFFIC:
            return
        inputs = [t for t in _tensors((args, kwargs))]
        outputs = [t for t in _tensors(out)]
        self._keep.extend(t.untyped_storage() for t in inputs + outputs)
        mutated = _mutated_args(func, args, kwargs)
        mutated_keys = {_storage(t)[0] for t in mutated}
        in_keys = {_storage(t)[0] for t in inputs}
        fresh = [t for t in outputs if _storage(t)[0] not in in_keys]
        writes = mutated + fresh
        if op in _WRITE_ONLY:
            reads = []
        elif op in _COPY_INTO:
            reads = [t for t in inputs if _storage(t)[0] not in mutated_keys]
        else:
            reads = inputs
        if not writes or not any(t.numel() for t in reads + writes):
            return  # aliases its input (e.g. .to() of the same dtype), or empty: no kernel
        if op in _COPY_OPS and reads:
            src = _storage(reads[0])[0]
            for t in writes:
                self.links.append((src, _storage(t)[0]))
        tensors: dict = {}
        for role, group in (("in", reads), ("out", writes)):
            for t in group:
                key, nbytes = _storage(t)
                info = tensors.setdefault(key, [TensorInfo(role, key, nbytes, str(t.dtype).replace("torch.", ""),
                                                           tuple(t.shape)), 0, 0])
                if role not in info[0].label.split("|"):
                    info[0].label = "in|out" if info[0].label != role else role
                info[1 if role == "in" else 2] += t.numel() * t.element_size()
        infos = list(tensors.values())
        stats = np.zeros((len(infos) + 1, len(STATS)), np.int64)
        for i, (_, rd, wr) in enumerate(infos):
            for kind, nbytes, dram in (("ld", rd, "rd_dram"), ("st", wr, "wr_dram")):
                sec = tm.sectors_of(nbytes)
                stats[i, _S[kind + "_req"]] = nbytes
                stats[i, _S[kind + "_sec"]] = sec
                stats[i, _S[kind + "_psec"]] = sec
                stats[i, _S[dram]] = sec
        self.launches.append(Launch("torch." + op, "torch", self.phase, {}, [v[0] for v in infos], stats))

    # -- roles
    def assign_roles(self, seeds: dict):
        """seeds: role -> tensor.  A storage linked by copies to a seed's storage takes its role."""
        parent: dict = {}

        def find(k):
            while parent.get(k, k) != k:
                parent[k] = parent.get(parent[k], parent[k])
                k = parent[k]
            return k

        for a, b in self.links:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[ra] = rb
        role_of = {}
        for role, t in seeds.items():
            if t is not None:
                role_of[find(_storage(t)[0])] = role
        for launch in self.launches:
            for info in launch.tensors:
                info.role = role_of.get(find(info.key), "scratch")


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _tensors(v)
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)


def _mutated_args(func, args, kwargs):
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = args[i] if i < len(args) else kwargs.get(a.name)
            out.extend(_tensors(v))
    return out


_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
               "detach", "alias", "lift_fresh", "_local_scalar_dense", "set_", "resize_", "resize_as_",
               "is_same_size", "record_stream", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride",
               "sym_numel", "sym_storage_offset", "equal", "is_nonzero"}
_WRITE_ONLY = {"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros", "new_ones",
               "new_full", "fill_", "zero_", "scalar_tensor", "arange"}
_COPY_INTO = {"copy_", "_copy_from", "_copy_from_and_resize"}
_COPY_OPS = {"_to_copy", "to", "copy_", "_copy_from", "_copy_from_and_resize", "clone", "contiguous",
             "lift_fresh_copy", "type_as"}


class _TorchOps(TorchDispatchMode):
    """Records the torch ops run while tracing.  A non-aten op (the pmoe custom ops) runs its CPU
    implementation with this mode still active, so the ops inside it are seen too; ops run by the
    interpreter itself while a kernel executes (argument copies) are not the layer's."""

    def __init__(self, tracer: Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        if tracer._cur is not None or tracer.paused:
            return func(*args, **kwargs)
        if func.namespace != "aten":
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        tracer._torch_op(func, args, kwargs, out)
        return out


# =============================================================================================
# running the layer


def _bench_imports():
    from baselines import make_layer, randomize_router
    from shapes import SHAPES
    return make_layer, randomize_router, SHAPES


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = {"fwd": "forward", "fwdbwd": "forward+backward"}


def _warm_up(layer, x, pass_name: str) -> None:
    """One untraced call at batch 1: what a layer allocates once and caches (the kernels' ticket
    counters, launch.sync_counters) is not part of the steady state the model describes."""
    x = x.detach().clone().requires_grad_(pass_name != "forward")
    with torch.set_grad_enabled(pass_name != "forward"):
        y = layer(x)
        if pass_name != "forward":
            y.float().sum().backward()
    layer.zero_grad(set_to_none=True)


def trace_layer(shape, batch: int, dtype: str, layout: str, pass_name: str, seed: int = 0,
                distinct: Optional[int] = None, split: str = "tile") -> Tracer:
    """Trace one forward (no_grad) or forward+backward of the layer at `batch` on CPU tensors.
    distinct: the input is that many random images repeated to `batch` (default: all distinct),
    so that two batches route their images alike and counts compare without sampling noise
    (where an expert block is narrower than a sector, which sectors a selection touches depends
    on the selection)."""
    import pmoe.kernels  # noqa: F401  (its interpreter fixes first, our hooks outermost)

    make_layer, randomize_router, _ = _bench_imports()
    torch.manual_seed(seed)
    layer = make_layer(shape, "triton", "cpu", DTYPES[dtype])
    randomize_router(layer)
    distinct = distinct or batch
    if batch % distinct:
        raise ValueError(f"batch {batch} is not a multiple of {distinct} distinct images")
    x = torch.randn(shape.input_shape(distinct), dtype=DTYPES[dtype]).repeat(batch // distinct, 1, 1, 1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    params = dict(layer.named_parameters())
    _warm_up(layer, x[:1], pass_name)
    tracer = Tracer(split=split)
    with tracer:
        if pass_name == "forward":
            with torch.no_grad():
                y = layer(x)
            seeds = {"x": x, "y": y}
        else:
            x.requires_grad_(True)
            y = layer(x)
            with tracer.pause():
                dy = torch.randn_like(y)
            tracer.phase = "backward"
            y.backward(dy)
            seeds = {"x": x, "y": y, "dy": dy, "dx": x.grad}
            seeds.update({"d" + name: p.grad for name, p in params.items()})
    seeds.update(params)
    tracer.assign_roles(seeds)
    return tracer


def extrapolate(runs: dict, gpu_batch: int) -> list:
    """runs: {batch: Tracer} (two batches).  -> launches (copies of the larger run's records)
    with every count fitted as a + b·B and evaluated at gpu_batch."""
    (b1, t1), (b2, t2) = sorted(runs.items())
    l1, l2 = t1.launches, t2.launches
    names1, names2 = [l.name for l in l1], [l.name for l in l2]
    if names1 != names2:
        raise RuntimeError(f"launch sequences differ between batch {b1} and {b2}:\n  {names1}\n  {names2}")
    out = []
    for a, b in zip(l1, l2):
        if [t.label for t in a.tensors] != [t.label for t in b.tensors]:
            raise RuntimeError(f"{a.name}: tensor arguments differ between batches")

        def fit(v1, v2):
            slope = (np.asarray(v2, float) - np.asarray(v1, float)) / (b2 - b1)
            icpt = np.asarray(v1, float) - slope * b1
            return np.maximum(icpt + slope * gpu_batch, 0.0), icpt, slope

        stats, icpt, slope = fit(a.stats, b.stats)
        flops = {c: float(fit(a.flops.get(c, 0), b.flops.get(c, 0))[0]) for c in set(a.flops) | set(b.flops)}
        programs = None if b.programs is None else float(fit(a.programs, b.programs)[0])
        launch = Launch(b.name, b.kind, b.phase, b.meta, b.tensors, stats, flops, programs)
        launch.intercept, launch.slope = icpt, slope
        out.append(launch)
    return out


# =============================================================================================
# summaries


def _l2_bytes(stats_rows) -> float:
    return SECTOR * float(np.sum(stats_rows[..., [_S["ld_sec"], _S["st_sec"], _S["at_sec"]]]))


def _dram_bytes(stats_rows) -> float:
    return SECTOR * float(np.sum(stats_rows[..., [_S["rd_dram"], _S["wr_dram"]]]))


def _req_bytes(stats_rows) -> float:
    return float(np.sum(stats_rows[..., [_S["ld_req"], _S["st_req"], _S["at_req"]]]))


def _eff(req, sec):
    return req / (sec * SECTOR) if sec else None


def summarize(launches: list, shape, gpu_batch: int, dtype: str, pass_name: str) -> dict:
    """Per launch and tensor rows, totals, model times per device, floors and ratios."""
    elt = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    rows, totals = [], {"l2": 0.0, "dram": 0.0, "req": 0.0, "flops": 0.0,
                        "time": {d.name: 0.0 for d in tm.DEVICES}}
    role_l2 = {}
    act_loads = []
    for i, launch in enumerate(launches):
        st = launch.stats
        l2, dram, req = _l2_bytes(st), _dram_bytes(st), _req_bytes(st)
        flops = sum(launch.flops.values())
        times = {}
        for dev in tm.DEVICES:
            t, bound = tm.launch_time(dev, l2, dram, launch.flops, launch.programs)
            times[dev.name] = {"s": t, "bound": bound}
            totals["time"][dev.name] += t
        tensor_rows = []
        for j, info in enumerate(launch.tensors + [TensorInfo("<unmapped>", 0, 0, "", ())]):
            r = st[j]
            if not np.any(r):
                continue
            ld_req, ld_sec = r[_S["ld_req"]], r[_S["ld_sec"]]
            trow = {"tensor": info.label, "role": info.role, "dtype": info.dtype, "shape": list(info.shape),
                    "requested": _req_bytes(r), "l2": _l2_bytes(r), "dram": _dram_bytes(r),
                    "prog_unique": SECTOR * float(r[_S["ld_psec"]] + r[_S["st_psec"]] + r[_S["at_psec"]]),
                    "load_eff": _eff(ld_req, ld_sec), "store_eff": _eff(r[_S["st_req"]], r[_S["st_sec"]]),
                    "atomic_eff": _eff(r[_S["at_req"]], r[_S["at_sec"]]),
                    **{name: float(r[_S[name]]) for name in STATS}}
            tensor_rows.append(trow)
            role_l2[info.role] = role_l2.get(info.role, 0.0) + trow["l2"]
            icpt = getattr(launch, "intercept", None)
            if info.role == "scratch":  # per-image scratch (row copies, dPre, indices) is activation traffic too
                fixed = _l2_bytes(icpt[j]) if icpt is not None and j < len(icpt) else 0.0
                role_l2["scratch/image"] = role_l2.get("scratch/image", 0.0) + max(0.0, trow["l2"] - fixed)
            if (info.role in ACTIVATION_ROLES or info.role == "scratch") and ld_sec > 0:
                act_loads.append((trow["load_eff"], launch.name, info.label, info.role))
        rows.append({"index": i, "kernel": launch.name, "kind": launch.kind, "phase": launch.phase,
                     "config": launch.meta, "programs": launch.programs, "requested": req, "l2": l2, "dram": dram,
                     "flops": flops, "flops_by_class": launch.flops,
                     "prog_unique": sum(t["prog_unique"] for t in tensor_rows),
                     "sector_eff": _eff(req, l2 / SECTOR) if l2 else None, "model": times, "tensors": tensor_rows})
        totals["l2"] += l2
        totals["dram"] += dram
        totals["req"] += req
        totals["flops"] += flops

    x_bytes = gpu_batch * shape.in_channels * shape.height * shape.width * elt
    y_bytes = gpu_batch * shape.out_channels * shape.num_patches * elt
    act_min = tm.activation_min_bytes(shape, gpu_batch, elt, pass_name)
    act_l2 = sum(role_l2.get(r, 0.0) for r in ACTIVATION_ROLES) + role_l2.get("scratch/image", 0.0)
    floor_b = tm.layer_floor_bytes(shape, gpu_batch, elt, pass_name)
    floor_f = tm.layer_flops(shape, gpu_batch, pass_name)
    dense_b = tm.dense_floor_bytes(shape, gpu_batch, elt, pass_name)
    dense_f = tm.dense_flops(shape, gpu_batch, pass_name)
    per_dev = {}
    for dev in tm.DEVICES:
        model_s = totals["time"][dev.name]
        floor_s = tm.floor_time(dev, floor_b, floor_f, dtype)
        dense_s = tm.floor_time(dev, dense_b, dense_f, dtype)
        per_dev[dev.name] = {"model_s": model_s, "floor_s": floor_s, "pct_of_floor": 100 * floor_s / model_s,
                             "dense_floor_s": dense_s, "model_over_dense_floor": model_s / dense_s}
    warnings = []
    for launch in launches:  # activation traffic must be per image: a fitted intercept means a partial tile
        icpt = getattr(launch, "intercept", None)
        if icpt is None:
            continue
        for j, info in enumerate(launch.tensors):
            if info.role not in ACTIVATION_ROLES:
                continue
            sec = [_S[k + "_sec"] for k in KINDS]
            a, total = abs(float(np.sum(icpt[j, sec]))), float(np.sum(launch.stats[j, sec]))
            if total and a > 0.01 * total:
                warnings.append(f"{launch.name}: {info.label} ({info.role}) has a batch-independent part of "
                                f"{a / total:.1%}: B·l may not fill whole tiles at the traced batches")
    worst = min(act_loads) if act_loads else None
    passes = {"x": role_l2.get("x", 0.0) / x_bytes, "y": role_l2.get("y", 0.0) / y_bytes,
              "dy": role_l2.get("dy", 0.0) / y_bytes, "dx": role_l2.get("dx", 0.0) / x_bytes}
    return {"shape": shape.name, "describe": shape.describe(), "gpu_batch": gpu_batch, "dtype": dtype,
            "pass": pass_name, "launches": len(launches), "rows": rows,
            "totals": {"requested": totals["req"], "l2": totals["l2"], "dram": totals["dram"],
                       "flops": totals["flops"], "l2_by_role": role_l2},
            "activation": {"l2": act_l2, "min": act_min, "ratio": act_l2 / act_min, "passes": passes,
                           "worst_load_eff": None if worst is None else
                           {"eff": worst[0], "kernel": worst[1], "tensor": worst[2], "role": worst[3]},
                           "loads_below_0.8": sum(1 for e in act_loads if e[0] < 0.8)},
            "warnings": warnings,
            "floor": {"bytes": floor_b, "flops": floor_f, "dense_bytes": dense_b, "dense_flops": dense_f},
            "devices": per_dev}


def storage_at(shape, gpu_batch: int, dtype: str, layout: str, pass_name: str) -> list:
    """{argument name: storage bytes} of each Triton launch of the pass at the GPU batch, in launch
    order, from a dry run of the launchers on meta tensors (kernels/registry.record): the sizes
    the buffers really have there, e.g. the forward's row ring (configs.ring_images), which the
    traced batches are too small to fill."""
    from pmoe.kernels import registry

    prob = registry.Problem(shape.name, gpu_batch, shape.in_channels, shape.height, shape.width, shape.patch_size,
                            shape.num_experts, shape.expert_features, shape.top_l, combine=shape.combine,
                            channels_last=layout == "channels_last")
    forward, backward = registry.record(prob, DTYPES[dtype], sm=90, save_pre=pass_name != "forward")
    out = []
    for kernel, _grid, args, _kwargs in forward + (backward if pass_name != "forward" else []):
        name, tensors = registry.tensor_args(kernel, args)
        out.append((name, {arg: t.untyped_storage().nbytes() for arg, t in tensors.items()}))
    return out


def cap_dram(launches: list, sizes: list) -> None:
    """A launch moves each sector of a tensor between DRAM and L2 at most once each way (the
    perfect L2 of the model): cap every tensor's fitted DRAM reads and writes at its storage at
    the GPU batch (storage_at).  Only buffers that do not grow with B (a ring) are ever capped."""
    triton_launches = [l for l in launches if l.kind == "triton"]
    if [l.name for l in triton_launches] != [name for name, _ in sizes]:
        raise RuntimeError(f"traced launches {[l.name for l in triton_launches]} differ from the launchers' "
                           f"{[name for name, _ in sizes]}")
    for launch, (_, by_arg) in zip(triton_launches, sizes):
        for j, info in enumerate(launch.tensors):
            caps = [by_arg[a] for a in info.label.split("|") if a in by_arg]
            if caps:
                cap = math.ceil(max(caps) / SECTOR)
                for stat in ("rd_dram", "wr_dram"):
                    launch.stats[j, _S[stat]] = min(launch.stats[j, _S[stat]], cap)


def whole_tiles_batch(shape, dtype: str) -> int:
    """The least B whose B*l rows fill whole expert tiles of the forward's config (sm_90; the
    backward's tiles are as wide or half as wide), so that no partial tile is extrapolated."""
    from pmoe.kernels import configs

    elt = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    rows = configs.forward_config(shape.num_patches, shape.patch_dim, shape.num_experts, shape.top_l,
                                  shape.expert_features, elt, 90, shape.combine == "sum").block_r
    return rows // math.gcd(rows, shape.top_l)


def run_config(shape, batch: int, gpu_batch: int, dtype: str, layout: str, pass_key: str, split: str = "tile",
               log=print) -> dict:
    pass_name = PASSES[pass_key]
    runs = {}
    t0 = time.time()
    for b in (batch, 2 * batch):  # the same `batch` images, once and twice
        runs[b] = trace_layer(shape, b, dtype, layout, pass_name, distinct=batch, split=split)
    launches = extrapolate(runs, gpu_batch)
    cap_dram(launches, storage_at(shape, gpu_batch, dtype, layout, pass_name))
    summary = summarize(launches, shape, gpu_batch, dtype, pass_name)
    summary.update(layout=layout, split=split, interp_batches=sorted(runs), trace_s=time.time() - t0)
    log(f"# traced {shape.name} {layout} {pass_name} {dtype} at B={batch},{2 * batch} in {time.time() - t0:.1f} s")
    return summary


# =============================================================================================
# report


def _mb(v) -> str:
    return "-" if v is None else f"{v / 1e6:.3g}"


def _us(v) -> str:
    return f"{v * 1e6:.1f}"


def _f(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def _config(meta: dict) -> str:
    parts = [f"{k[6:]}{v}" if k.startswith("BLOCK_") else f"{k}={v}" for k, v in meta.items()
             if k not in ("num_warps", "num_stages")]
    return ",".join(parts) + (f"/w{meta['num_warps']}" if "num_warps" in meta else "")


def kernel_table(s: dict) -> str:
    devs = list(s["devices"])
    head = ("| # | phase | kernel | config | programs | tensor | role | requested MB | L2<->SM MB "
            "| sector eff (ld/st/at) "
            "| prog-unique MB | DRAM MB | GFLOP | " + " | ".join(f"model us {d} (bound)" for d in devs) + " |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in s["rows"]:
        model = " | ".join(f"{_us(r['model'][d]['s'])} ({r['model'][d]['bound']})" for d in devs)
        progs = "-" if r["programs"] is None else f"{r['programs']:.0f}"
        phase = "fwd" if r["phase"] == "forward" else "bwd"
        lines.append(f"| {r['index']} | {phase} | **{r['kernel']}** | {_config(r['config'])} | {progs} | (all) | "
                     f"| {_mb(r['requested'])} | {_mb(r['l2'])} | {_f(r['sector_eff'])} | {_mb(r['prog_unique'])} "
                     f"| {_mb(r['dram'])} | {r['flops'] / 1e9:.3g} | {model} |")
        for t in r["tensors"]:
            eff = "/".join(_f(t[k]) for k in ("load_eff", "store_eff", "atomic_eff"))
            lines.append(f"| | | | | | {t['tensor']} | {t['role']} | {_mb(t['requested'])} | {_mb(t['l2'])} | {eff} "
                         f"| {_mb(t['prog_unique'])} | {_mb(t['dram'])} | | " + " | ".join("" for _ in devs) + " |")
    tot = s["totals"]
    model = " | ".join(f"**{_us(s['devices'][d]['model_s'])}**" for d in devs)
    lines.append(f"| | | **total** ({s['launches']} launches) | | | | | {_mb(tot['requested'])} | {_mb(tot['l2'])} "
                 f"| {_f(tot['requested'] / tot['l2'] if tot['l2'] else None)} | | {_mb(tot['dram'])} "
                 f"| {tot['flops'] / 1e9:.3g} | {model} |")
    return "\n".join(lines)


def summary_table(summaries: list) -> str:
    devs = list(summaries[0]["devices"]) if summaries else []
    head = ("| shape | layout | pass | launches | act. L2<->SM / min | x passes | worst act. load eff | L2<->SM MB "
            "| DRAM MB | dot GFLOP | " + " | ".join(f"{d}: model us / floor us / % of floor / dense floor us "
                                                      f"(model / dense floor)" for d in devs) + " |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for s in summaries:
        a = s["activation"]
        worst = a["worst_load_eff"]
        worst_s = "-" if worst is None else f"{worst['eff']:.2f} ({worst['kernel']}: {worst['tensor']})"
        dev = " | ".join(f"{_us(s['devices'][d]['model_s'])} / {_us(s['devices'][d]['floor_s'])} / "
                         f"{s['devices'][d]['pct_of_floor']:.0f}% / {_us(s['devices'][d]['dense_floor_s'])} "
                         f"({s['devices'][d]['model_over_dense_floor']:.2f}x)" for d in devs)
        lines.append(f"| {s['shape']} | {s['layout']} | {s['pass']} | {s['launches']} | {a['ratio']:.2f}x "
                     f"| {a['passes']['x']:.1f} | {worst_s} | {_mb(s['totals']['l2'])} | {_mb(s['totals']['dram'])} "
                     f"| {s['totals']['flops'] / 1e9:.3g} | {dev} |")
    return "\n".join(lines)


def constants_md(devices=None, sources=None) -> str:
    """The model's device constants and their sources (a report's own, or the current ones)."""
    devices = devices or [d.as_dict() for d in tm.DEVICES]
    lines = ["| device | HBM TB/s | L2->SM TB/s | SMs | launch us | dot TFLOP/s (16bit / tf32 / tf32x3 / ieee) |",
             "|---|---|---|---|---|---|"]
    for d in devices:
        r = d["dot_flops_per_s"]
        lines.append(f"| {d['name']} | {d['hbm_bytes_per_s'] / 1e12:.1f} | {d['l2_bytes_per_s'] / 1e12:.1f} | "
                     f"{d['sms']} | {d['launch_s'] * 1e6:.1f} | {r['16bit'] / 1e12:.0f} / {r['tf32'] / 1e12:.0f} / "
                     f"{r['tf32x3'] / 1e12:.0f} / {r['ieee'] / 1e12:.1f} |")
    return "\n".join(lines + [""] + [f"- {s}" for s in (sources or tm.SOURCES)])


def _machine() -> dict:
    from machine import machine_info
    return machine_info(torch.device("cpu"))


def _git() -> dict:
    """The commit traced, and whether kernels/ differs from it (read-only git queries)."""
    import subprocess

    root = os.path.dirname(_BENCH)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout
    except Exception:  # not a checkout
        return {"commit": "unknown", "kernels_modified": []}
    modified = [line[3:] for line in dirty.splitlines() if line.strip()]
    return {"commit": commit or "unknown", "kernels_modified": modified}


def markdown(doc: dict) -> str:
    m = doc["machine"]
    out = [f"# pMoE traffic MODEL ({doc['date']})", "",
           "Modeled, not measured: every number below comes from tracing the fused op's kernels in "
           "Triton's interpreter and a bandwidth/FLOP model of the GPU (bench/traffic.py, "
           "bench/traffic_model.py).  No GPU ran anything here.", "",
           f"Traced on: {m['device']} ({m['cpu_count']} CPUs) | torch {m['torch']} | triton {m['triton']} | "
           f"python {m['python']} | TRITON_INTERPRET={m['triton_interpret']} | {m['date']}", "",
           f"Code: commit {doc.get('git', {}).get('commit', 'unknown')}"
           + (f", kernels/ modified since: {', '.join(doc['git']['kernels_modified'])}"
              if doc.get("git", {}).get("kernels_modified") else "") + f" | command: `{doc['command']}`", "",
           "## Model", "", "time per launch = max(L2<->SM bytes / L2 BW x fill, DRAM bytes / HBM BW, "
           "dot FLOPs / rate x fill) + launch overhead, fill = SMs / min(programs, SMs); summed over the "
           "pass's launches.  Floor = max(minimum bytes / HBM BW, SPEC FLOPs / rate).", "",
           constants_md(doc.get("devices"), doc.get("sources")), "", "Assumptions:", ""]
    out += [f"- {a}" for a in doc.get("assumptions", ASSUMPTIONS)]
    out += ["", "## Summary (counts at the GPU batch)", "", summary_table(doc["summaries"]), "",
            "act. L2<->SM / min: L2<->SM bytes of x, y, dy, dx (every launch, torch ops included) over "
            "what must move (forward: read x + write y; forward+backward adds read dy, read x, write dx).  "
            "x passes: L2<->SM bytes of x over the size of x.", ""]
    for s in doc["summaries"]:
        out += [f"## {s['shape']} ({s['describe']}), {s['layout']}, {s['pass']}, {s['dtype']}, "
                f"split {s.get('split', 'tile')}, "
                f"B = {s['gpu_batch']} (traced at B = {', '.join(map(str, s['interp_batches']))}: "
                f"{s['interp_batches'][0]} random images, once and twice)", "",
                kernel_table(s), ""] + [f"WARNING: {w}" for w in s["warnings"]] + [
                f"Floor: {s['floor']['bytes'] / 1e6:.3g} MB, {s['floor']['flops'] / 1e9:.3g} GFLOP; dense conv floor: "
                f"{s['floor']['dense_bytes'] / 1e6:.3g} MB, {s['floor']['dense_flops'] / 1e9:.3g} GFLOP.  "
                f"L2<->SM by role (MB): " + ", ".join(f"{k} {v / 1e6:.3g}" for k, v in
                                                     sorted(s['totals']['l2_by_role'].items())), ""]
    return "\n".join(out) + "\n"


ASSUMPTIONS = [
    "L2<->SM: unique 32-byte sectors of each tl.load/tl.store/atomic call's active lanes, per program, summed "
    "(L1 bypassed, as for cp.async.cg / TMA / stores); with --split tile a tile's split into warp instructions "
    "is ignored, so sub-sector gathers split across warps are undercounted (--split cols/rows brackets it)",
    "masked-off lanes make no request; addresses outside every argument tensor show as <unmapped>",
    "DRAM: unique sectors per launch (perfect L2 within a launch, cold between launches); writes = every "
    "sector stored or atomically updated, once; reads = sectors loaded or atomically updated whose first touch "
    "in the launch is not a write by an earlier program (written data is read back from L2); each capped at the "
    "tensor's size at the GPU batch (a meta-device dry run of the launchers), which only binds for buffers "
    "that do not grow with B: the rings of kernels/configs.ring_images (the forward's row copy of an NCHW map, "
    "the backward's T)",
    "dot FLOPs = 2·M·N·K of every tl.dot tile (padding included); CUDA-core work (sort, softmax, "
    "activations) is not timed",
    "torch ops the layer runs (fills, casts, copies) stream: each input read and each output written once",
    "counts fitted as a + b·B from two interpreter batches (B random images, then the same B twice) and "
    "evaluated at the shape's gpu_batch; gather traffic depends on which patches the router picks, so it is "
    "estimated from those B images under bench/baselines.randomize_router (a few % of sampling spread)",
    "each kernel runs the config the GPU would run: kernels/configs.py's fixed table for the modeled arch",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--shape", default="all", help="wrn-pmoe | large | mnist-k2-l2 | mnist-k8-l6 | all (the first two)")
    ap.add_argument("--batch", type=int, default=None,
                    help="interpreter batch B, traced at B and 2B (default: the least B with whole forward "
                         "tiles, whole_tiles_batch: 8 for wrn-pmoe, 4 for large in 16-bit)")
    ap.add_argument("--gpu-batch", type=int, default=None,
                    help="batch the counts are evaluated at (default: the shape's gpu_batch)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--layout", default="nchw", choices=["nchw", "channels_last", "all"])
    ap.add_argument("--pass", dest="pass_", default="all", choices=["fwd", "fwdbwd", "all"])
    ap.add_argument("--split", default="tile", choices=SPLITS,
                    help="sectors per whole access instruction (tile, the model) or per tile column / row "
                         "(a layout whose warp instructions each cover one column / row)")
    ap.add_argument("--out", default=None, help="directory for model-<date>[-<tag>].md and .json")
    ap.add_argument("--tag", default=None, help="suffix of the report's name (e.g. before, after)")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only re-render a report's .md from its .json (no tracing)")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            doc = json.load(f)
        md = os.path.splitext(args.render)[0] + ".md"
        with open(md, "w") as f:
            f.write(markdown(doc))
        print(summary_table(doc["summaries"]))
        print(f"\nwrote {md}")
        return 0

    _, _, shapes = _bench_imports()
    names = ["wrn-pmoe", "large"] if args.shape == "all" else args.shape.split(",")
    layouts = ["nchw", "channels_last"] if args.layout == "all" else [args.layout]
    passes = ["fwd", "fwdbwd"] if args.pass_ == "all" else [args.pass_]
    machine = _machine()
    print(f"# pMoE traffic MODEL (not a measurement) | traced on {machine['device']} | torch {machine['torch']} "
          f"| triton {machine['triton']} | {machine['date']}")
    summaries = []
    for name in names:
        shape = shapes[name]
        batch = args.batch or whole_tiles_batch(shape, args.dtype)
        gpu_batch = args.gpu_batch or shape.gpu_batch
        for layout in layouts:
            for p in passes:
                s = run_config(shape, batch, gpu_batch, args.dtype, layout, p, split=args.split)
                summaries.append(s)
                print(f"\n## {s['shape']} {layout} {s['pass']} {args.dtype} B={gpu_batch} split={args.split}\n")
                print(kernel_table(s))
                for w in s["warnings"]:
                    print("WARNING:", w)
    print("\n## Model constants\n")
    print(constants_md())
    print("\n## Summary (MODEL)\n")
    print(summary_table(summaries))
    doc = {"kind": "model", "note": "modeled from interpreter traces, not measured",
           "date": datetime.date.today().isoformat(),
           "command": "python bench/traffic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine, "git": _git(), "devices": [d.as_dict() for d in tm.DEVICES], "sources": tm.SOURCES,
           "assumptions": ASSUMPTIONS, "summaries": summaries}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"model-{doc['date']}" + (f"-{args.tag}" if args.tag else ""))
        with open(stem + ".json", "w") as f:
            json.dump(doc, f, indent=1, default=float)
        with open(stem + ".md", "w") as f:
            f.write(markdown(doc))
        print(f"\nwrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Out-of-bounds accesses of interpreted kernels, caught as errors: what compute-sanitizer's
memcheck does on a GPU, for the tests that run the kernels in Triton's interpreter on CPU tensors.

The interpreter reads and writes real host memory through raw addresses and never checks them:
a wrong mask or offset silently reads garbage or corrupts the heap.  install() wraps the
interpreter's masked loads, stores and atomics: every active lane's address must fall inside the
storage of one of the launch's tensor arguments, else OutOfBounds names the kernel and the lanes.
"""
from __future__ import annotations

import functools

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


_state = {"ranges": [], "kernel": None}


def _check(kind: str, ptrs, mask) -> None:
    ranges = _state["ranges"]
    if ptrs is None or not ranges:
        return
    addr = np.asarray(ptrs.data).astype(np.uint64).reshape(-1)
    if mask is not None:
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.asarray(ptrs.data).shape).reshape(-1)
        addr = addr[live]
    if addr.size == 0:
        return
    inside = np.zeros(addr.shape, dtype=bool)
    for lo, hi in ranges:
        inside |= (addr >= lo) & (addr < hi)
    if not inside.all():
        bad = addr[~inside]
        raise OutOfBounds(f"{kind} out of bounds in {_state['kernel']}: {bad.size} lanes, first at {hex(int(bad[0]))}")


def install() -> None:
    """Wrap the interpreter once per process (idempotent)."""
    from triton.runtime import interpreter as interp

    if getattr(interp.GridExecutor.__call__, "_pmoe_bounds", False):
        return
    call = interp.GridExecutor.__call__

    @functools.wraps(call)
    def checked_call(self, *args, **kwargs):
        saved = dict(_state)
        _state["ranges"] = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
                            for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        _state["kernel"] = getattr(self.fn, "__name__", repr(self.fn))
        try:
            return call(self, *args, **kwargs)
        finally:
            _state.update(saved)

    checked_call._pmoe_bounds = True
    interp.GridExecutor.__call__ = checked_call
    builder = interp.InterpreterBuilder
    for name, kind, mask_at in (("create_masked_load", "load", 0), ("create_masked_store", "store", 1),
                                ("create_atomic_rmw", "atomic", 2), ("create_atomic_cas", "atomic", None)):
        original = getattr(builder, name, None)
        if original is None:
            continue

        @functools.wraps(original)  # keeps the signature: other hooks (bench/traffic.py) read parameter names
        def wrapped(self, *args, _original=original, _kind=kind, _mask_at=mask_at, **kwargs):
            if _kind == "atomic":  # (rmw_op, ptr, val, mask, ...) / (ptr, cmp, val, ...)
                ptr = args[1] if _mask_at is not None else args[0]
                mask = args[3] if _mask_at is not None and len(args) > 3 else None
            else:
                ptr = args[0]
                mask = args[1 + _mask_at] if len(args) > 1 + _mask_at else None
            _check(_kind, ptr, mask)
            return _original(self, *args, **kwargs)

        setattr(builder, name, wrapped)

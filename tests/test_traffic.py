"""bench/traffic.py, the interpreter-traced traffic model: the instrument on kernels whose traffic is
known by hand (copy, tiled matmul, a strided gather, broadcast reads, atomics, dots), the hook
guard, the model formulas, and a smoke run of the pMoE op at a tiny shape (per-kernel rows,
per-image invariance, extrapolation in the batch)."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)

import traffic  # noqa: E402
import traffic_model as tm  # noqa: E402
from shapes import WRN, LayerShape, tiny  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="the traffic tracer runs Triton's interpreter")
SECTOR = 32


@triton.jit
def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n), mask=o < n)


@triton.jit
def _matmul(a_ptr, b_ptr, c_ptr, M, N, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # K constexpr: a runtime-bound range() trips Triton 3.6's interpreter on NumPy >= 2.4
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


@triton.jit
def _strided(x_ptr, y_ptr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i * STRIDE))


@triton.jit
def _pairs(x_ptr, y_ptr, ROWS: tl.constexpr):
    """a (ROWS, 2) tile: each row's two 2-byte elements share a sector, rows 128 bytes apart"""
    r = tl.arange(0, ROWS)
    c = tl.arange(0, 2)
    v = tl.load(x_ptr + r[:, None] * 64 + c[None, :])
    tl.store(y_ptr + r[:, None] * 2 + c[None, :], v)


@triton.jit
def _broadcast(x_ptr, cnt_ptr, out_ptr, BLOCK: tl.constexpr):
    """every program reads the same BLOCK elements twice and adds into the same counters"""
    o = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + o) + tl.load(x_ptr + o)
    tl.atomic_add(cnt_ptr + tl.arange(0, 16), tl.full((16,), 1.0, tl.float32))
    tl.store(out_ptr + tl.program_id(0) * BLOCK + o, v)


@triton.jit
def _dot32(a_ptr, b_ptr, c_ptr, PREC: tl.constexpr):
    r16 = tl.arange(0, 16)
    r32 = tl.arange(0, 32)
    a = tl.load(a_ptr + r16[:, None] * 32 + r32[None, :])
    b = tl.load(b_ptr + r32[:, None] * 16 + r16[None, :])
    tl.store(c_ptr + r16[:, None] * 16 + r16[None, :], tl.dot(a, b, input_precision=PREC))


def _trace(fn):
    with traffic.Tracer(torch_ops=False) as tr:
        fn()
    assert len(tr.launches) == 1
    return tr.launches[0]


def _row(launch, label):
    labels = [t.label for t in launch.tensors]
    return {name: int(launch.stats[labels.index(label), i]) for i, name in enumerate(traffic.STATS)}


def _aligned(*ts):
    for t in ts:  # the hand counts assume sector-aligned tensors (CPU allocations are 64-byte aligned)
        assert t.data_ptr() % SECTOR == 0


def test_copy_kernel_exact_traffic_and_unit_efficiency():
    n = 4096
    x = torch.randn(n, dtype=torch.float16)
    y = torch.empty_like(x)
    _aligned(x, y)
    launch = _trace(lambda: _copy[(n // 256,)](x, y, n, BLOCK=256))
    assert launch.name == "_copy" and launch.programs == 16 and launch.meta == {"BLOCK": 256}
    nsec = n * 2 // SECTOR  # 256 sectors each way
    assert _row(launch, "x_ptr") == {**dict.fromkeys(traffic.STATS, 0), "ld_req": 2 * n, "ld_sec": nsec,
                                     "ld_psec": nsec, "rd_dram": nsec}
    assert _row(launch, "y_ptr") == {**dict.fromkeys(traffic.STATS, 0), "st_req": 2 * n, "st_sec": nsec,
                                     "st_psec": nsec, "wr_dram": nsec}
    assert not launch.stats[-1].any()  # nothing outside the arguments
    assert torch.equal(x, y)  # the kernel still ran


def test_masked_tail_lanes_are_not_counted():
    n = 1000  # 8 programs of 128: the last has 104 live lanes
    x = torch.randn(n, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    _aligned(x, y)
    launch = _trace(lambda: _copy[(triton.cdiv(n, 128),)](x, y, n, BLOCK=128))
    row = _row(launch, "x_ptr")
    assert row["ld_req"] == 2 * n
    assert row["ld_sec"] == row["rd_dram"] == math.ceil(2 * n / SECTOR) == 63


def test_tiled_matmul_traffic_and_flops():
    M = N = K = 64
    a = torch.randn(M, K, dtype=torch.float16)
    b = torch.randn(K, N, dtype=torch.float16)
    c = torch.empty(M, N, dtype=torch.float32)
    _aligned(a, b, c)
    launch = _trace(lambda: _matmul[(2, 2)](a, b, c, M, N, K, BM=32, BN=32, BK=32))
    assert launch.programs == 4
    # a 32x32 fp16 tile: 32 rows of 64 B = 64 sectors; 2 k-steps per program, 4 programs
    for name, t in (("a_ptr", a), ("b_ptr", b)):
        row = _row(launch, name)
        assert row["ld_sec"] == 4 * 2 * 64  # each tile read by the 2 programs sharing its rows / columns
        assert row["ld_req"] == row["ld_sec"] * SECTOR  # sector efficiency 1
        assert row["ld_psec"] == row["ld_sec"]  # no reuse inside a program
        assert row["rd_dram"] == t.numel() * 2 // SECTOR  # each sector once from DRAM
    row = _row(launch, "c_ptr")
    assert row["st_sec"] == row["wr_dram"] == M * N * 4 // SECTOR and row["st_req"] == M * N * 4
    assert launch.flops == {"16bit": 2 * M * N * K}  # 8 dots of 2*32*32*32
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-2, atol=1e-2)


def test_strided_loads_come_out_at_one_sixteenth():
    block, stride = 64, 32  # 2-byte loads 64 bytes apart: one sector per lane, 2 of its 32 bytes used
    x = torch.randn(2 * block * stride, dtype=torch.float16)
    y = torch.empty(2 * block, dtype=torch.float16)
    launch = _trace(lambda: _strided[(2,)](x, y, STRIDE=stride, BLOCK=block))
    row = _row(launch, "x_ptr")
    assert row["ld_req"] == 2 * block * 2 and row["ld_sec"] == row["rd_dram"] == 2 * block
    assert row["ld_req"] / (row["ld_sec"] * SECTOR) == pytest.approx(1 / 16)
    s = traffic.summarize([launch], WRN, 1, "fp16", "forward")
    xrow = next(t for t in s["rows"][0]["tensors"] if t["tensor"] == "x_ptr")
    assert xrow["load_eff"] == pytest.approx(1 / 16)


@pytest.mark.parametrize("split,sectors,y_sectors", [("tile", 32, 4), ("cols", 64, 8), ("rows", 32, 32)])
def test_split_counts_a_sector_shared_by_two_columns_once_or_twice(split, sectors, y_sectors):
    x = torch.randn(32 * 64, dtype=torch.float16)
    y = torch.empty(32 * 2, dtype=torch.float16)
    with traffic.Tracer(torch_ops=False, split=split) as tr:
        _pairs[(1,)](x, y, ROWS=32)
    row = _row(tr.launches[0], "x_ptr")
    assert row["ld_req"] == 32 * 2 * 2 and row["ld_sec"] == sectors
    assert row["ld_psec"] == row["rd_dram"] == 32  # unique sectors do not depend on the split
    # y: 128 contiguous bytes, 4 sectors; each column spans all 4, each 4-byte row one of them
    assert _row(tr.launches[0], "y_ptr")["st_sec"] == y_sectors


def test_unique_sectors_per_program_and_per_launch_and_atomics():
    block, progs = 128, 8
    x = torch.randn(block, dtype=torch.float16)  # 256 B = 8 sectors
    cnt = torch.zeros(16, dtype=torch.float32)  # 64 B = 2 sectors
    out = torch.empty(progs * block, dtype=torch.float16)
    _aligned(x, cnt, out)
    launch = _trace(lambda: _broadcast[(progs,)](x, cnt, out, BLOCK=block))
    row = _row(launch, "x_ptr")
    assert row["ld_sec"] == progs * 2 * 8  # every instruction fetches its sectors again (L1 off)
    assert row["ld_psec"] == progs * 8  # a per-program cache would fetch them once per program
    assert row["rd_dram"] == 8  # and DRAM (perfect L2) once
    row = _row(launch, "cnt_ptr")
    assert row["at_req"] == progs * 64 and row["at_sec"] == progs * 2
    assert row["rd_dram"] == row["wr_dram"] == 2 and row["ld_sec"] == row["st_sec"] == 0
    assert torch.equal(cnt, torch.full((16,), float(progs)))


@pytest.mark.parametrize("dtype,prec,cls", [(torch.float32, "tf32x3", "tf32x3"), (torch.float32, "ieee", "ieee"),
                                            (torch.float32, "tf32", "tf32"), (torch.bfloat16, "tf32", "16bit")])
def test_dot_flops_and_class(dtype, prec, cls):
    a = torch.randn(16, 32, dtype=dtype)
    b = torch.randn(32, 16, dtype=dtype)
    c = torch.empty(16, 16, dtype=torch.float32)
    launch = _trace(lambda: _dot32[(3,)](a, b, c, PREC=prec))
    assert launch.flops == {cls: 3 * 2 * 16 * 16 * 32}


def test_a_patch_applied_after_ours_is_wrapped_and_counted_once():
    """kernels/utils.py patches InterpreterBuilder.create_dot on import; a patch on top of ours must
    neither hide the dots nor count them twice (install_hooks re-wraps; the depth guard)."""
    from triton.runtime import interpreter

    traffic.install_hooks()
    builder = interpreter.InterpreterBuilder
    ours = builder.create_dot
    calls = []

    def later_patch(self, *args, **kwargs):
        calls.append(1)
        return ours(self, *args, **kwargs)

    builder.create_dot = later_patch
    try:
        a = torch.randn(16, 32, dtype=torch.float16)
        b = torch.randn(32, 16, dtype=torch.float16)
        c = torch.empty(16, 16, dtype=torch.float32)
        launch = _trace(lambda: _dot32[(2,)](a, b, c, PREC="tf32"))
        assert calls == [1, 1]
        assert launch.flops == {"16bit": 2 * 2 * 16 * 16 * 32}
        assert getattr(builder.create_dot, "_traffic_hook", None) is later_patch  # ours is outermost again
    finally:
        builder.create_dot = ours


def test_launch_time_model():
    dev = tm.H100
    # L2-bound, full grid: bytes / bandwidth + overhead
    t, bound = tm.launch_time(dev, 9e9, 1e9, {}, 1000)
    assert bound == "L2" and t == pytest.approx(1e-3 + dev.launch_s)
    # the same on 33 programs: a quarter of the SMs, four times the L2 term; DRAM is not scaled
    t, bound = tm.launch_time(dev, 9e9, 1e9, {}, 33)
    assert bound == "L2" and t == pytest.approx(4e-3 + dev.launch_s)
    t, bound = tm.launch_time(dev, 0, 3e9, {"16bit": 790e9}, None)
    assert bound == "DRAM" and t == pytest.approx(1e-3 + dev.launch_s)
    t, bound = tm.launch_time(dev, 0, 0, {"tf32x3": 395e9 / 3 * 2, "16bit": 790e9}, 500)
    assert bound == "dot" and t == pytest.approx(3e-3 + dev.launch_s)
    t, bound = tm.launch_time(dev, 32, 32, {}, 1)  # a tiny kernel: the overhead is all there is
    assert bound == "launch" and t == pytest.approx(dev.launch_s, rel=1e-3)


def test_floors_are_what_must_move_and_spec():
    """Forward: read x, write y, read the weights and router once; forward+backward adds read dy,
    read x and the weights again, write dx and dW (WRN at B = 8, bf16, counted by hand)."""
    x, y, w = 8 * 640 * 64, 8 * 640 * 64, 4 * 160 * 640 + 4 * 640
    assert tm.layer_floor_bytes(WRN, 8, 2, "forward") == 2 * (x + y + w)
    assert tm.layer_floor_bytes(WRN, 8, 2, "forward+backward") == 2 * (x + y + w + y + x + w + x + w)
    # SPEC section 4: pMoE / dense forward FLOPs = l/n + k/m at the WRN shape
    assert tm.layer_flops(WRN, 8, "forward") / tm.dense_flops(WRN, 8, "forward") == pytest.approx(16 / 64 + 4 / 640)


# ---------------------------------------------------------------------------------------------
# the pMoE op, tiny shape (C=4, 4x4, p=1, k=4, l=8, out=16), at B = 4 and 8: a part of one 128-row forward tile

SHAPE = tiny(WRN)


@pytest.fixture(scope="module")
def fwdbwd_runs():
    return {b: traffic.trace_layer(SHAPE, b, "bf16", "nchw", "forward+backward", distinct=4) for b in (4, 8)}


def _role_bytes(tracer, stat):
    out = {}
    for launch in tracer.launches:
        for j, info in enumerate(launch.tensors):
            out[info.role] = out.get(info.role, 0) + int(launch.stats[j, traffic._S[stat]])
    return out


def test_pmoe_smoke_rows_and_report(fwdbwd_runs):
    tracer = fwdbwd_runs[4]
    names = [(l.phase, l.kind, l.name) for l in tracer.launches]
    triton_fwd = [n for p, k, n in names if k == "triton" and p == "forward"]
    triton_bwd = [n for p, k, n in names if k == "triton" and p == "backward"]
    assert triton_fwd and triton_bwd, names
    assert all(l.programs > 0 for l in tracer.launches if l.kind == "triton")
    roles = {info.role for l in tracer.launches for info in l.tensors}
    assert {"x", "y", "dy", "dx", "weight", "router", "dweight"} <= roles, roles
    ld, st = _role_bytes(tracer, "ld_req"), _role_bytes(tracer, "st_req")
    elt, B = 2, 4
    x_bytes = B * SHAPE.in_channels * SHAPE.height * SHAPE.width * elt
    y_bytes = B * SHAPE.out_channels * SHAPE.num_patches * elt
    assert ld["x"] >= 2 * x_bytes and st["y"] >= y_bytes and st["dx"] >= x_bytes and ld["dy"] > 0
    launches = traffic.extrapolate(fwdbwd_runs, 16)
    s = traffic.summarize(launches, SHAPE, 16, "bf16", "forward+backward")
    s.update(layout="nchw", interp_batches=[4, 8])
    assert len(s["rows"]) == len(tracer.launches)
    assert all(r["model"][d.name]["s"] > d.launch_s for r in s["rows"] for d in tm.DEVICES)
    assert s["activation"]["ratio"] >= 1.0  # nothing moves less than what must move
    assert s["totals"]["flops"] >= s["floor"]["flops"]  # padded tiles: never fewer than SPEC's count
    for d in tm.DEVICES:
        assert 0 < s["devices"][d.name]["pct_of_floor"] < 100
    doc = {"date": "today", "command": "test", "machine": traffic._machine(), "summaries": [s]}
    md = traffic.markdown(doc)
    assert "MODEL" in md and all(name in md for name in triton_fwd + triton_bwd)
    json.dumps(s, default=float)


def test_pmoe_traffic_per_image_does_not_depend_on_batch(fwdbwd_runs):
    """Activation traffic is per image; the weights' DRAM reads are per launch.  (The 8 images are
    the 4 twice: with 4 output channels per expert, an expert block is 8 bytes, and which sectors
    the zero fill and the expert writes share depends on the selection.)"""
    small, large = fwdbwd_runs[4], fwdbwd_runs[8]
    assert [l.name for l in small.launches] == [l.name for l in large.launches]
    for stat in ("ld_req", "st_req", "ld_sec", "st_sec", "at_sec", "rd_dram", "wr_dram"):
        a, b = _role_bytes(small, stat), _role_bytes(large, stat)
        for role in ("x", "y", "dy", "dx"):
            assert b.get(role, 0) == 2 * a.get(role, 0), (stat, role)
    a, b = _role_bytes(small, "rd_dram"), _role_bytes(large, "rd_dram")
    assert a["weight"] == b["weight"] > 0


def test_dram_capped_at_the_forward_row_ring(fwdbwd_runs):
    """At a batch where the forward's row copy and the backward's T wrap their rings
    (configs.ring_images), their DRAM writes are the rings' sizes (from the launchers' dry run at
    that batch), not the fit's; per-image tensors (x, the backward's row copy) keep theirs."""
    B = 4096
    launches = traffic.extrapolate(fwdbwd_runs, B)
    wr = traffic._S["wr_dram"]
    before = [l.stats[:, wr].copy() for l in launches]
    sizes = traffic.storage_at(SHAPE, B, "bf16", "nchw", "forward+backward")
    traffic.cap_dram(launches, sizes)
    copy_bytes = B * SHAPE.num_patches * SHAPE.patch_dim * 2
    ring = sizes[0][1]["rows_ptr"]
    assert sizes[0][0] == "_forward_kernel" and ring < copy_bytes
    changed = [(l.name, info.label) for l, b in zip(launches, before) for j, info in enumerate(l.tensors)
               if l.stats[j, wr] != b[j]]
    assert changed == [("_forward_kernel", "rows_ptr"), ("_rows_bwd_kernel", "t_ptr")]
    for name, label in changed:
        launch = launches[[l.name for l in launches].index(name)]
        j = [info.label for info in launch.tensors].index(label)
        size = dict(sizes)[name][label]
        assert launch.stats[j, wr] * traffic.SECTOR == size < copy_bytes * (SHAPE.num_experts if label == "t_ptr" else 1)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the route kernel reduces over padding rows
def test_extrapolation_in_batch_is_exact_on_whole_tiles():
    """Counts fitted as a + b·B from B = b0 and 2 b0 give B = 3 b0 exactly (l = n = 16: B·l fills
    whole tiles of the forward's 128 rows at every multiple of b0 = 8 images)."""
    shape = LayerShape("tiny-l16", 4, 4, 4, 1, 4, 16, 16, cpu_batch=4, gpu_batch=12)
    b0 = traffic.whole_tiles_batch(shape, "bf16")
    assert b0 == 8
    runs = {b: traffic.trace_layer(shape, b, "bf16", "nchw", "forward", distinct=4) for b in (b0, 2 * b0, 3 * b0)}
    fitted = traffic.extrapolate({b0: runs[b0], 2 * b0: runs[2 * b0]}, 3 * b0)
    measured = runs[3 * b0].launches
    assert [l.name for l in fitted] == [l.name for l in measured]
    for f, m in zip(fitted, measured):
        assert f.programs == m.programs, f.name
        assert (f.stats == m.stats).all(), f.name
        assert f.flops == pytest.approx(m.flops), f.name


def test_floor_flops_match_the_ops_registered_formula():
    """traffic_model.layer_flops is SPEC section 4 as op.py registers it for FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from baselines import make_layer, randomize_router

    layer = make_layer(SHAPE, "triton", "cpu", torch.float32)
    randomize_router(layer)
    x = torch.randn(SHAPE.input_shape(2), requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            layer(x)
    with FlopCounterMode(display=False) as both:
        layer(x).sum().backward()
    assert fwd.get_total_flops() == tm.layer_flops(SHAPE, 2, "forward")
    assert both.get_total_flops() == tm.layer_flops(SHAPE, 2, "forward+backward")

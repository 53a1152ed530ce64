"""The hardware side of bench/traffic.py: device constants (with their sources), the per-launch
time model, and the floors the modeled time is compared with.  Everything here is a MODEL:
no number in this file was measured on the GPUs it describes by this project.

Per launch (one Triton kernel or one torch op the layer runs):

    t = max(L2<->SM bytes / L2 bandwidth * fill,  DRAM bytes / HBM bandwidth,
            sum over dot classes of FLOPs / rate(class) * fill)  +  launch overhead
    fill = SMs / min(programs, SMs)   (a grid smaller than the GPU uses only `programs` SMs,
                                       and an SM's L2 port and tensor cores are 1/SMs of the chip)

summed over the launches of a pass.  Floors (what the layer cannot go below):

    bytes  forward: read x + write y + read weights and router once;
           forward+backward adds read dy, read x again, read weights again, write dx, write dW
           (= bench/gpu_check.py's floor_bytes; tests/test_traffic.py keeps them equal)
    FLOPs  docs/SPEC.md section 4 (concat): forward 2·B·n·d·k + 2·B·k·l·d·m; backward adds the
           experts' dX and dW, 2·(2·B·k·l·d·m), and the router gradient through the softmax gate,
           2·(2·B·k·l·d) (op.py's registered formula; not counted: recomputing unsaved pre-activations)
    floor = max(bytes / HBM bandwidth, FLOPs / rate of the dtype's dot class)

and the dense twin's floor: an nn.Conv2d(C, out, kernel=stride=p) over every patch, x + y + W
bytes (forward; forward+backward as above) and 2·B·n·d·out FLOPs (x3 with backward).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SECTOR_BYTES = 32

# Counted FLOP/s of one tl.dot by operand class (2·M·N·K per dot, the full tile).
#   16bit  bf16/fp16 tensor cores: ~790 TFLOP/s achievable on H100/H200 (GPU.md; 80% of the
#          989.5 TFLOP/s dense spec sheet figure, same GH100 compute on both)
#   tf32   half the 16-bit rate (494.7 TFLOP/s dense spec), at the same 80%: 395
#   tf32x3 fp32 inputs as 3 tf32 products (launch.dot_precision's default for fp32): 395 / 3
#   ieee   exact fp32 FMA on CUDA cores: 80% of 66.9 TFLOP/s
#   fp8 / int8: twice the 16-bit rate; bf16x3 / bf16x6 (newer Triton): 3 / 6 16-bit products
DOT_RATES = {
    "16bit": 790e12,
    "tf32": 395e12,
    "tf32x3": 395e12 / 3,
    "bf16x3": 790e12 / 3,
    "bf16x6": 790e12 / 6,
    "ieee": 0.8 * 66.9e12,
    "fp8": 1580e12,
    "int8": 1580e12,
}


@dataclass(frozen=True)
class Device:
    name: str
    hbm_bytes_per_s: float
    l2_bytes_per_s: float
    sms: int
    launch_s: float
    dot_flops_per_s: dict = field(default_factory=lambda: dict(DOT_RATES))

    def as_dict(self) -> dict:
        return asdict(self)


# Per-launch overhead: 2 us, an assumption.  NVIDIA's CUDA Graphs post measures about 1 us of
# overhead per short kernel launched back to back in one stream (3.8 us per 2.9 us kernel); a
# dependent grid also ramps up and drains, so twice that.  Python/CPU launch cost (Triton's
# launcher: tens of us) is not in it: it overlaps with GPU work or is removed by a CUDA graph.
LAUNCH_S = 2e-6

# HBM: measured copy bandwidth (GPU.md; spec sheets: 3.35 and 4.8 TB/s).
# L2 -> SM: te42kyfo/gpu-benches gpu-l2-cache (every SM reading a buffer that fits in L2, data
# sets 10-40 MB): H200 measures 9.7-10.1 TB/s (gpu-l2-cache/h200.txt); H100 PCIe 6.9 TB/s with
# 114 SMs at <= 1.755 GHz (h100_pcie.txt), x 132/114 SMs x 1.98/1.755 GHz = 9.0 TB/s for the
# H100 SXM (same GH100 die and L2 as the H200, so 9.0 is the conservative end).
H100 = Device("H100 SXM", hbm_bytes_per_s=3.0e12, l2_bytes_per_s=9.0e12, sms=132, launch_s=LAUNCH_S)
H200 = Device("H200 SXM", hbm_bytes_per_s=4.8e12, l2_bytes_per_s=9.7e12, sms=132, launch_s=LAUNCH_S)
DEVICES = (H100, H200)

SOURCES = [
    "HBM: measured copy bandwidth, /work/shared/GPU.md runbook (H100 ~3.0 TB/s, H200 ~4.8 TB/s; "
    "spec 3.35 / 4.8 TB/s)",
    "L2->SM: te42kyfo/gpu-benches gpu-l2-cache (github.com/te42kyfo/gpu-benches): H200 9.7-10.1 TB/s "
    "for 10-40 MB data sets (h200.txt); H100 PCIe 6.9 TB/s (h100_pcie.txt, 114 SMs, <= 1.755 GHz), "
    "scaled to the SXM's 132 SMs at 1.98 GHz: 9.0 TB/s",
    "Tensor cores: ~790 TFLOP/s bf16/fp16 achievable (GPU.md; 80% of the 989.5 TFLOP/s dense spec); "
    "tf32 half of it; fp32 as tf32x3 = 3 tf32 products (launch.dot_precision); exact fp32 FMA 80% of 66.9",
    "Launch overhead 2 us per launch (assumption: ~1 us back-to-back launch overhead per NVIDIA's "
    "'Getting Started with CUDA Graphs' post, doubled for the ramp-up/drain of a dependent grid)",
    "SMs: 132 on both (H100 SXM5, H200 SXM)",
]


def dot_class(dtype: str, precision: str) -> str:
    """Class of one tl.dot from its operand dtype ('bf16', 'fp16', 'fp32', 'fp8e4nv', ...) and
    input_precision ('tf32', 'tf32x3', 'ieee', ...)."""
    dtype, precision = dtype.lower(), precision.lower()
    if dtype in ("bf16", "fp16"):
        return "16bit"
    if dtype.startswith("fp8"):
        return "fp8"
    if dtype in ("i8", "int8", "u8"):
        return "int8"
    if dtype == "fp32" and precision in DOT_RATES:
        return precision
    return "ieee"


def launch_time(dev: Device, l2_bytes: float, dram_bytes: float, flops: dict, programs) -> tuple[float, str]:
    """Modeled seconds of one launch and what bounds it: 'L2', 'DRAM', 'dot', or 'launch' where
    the overhead is more than the largest term.  programs: the grid size (None: a torch op,
    assumed to fill the GPU)."""
    fill = 1.0 if not programs else dev.sms / min(max(programs, 1), dev.sms)
    terms = {
        "L2": l2_bytes / dev.l2_bytes_per_s * fill,
        "DRAM": dram_bytes / dev.hbm_bytes_per_s,
        "dot": sum(f / dev.dot_flops_per_s[c] for c, f in flops.items()) * fill,
    }
    bound = max(terms, key=terms.get)
    t = terms[bound]
    return t + dev.launch_s, ("launch" if dev.launch_s > t else bound)


# ---------------------------------------------------------------------------------------------
# floors


def layer_flops(shape, batch: int, pass_name: str, gate: str = "softmax") -> int:
    """SPEC section 4 (concat combine), as op.py's registered FLOP formulas count them."""
    n, d, k, l, m = shape.num_patches, shape.patch_dim, shape.num_experts, shape.top_l, shape.expert_features
    routing = 2 * batch * n * d * k
    experts = 2 * batch * k * l * d * m
    fwd = routing + experts
    if pass_name == "forward":
        return fwd
    router_grad = {"softmax": 2 * (2 * batch * k * l * d), "softmax_all": 2 * routing}.get(gate, 0)
    return fwd + 2 * experts + router_grad


def layer_floor_bytes(shape, batch: int, elt: int, pass_name: str) -> int:
    """bench/gpu_check.py's floor_bytes (unpooled)."""
    x = batch * shape.in_channels * shape.height * shape.width
    y = batch * shape.out_channels * shape.num_patches
    w = shape.num_experts * shape.expert_features * shape.patch_dim + shape.num_experts * shape.patch_dim
    fwd = x + y + w
    return elt * (fwd if pass_name == "forward" else fwd + y + x + w + x + w)


def activation_min_bytes(shape, batch: int, elt: int, pass_name: str) -> int:
    """What must cross for the activations: forward read x + write y; forward+backward adds read
    dy, read x again, write dx."""
    x = batch * shape.in_channels * shape.height * shape.width
    y = batch * shape.out_channels * shape.num_patches
    return elt * (x + y if pass_name == "forward" else 3 * x + 2 * y)


def dense_floor_bytes(shape, batch: int, elt: int, pass_name: str) -> int:
    x = batch * shape.in_channels * shape.height * shape.width
    y = batch * shape.out_channels * shape.num_patches
    w = shape.out_channels * shape.patch_dim
    fwd = x + y + w
    return elt * (fwd if pass_name == "forward" else fwd + y + x + w + x + w)


def dense_flops(shape, batch: int, pass_name: str) -> int:
    fwd = 2 * batch * shape.num_patches * shape.patch_dim * shape.out_channels
    return fwd if pass_name == "forward" else 3 * fwd


def dtype_dot_class(dtype_name: str) -> str:
    """The dot class the kernels use for a layer dtype (fp32: tf32x3, launch.dot_precision's default)."""
    return "16bit" if dtype_name in ("bf16", "fp16") else "tf32x3"


def floor_time(dev: Device, nbytes: float, flops: float, dtype_name: str) -> float:
    return max(nbytes / dev.hbm_bytes_per_s, flops / dev.dot_flops_per_s[dtype_dot_class(dtype_name)])


def sectors_of(nbytes: int) -> int:
    return math.ceil(nbytes / SECTOR_BYTES)

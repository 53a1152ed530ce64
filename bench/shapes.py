"""The benchmark shapes: one definition, shared by the suite, compute_savings.py and gpu_check.py.

Each shape is one pMoE layer (concat combine, softmax gate, ReLU, no bias) and its dense twin,
an nn.Conv2d(in_channels, out_channels, kernel=stride=patch_size) with the same total neurons.
`cpu_batch` is the batch of the CPU targets (the paper's batch, 20, for the MNIST layers);
`gpu_batch` is a real training size.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    name: str
    in_channels: int
    height: int
    width: int
    patch_size: int
    num_experts: int
    top_l: int
    out_channels: int
    cpu_batch: int
    gpu_batch: int
    combine: str = "concat"

    @property
    def num_patches(self) -> int:
        return (self.height // self.patch_size) * (self.width // self.patch_size)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size ** 2

    @property
    def expert_features(self) -> int:
        return self.out_channels // self.num_experts if self.combine == "concat" else self.out_channels

    def batch(self, device_type: str) -> int:
        return self.gpu_batch if device_type == "cuda" else self.cpu_batch

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.in_channels, self.height, self.width)

    def describe(self) -> str:
        return (f"C={self.in_channels} {self.height}x{self.width} p={self.patch_size} n={self.num_patches} "
                f"d={self.patch_dim} k={self.num_experts} l={self.top_l} out={self.out_channels}")


# The paper's MNIST layer: 112x112 images as a 4x4 grid of 28x28 tiles (n = 16, d = 784).
# Separate training: k = 2, l = 2, 20 neurons per expert; joint training: k = 8, l = 6, 5 per expert.
MNIST_SEPARATE = LayerShape("mnist-k2-l2", 1, 112, 112, 28, 2, 2, 40, cpu_batch=20, gpu_batch=1024)
MNIST_JOINT = LayerShape("mnist-k8-l6", 1, 112, 112, 28, 8, 6, 40, cpu_batch=20, gpu_batch=1024)
# The authors' WRN-28-10 pMoE head: 640 channels at 8x8, 1x1 patches, k = 4, l = 16, 4 x 160 out.
WRN = LayerShape("wrn-pmoe", 640, 8, 8, 1, 4, 16, 640, cpu_batch=64, gpu_batch=256)
# A large layer where the saving should show: n = 256, d = 1024, k = 8, l = 32, 8 x 128 out.
LARGE = LayerShape("large", 256, 32, 32, 2, 8, 32, 1024, cpu_batch=16, gpu_batch=64)

SHAPES: dict[str, LayerShape] = {s.name: s for s in (MNIST_SEPARATE, MNIST_JOINT, WRN, LARGE)}


def tiny(shape: LayerShape) -> LayerShape:
    """A shrunken copy for smoke tests (same k, l <= n, few channels, batch 2)."""
    grid = 4
    p = min(shape.patch_size, 2)
    k = min(shape.num_experts, 4)
    return LayerShape(shape.name + "-tiny", min(shape.in_channels, 4), grid * p, grid * p, p, k,
                      min(shape.top_l, grid * grid // 2), 4 * k, cpu_batch=2, gpu_batch=2, combine=shape.combine)

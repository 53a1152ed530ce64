"""Fused Triton kernels for pMoE, installed as `pmoe.kernels` (issue: fused Triton kernels)."""

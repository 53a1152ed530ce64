"""pmoe: patch-level routed Mixture-of-Experts layers for CNNs, with fused Triton kernels.

`kernels/` is installed as `pmoe.kernels` (a bare top-level `kernels` would collide with
other published packages).
"""
from setuptools import setup

setup(
    name="pmoe",
    version="0.1.0",
    description="Patch-level routed Mixture-of-Experts (pMoE) layers for CNNs, fused in Triton",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["pmoe", "pmoe.models", "pmoe.data", "pmoe.experiments", "pmoe.kernels"],
    package_dir={"pmoe": "pmoe", "pmoe.kernels": "kernels"},
    # Tested (CI, .ci/run): torch 2.13 + Triton 3.6, torch 2.14 + Triton 3.8 and 3.9; the README's
    # version table says what ran where.
    install_requires=[
        "torch>=2.11,<2.15",
        "numpy",
        "tqdm",
        "matplotlib",
        "scikit-learn",  # ships the 8x8 handwritten digits behind the default offline data
    ],
    extras_require={
        # Triton is optional: the CPU path imports and works without it.  CUDA builds of torch
        # bring the Triton they pin; "test" does not name it, so pip never downgrades a newer one.
        "triton": ["triton>=3.6,<3.10"],
        # torchvision is only an optional convenience; mnist-patch/cifar10 read the files directly.
        "vision": ["torchvision"],
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis"],
        "bench": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["pmoe=pmoe.cli:main"]},
)

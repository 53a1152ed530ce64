"""Which machine and which versions produced a number: printed by every script, saved in every JSON."""
from __future__ import annotations

import datetime
import os
import platform

import torch

from pmoe.torch_backend import cpuinfo


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # triton is optional on CPU
        return "absent"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    arch = platform.processor() or platform.machine()
    return f"{cpuinfo('model name')} {arch}".strip()


def machine_info(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def machine_line(device: torch.device) -> str:
    info = machine_info(device)
    return ("# machine: {device} ({device_type}, {cpu_count} CPUs, {torch_threads} torch threads) | "
            "torch {torch} | triton {triton} | CUDA {cuda} | python {python} | {date}").format(**info)

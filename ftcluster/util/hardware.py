"""What this machine is, for manifests, hardware profiles and benchmark reports."""

from __future__ import annotations

import glob
import platform
from pathlib import Path

# What the kernel shows of a GPU torch could use: NVIDIA's devices, AMD's compute interface, WSL's GPU.
_GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_device_nodes() -> bool:
    """Whether this machine shows a GPU device node. False means torch would find no GPU either, known without
    importing torch (a second or two of the start); True means asking torch (torch.cuda.is_available())."""
    return any(glob.glob(node) for node in _GPU_DEVICE_NODES)


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch where no GPU device node exists."""
    if not gpu_device_nodes():
        return False
    import torch

    return torch.cuda.is_available()

"""Peak memory of this process: the device allocator's high-water marks on GPU, the resident set's on CPU.

Written per rank at the end of every SPMD run (output_dir/peak_memory.json), which is what `ftcluster
bench` reports and checks the planner's prediction against.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

from ftcluster import atomic, dist

PEAK_FILE = "peak_memory.json"


_start: dict = {}


def mark_start() -> None:
    """Called before any model state exists. On CPU the resident set then is the process itself (interpreter,
    torch, transformers, DeepSpeed: hundreds of MiB the planner's tensor arithmetic does not count); on GPU
    the allocator starts from zero anyway."""
    if not torch.cuda.is_available():
        _start["baseline_bytes"] = _status_bytes("VmRSS")


def this_rank() -> dict:
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        return {"device": torch.cuda.get_device_name(device), "peak_bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.max_memory_reserved(device)}
    # VmHWM: the most resident memory this process ever had, libraries included, as the OS counts it.
    return {"device": "cpu", "peak_bytes": _status_bytes("VmHWM"), **_start}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def record(output_dir: str, rank: int) -> None:
    """Collective: every rank's peak, written by rank 0 atomically."""
    mine = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), **this_rank()}
    ranks = dist.all_gather_objects(mine)
    if rank == 0:
        atomic.write_text(Path(output_dir) / PEAK_FILE, json.dumps(ranks, indent=2))

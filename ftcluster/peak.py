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


def this_rank() -> dict:
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        return {"device": torch.cuda.get_device_name(device), "peak_bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.max_memory_reserved(device)}
    return {"device": "cpu", "peak_bytes": _resident_high_water_mark()}


def _resident_high_water_mark() -> int:
    """VmHWM: the most resident memory this process ever had (libraries included, as the OS counts it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def record(output_dir: str, rank: int) -> None:
    """Collective: every rank's peak, written by rank 0 atomically."""
    mine = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), **this_rank()}
    ranks = dist.all_gather_objects(mine)
    if rank == 0:
        atomic.write_text(Path(output_dir) / PEAK_FILE, json.dumps(ranks, indent=2))

"""Peak memory of this process: the device allocator's high-water marks on GPU, the resident set's on CPU.

Written per rank at the end of every SPMD run (output_dir/peak_memory.json), which is what `ftcluster
bench` reports and checks the planner's prediction against. The planner counts tensors; on GPU the
allocator counts the same thing. On CPU the resident set also holds the process itself, so each rank also
records `baseline_bytes`: what is resident after the first step that is not a tensor the engine holds
(interpreter, libraries, data, communication buffers), which the bench adds to the prediction.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import socket
from pathlib import Path

import torch

from ftcluster.observe.held_memory import held_storages
from ftcluster.util import atomic, dist

PEAK_FILE = "peak_memory.json"
# glibc's mallopt parameter number (malloc.h) and the threshold exact_cpu_memory sets.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 * 1024

_recorded: dict = {}


def return_freed_memory() -> bool:
    """Make glibc map every block over 64 KiB on its own, so that freeing a tensor hands its pages back to
    the OS at once (trainer.exact_cpu_memory). By default glibc serves blocks below a threshold from its
    heaps, keeps what is freed there, and raises that threshold to the largest block freed so far (up to
    32 MiB): activations end up in heap memory that is never handed back, and the resident set grows step
    after step. On SmolLM2 with 2 ranks it reached 3.8 GiB against 2.0 GiB of live tensors; with the fixed
    threshold the peak stays within a few MiB of the live tensors, for steps about 15% slower in one run
    (page faults).
    Returns False where the C library has no mallopt (not glibc)."""
    try:
        mallopt = _libc().mallopt
    except AttributeError:
        return False
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


def note_baseline(engine) -> None:
    """Called after the first step: on CPU, the resident set less the pages of the engine's tensors that are
    resident (a buffer allocated whole but written only in part, like DeepSpeed's reduce bucket, counts only
    the pages written)."""
    if torch.cuda.is_available():
        return
    tensors = sum(_resident_bytes(s) for s in held_storages(engine) if s.device.type == "cpu")
    _recorded["baseline_bytes"] = _status_bytes("VmRSS") - tensors


def this_rank() -> dict:
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        return {"device": torch.cuda.get_device_name(device), "peak_bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.max_memory_reserved(device)}
    # VmHWM: the most resident memory this process ever had, libraries included, as the OS counts it.
    return {"device": "cpu", "peak_bytes": _status_bytes("VmHWM"), **_recorded}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _resident_bytes(storage) -> int:
    """Bytes of a CPU storage's pages in memory, by mincore(2)."""
    if storage.nbytes() == 0:
        return 0
    page = mmap.PAGESIZE
    start = storage.data_ptr() // page * page
    pages = -(-(storage.data_ptr() + storage.nbytes() - start) // page)
    flags = (ctypes.c_ubyte * pages)()
    if _libc().mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), flags) != 0:
        return storage.nbytes()  # not a mapping mincore can read: count it whole
    return min(storage.nbytes(), page * sum(f & 1 for f in flags))


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library this process runs on, loaded once."""
    return ctypes.CDLL(None, use_errno=True)


def record(output_dir: str, rank: int) -> None:
    """Collective: every rank's peak, written by rank 0 atomically."""
    mine = {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), **this_rank()}
    ranks = dist.all_gather_objects(mine)
    if rank == 0:
        atomic.write_text(Path(output_dir) / PEAK_FILE, json.dumps(ranks, indent=2))

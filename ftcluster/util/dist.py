"""The process group as the training code sees it: rank, world size, and the few collectives it uses.

Launchers create the group (the Ray rank actors do, with gloo on CPU and NCCL on GPU); a single process with
no launcher gets a group of one, so the same code runs under pytest and in a debugger.

Where tensors live: `device()` is the one source of the compute device (batches, cached tables, partial
sums all go there), and `to_host()` the one way values come back from it. Stages keep their per-step sums
on the device and bring them back once per step or evaluation, never per micro-batch: on a GPU each trip
to the host waits for the queued kernels. tests/test_device_discipline.py replaces both to run every stage
function on the `meta` device, where any tensor left on the CPU, or read back another way, fails.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ftcluster.util.net import free_port


def setup(timeout_s: int = 1800) -> None:
    # not at the top: the driver and the launchers import this module and need no DeepSpeed
    import deepspeed
    import deepspeed.ops

    # The shared-memory allreduce op compiles C++ on first use (~2 min on CPU); gloo does the job.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if torch.cuda.is_available() and not dist.is_initialized():
        # This process picks its GPU (launcher=processes and inline: LOCAL_RANK). Before the group exists,
        # because NCCL binds the group to the current device and the first collectives (the placement gather)
        # stage their tensors there: without it every rank of a machine would run on cuda:0. Where a launcher
        # made the group it has chosen the device too (the Ray rank actors set it, an RL actor sees one GPU).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # DeepSpeed builds groups of its own (ZeRO's data-parallel group...) without a timeout, so torch
    # gives them its default (30 min), not the launcher's: make the default ours, so that every
    # collective honours launcher.collective_timeout_s.
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    # Reuses the launcher's group when there is one.
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device() -> torch.device:
    """The device this rank computes on: the GPU made current for it (by setup(), or by the launcher that
    made the group), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's values on the host: the one place stage code waits for the device (see the module doc)."""
    return tensor.detach().cpu()


def all_reduce_sum(values: list[float] | torch.Tensor) -> torch.Tensor:
    """Sums across ranks in float64, so token counts and loss sums stay exact enough to compare runs.
    `values`: host numbers or a tensor on the device (a stage's partial sums); the result is on the host."""
    tensor = torch.as_tensor(values, dtype=torch.float64).clone()  # the caller's tensor stays as it was
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.to(device())
        dist.all_reduce(tensor)
    return to_host(tensor)


def all_gather_objects(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

"""What each rank of a real run actually holds, by role, so that the planner's formulas can be checked
against it: `output_dir/memory.json`, one entry per rank, written after the first optimizer step (torch's
AdamW creates its moments at its first step; DeepSpeed 0.19 no longer runs a step at construction).

Counted from the engine's own objects, each tensor storage once (a view counts as the buffer it is
carved from, padding included; a storage shared by two roles counts for the first):
- param_bytes: the module's parameters (under ZeRO-1/2 views into DeepSpeed's flat buffers) and, under
  ZeRO-3, each parameter's partition (`ds_tensor`) beside whatever full copy it keeps (persistent ones).
- optimizer_bytes: the tensors the torch optimizer updates (DeepSpeed's fp32 master partitions
  `single_partition_of_fp32_groups` / `fp32_partitioned_groups_flat`, or the weights themselves) and its
  state (Adam's moments and step counters).
- grad_bytes: gradients held at that moment and DeepSpeed's gradient buffers (ZeRO-3's partition
  buffer, the reduce buckets).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ftcluster.util import atomic, dist

ROLES = ("param_bytes", "optimizer_bytes", "grad_bytes")


def held_bytes(engine) -> dict[str, int]:
    """{"param_bytes", "optimizer_bytes", "grad_bytes"} this rank holds, on any device."""
    return {role: sum(s.nbytes() for s in storages) for role, storages in _storages_by_role(engine).items()}


def held_storages(engine) -> list:
    """Every storage counted in held_bytes, once."""
    return [s for storages in _storages_by_role(engine).values() for s in storages]


def _storages_by_role(engine) -> dict[str, list]:
    seen: set[tuple[str, int]] = set()

    def unique(tensors) -> list:
        found = []
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            found.append(storage)
        return found

    params = list(engine.module.parameters())
    wrapper = engine.optimizer
    torch_optimizer = getattr(wrapper, "optimizer", wrapper)  # DeepSpeed's wrappers hold the torch optimizer
    # ZeRO-3 hands the optimizer its fp32 partitions only for the update (param_groups are empty between
    # steps); the state is keyed by them all along.
    updated = [p for group in torch_optimizer.param_groups for p in group["params"]] + list(torch_optimizer.state)
    state = [value for per_param in torch_optimizer.state.values() for value in per_param.values()]
    held = {"param_bytes": unique([p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]),
            "optimizer_bytes": unique(updated + state)}
    held["grad_bytes"] = unique([p.grad for p in params + updated] + _gradient_buffers(wrapper))
    return held


def _gradient_buffers(wrapper) -> list:
    """DeepSpeed's own gradient storage (ZeRO-2/3), wherever this version keeps it."""
    found = [getattr(wrapper, "grad_partitions_flat_buffer", None), getattr(wrapper, "grads_in_partition", None)]
    for bucket in (getattr(wrapper, "ipg_buckets", None) or {}).values():
        buffer = getattr(bucket, "buffer", None)
        found += buffer if isinstance(buffer, list) else [buffer]
    for grads in (getattr(wrapper, "averaged_gradients", None) or {}).values():
        found += grads if isinstance(grads, list) else [grads]
    return found


def record(engine, output_dir: str | Path) -> None:
    """Collective: every rank's held_bytes, written by rank 0 to output_dir/memory.json."""
    per_rank = dist.all_gather_objects({"rank": dist.rank(), **held_bytes(engine)})
    if dist.rank() == 0:
        atomic.write_text(Path(output_dir) / "memory.json", json.dumps(per_rank, indent=2) + "\n")

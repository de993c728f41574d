"""Bytes each rank sends per optimizer step under each ZeRO stage, and how long that takes.

Ring collectives over W ranks: a reduce-scatter or an all-gather of S bytes sends S (W-1)/W bytes per rank,
an all-reduce twice that. With T trainable and Ψ total parameters, b bytes per element, A micro-batches
per step:
- ZeRO-0: all-reduce of the gradients once per step: 2 T b.
- ZeRO-1: reduce-scatter of the gradients once per step, all-gather of the updated weights: 2 T b.
- ZeRO-2: reduce-scatter of the gradients after every micro-batch (A T b), all-gather once: (A + 1) T b.
- ZeRO-3: per micro-batch, all-gather of the weights for the forward and again for the backward (2 Ψ b,
  frozen weights too) and reduce-scatter of the gradients (T b): 3 Ψ b per micro-batch for full
  fine-tuning, the 3x of the ZeRO papers. Tensors ZeRO-3 keeps whole (persistent) are not gathered; their
  gradients are all-reduced.
On CUDA, ftcluster's DeepSpeed config turns overlap_comm on for ZeRO-2 and ZeRO-3, so the gradient
reduce-scatter runs beside the backward and part of this time hides behind compute; the prediction still adds
it in full (an upper bound). On CPU (gloo, no side streams) it is off, and the time adds to compute.
"""

from __future__ import annotations

from ftcluster.plan.memory import zero3_persistent
from ftcluster.plan.setup import TrainSetup
from ftcluster.plan.shape import Tensor


def comm_bytes_per_step(tensors: list[Tensor], setup: TrainSetup) -> int:
    """Bytes this rank sends per optimizer step (0 on one rank)."""
    w = setup.world
    if w == 1:
        return 0
    b, passes = setup.dtype_bytes, setup.grad_accum
    trainable = sum(t.numel for t in tensors if t.trainable)
    if setup.zero_stage in (0, 1):
        elements = 2 * trainable
    elif setup.zero_stage == 2:
        elements = passes * trainable + trainable
    else:
        persistent = {t.name for t in zero3_persistent(tensors, setup)}
        gathered = sum(t.numel for t in tensors if t.name not in persistent)
        whole = sum(t.numel for t in tensors if t.name in persistent and t.trainable)
        sharded_grads = trainable - whole
        elements = passes * (2 * gathered + sharded_grads + 2 * whole)
    return int(b * elements * (w - 1) / w)


def comm_seconds(tensors: list[Tensor], setup: TrainSetup, gpus_per_node: int, intra_gb_per_s: float,
                 inter_gb_per_s: float, efficiency: float) -> float:
    """A ring is as fast as its slowest link: NVLink-class within a node, the network across nodes."""
    bandwidth = intra_gb_per_s if setup.world <= gpus_per_node else inter_gb_per_s
    return comm_bytes_per_step(tensors, setup) / (bandwidth * 1e9 * efficiency)

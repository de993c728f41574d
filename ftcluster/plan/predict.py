"""predict(cfg, profile): per-rank memory and step time of one composed train config on one hardware
profile, from the model's config.json alone. This is what `ftcluster plan` tabulates for its candidates
and what a benchmark shows beside what it measured.

Step time = compute + communication + offload + the optimizer's update, one after the other (ftcluster's
DeepSpeed config does not overlap communication):
- compute: hardware FLOPs of the rank's tokens (ftcluster.plan.flops) / (peak x profile.efficiency);
- communication: ftcluster.plan.comms over the intra-node links, or the network once the ranks span nodes;
- the update streams the fp32 master partition, its gradient and Adam's two moments in and three out
  (28 bytes per element) through device memory, or host memory with optimizer offload, which also moves
  the gradients down and the weights up over PCIe; parameter offload fetches the weights twice per
  micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from omegaconf import DictConfig

from ftcluster.plan.comms import comm_bytes_per_step, comm_seconds
from ftcluster.plan.flops import TokenFlops, training_flops_per_token
from ftcluster.plan.memory import RankMemory, optimizer_slices, rank_memory
from ftcluster.plan.profiles import GIB, ClusterProfile
from ftcluster.plan.setup import TrainSetup, setup_from_config
from ftcluster.plan.shape import ModelShape, Tensor, config_folder, parameter_tensors, read_shape

UPDATE_BYTES_PER_ELEMENT = 28  # AdamW reads weight, gradient, two moments (fp32) and writes three back


@dataclass(frozen=True)
class Prediction:
    memory: RankMemory
    peak_bytes_per_rank: int  # on the device; on a CPU profile host memory is the same memory and counts too
    usable_bytes_per_rank: int
    fits: bool  # the peak fits the device and what is offloaded fits the hosts
    flops_per_token: TokenFlops
    step_time_s: float
    time_s: dict  # compute, comm, offload, update
    tokens_per_s: float  # the whole cluster's
    tflops: float  # model TFLOP/s reached per device
    mfu: float
    comm_bytes_per_step: int

    def as_dict(self) -> dict:
        out = asdict(self)
        out["memory"] = self.memory.as_dict()
        return out


def predict(cfg: DictConfig, profile: ClusterProfile) -> Prediction:
    """cfg as ftcluster.config.compose gives it (launcher.workers is the number of devices)."""
    shape = read_shape(config_folder(cfg))
    tensors = parameter_tensors(shape, cfg.peft)
    return predict_shape(shape, tensors, setup_from_config(cfg, on_gpu=profile.device == "gpu"), profile)


def predict_shape(shape: ModelShape, tensors: list[Tensor], setup: TrainSetup, profile: ClusterProfile) -> Prediction:
    memory = rank_memory(shape, setup, tensors)
    on_cpu = profile.device == "cpu"
    peak = memory.peak + (memory.host if on_cpu else 0)
    usable = profile.usable_bytes()
    ranks_per_node = min(setup.world, profile.gpus_per_node)
    host_fits = on_cpu or profile.host_memory_gib is None or memory.host * ranks_per_node <= profile.host_memory_gib * GIB
    flops = training_flops_per_token(shape, tensors, setup.seq_len, setup.checkpointing)
    tokens_per_rank = setup.tokens_per_micro_batch * setup.grad_accum
    peak_flops = profile.peak_flops(setup.precision)
    times = {
        "compute": flops.hardware * tokens_per_rank / (peak_flops * profile.efficiency),
        "comm": comm_seconds(tensors, setup, profile.gpus_per_node, profile.intra_node_gb_per_s,
                             profile.inter_node_gb_per_s, profile.network_efficiency),
        "offload": _offload_seconds(tensors, setup, profile),
        "update": _update_seconds(tensors, setup, profile, ranks_per_node),
    }
    step = sum(times.values())
    tokens_per_s = tokens_per_rank * setup.world / step
    tflops = flops.model * tokens_per_s / setup.world / 1e12
    return Prediction(memory=memory, peak_bytes_per_rank=peak, usable_bytes_per_rank=usable,
                      fits=peak <= usable and host_fits, flops_per_token=flops, step_time_s=step, time_s=times,
                      tokens_per_s=tokens_per_s, tflops=tflops, mfu=tflops * 1e12 / peak_flops,
                      comm_bytes_per_step=comm_bytes_per_step(tensors, setup))


def _update_seconds(tensors: list[Tensor], setup: TrainSetup, profile: ClusterProfile, ranks_per_node: int) -> float:
    streamed = UPDATE_BYTES_PER_ELEMENT * sum(optimizer_slices(tensors, setup))
    if setup.offload_optimizer and profile.host_memory_gb_per_s:
        return streamed / (profile.host_memory_gb_per_s * 1e9 / ranks_per_node)
    return streamed / (profile.memory_gb_per_s * 1e9) if profile.memory_gb_per_s else 0.0


def _offload_seconds(tensors: list[Tensor], setup: TrainSetup, profile: ClusterProfile) -> float:
    if not profile.pcie_gb_per_s:  # a CPU: host memory is the device's
        return 0.0
    moved = 0
    if setup.offload_optimizer:
        moved += 2 * setup.dtype_bytes * sum(optimizer_slices(tensors, setup))  # gradients down, weights up
    if setup.offload_params:
        partition = sum(math.ceil(t.numel / setup.world) for t in tensors)
        moved += 2 * setup.grad_accum * setup.dtype_bytes * partition
    return moved / (profile.pcie_gb_per_s * 1e9)

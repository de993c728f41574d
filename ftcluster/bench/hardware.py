"""The hardware a suite runs on, as the planner sees it: the profile (conf/cluster/) for peak FLOP/s, the
name result files carry, a cell's FLOPs per token, and the planner's prediction to set beside what the
cell measured."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from ftcluster.errors import UserError
from ftcluster.plan.flops import training_flops_per_token
from ftcluster.plan.predict import predict
from ftcluster.plan.profiles import ClusterProfile, known_profiles, load_profile
from ftcluster.plan.shape import config_folder, parameter_tensors, read_shape

# torch.cuda.get_device_name() fragments -> profile, most specific first.
GPU_NAMES = [(("H100", "PCIE"), "h100_pcie"), (("H100",), "h100_sxm"), (("H200",), "h200"),
             (("A100", "40GB"), "a100_40gb"), (("A100",), "a100_80gb"), (("L40S",), "l40s")]


def cluster(name: str | None) -> ClusterProfile:
    """The profile by name, or this machine's; checked before any cell runs."""
    return load_profile(name or detected_profile())


def detected_profile() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    device = torch.cuda.get_device_name(0).upper()
    for fragments, profile in GPU_NAMES:
        if all(f in device for f in fragments):
            return profile
    raise UserError(f"no hardware profile matches this machine's {torch.cuda.get_device_name(0)}; pick one with "
                    f"--cluster NAME ({', '.join(known_profiles())}) or write conf/cluster/<name>.yaml")


def machine_name() -> str:
    """What result files are named after: the profile this machine matches (cpu without a GPU)."""
    return detected_profile()


def for_cell(profile: ClusterProfile, cfg: DictConfig) -> ClusterProfile:
    """A CPU profile's device is one worker of launcher.cpus_per_worker cores: its peak scales with them."""
    if profile.device != "cpu" or cfg.launcher.cpus_per_worker == 1:
        return profile
    return load_profile(profile.name, cpus_per_worker=cfg.launcher.cpus_per_worker)


def flops_per_token(cfg: DictConfig) -> float:
    """Model FLOPs per trained token (no recomputation), as MFU counts them."""
    shape = read_shape(config_folder(cfg))
    tensors = parameter_tensors(shape, cfg.peft)
    return training_flops_per_token(shape, tensors, cfg.trainer.max_seq_len, cfg.model.gradient_checkpointing).model


def prediction(cfg: DictConfig, profile: ClusterProfile) -> dict:
    p = predict(cfg, profile)
    return {"peak_memory_bytes": p.peak_bytes_per_rank, "tokens_per_s": p.tokens_per_s,
            "step_time_s": p.step_time_s, "mfu": p.mfu, "fits": p.fits, "memory": p.memory.as_dict()}

"""strategy.precision=auto: which precision a run trains in, decided where its devices are known.

auto means bf16 when the workers have a CUDA GPU that supports it (Ampere and later), else fp32. fp16 is
never chosen by itself: it needs loss scaling, which a user should ask for knowingly. validate() resolves
auto once in the process that starts the workers (inside the allocation for launcher=slurm), so config.yaml,
manifest.json and every worker see the same concrete value.
"""

from __future__ import annotations

from typing import Optional

from omegaconf import DictConfig

from ftcluster.util import hardware

PRECISIONS = ("fp32", "bf16", "fp16")


def precision_for(requested: str, on_gpu: bool, bf16_supported: bool = True) -> str:
    """The concrete precision of `requested` (auto or one of PRECISIONS) on this kind of device."""
    if requested != "auto":
        return requested
    return "bf16" if on_gpu and bf16_supported else "fp32"


def local_precision(requested: str, use_gpu: Optional[bool] = None) -> str:
    """`requested` resolved on this machine. use_gpu (launcher.use_gpu): True trusts that the workers have GPUs
    even when this process sees none (a driver on a CPU head node), False forces CPU; None asks torch, where
    the machine shows a GPU device at all."""
    if requested != "auto":
        return requested
    # torch only where the machine shows a GPU: the driver checks the config before it starts anything
    cuda = use_gpu is not False and hardware.cuda_available()
    if use_gpu is False or (use_gpu is None and not cuda):
        return "fp32"
    import torch

    return precision_for(requested, on_gpu=True, bf16_supported=torch.cuda.is_bf16_supported() if cuda else True)


def resolve_precision(cfg: DictConfig) -> str:
    """Replace strategy.precision=auto in `cfg` by what it means here; the concrete value."""
    cfg.strategy.precision = local_precision(cfg.strategy.precision, cfg.launcher.use_gpu)
    return cfg.strategy.precision

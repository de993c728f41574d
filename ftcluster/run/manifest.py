"""manifest.json: what produced a run (command, code version, packages, hardware, world size, data), and
config.yaml's text. Both with secrets masked (ftcluster.util.secrets): a run folder is shared and copied."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from ftcluster.config import Derived
from ftcluster.util.hardware import cpu_model, cuda_available
from ftcluster.util.secrets import redact_args

PACKAGES = ["ftcluster", "torch", "deepspeed", "transformers", "peft", "ray", "hydra-core", "wandb", "datasets",
            "accelerate", "flash-attn"]


def manifest(cfg: DictConfig, derived: Derived, argv: list[str], stats: dict) -> dict:
    return {
        "command": " ".join([Path(sys.argv[0]).name, *redact_args(argv)]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": _git_sha(),
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "hardware": _hardware(),
        # strategy.precision after validate() resolved auto, and whether fp32 matmuls ran on TF32 (engine.enable_tf32).
        "precision": cfg.strategy.precision,
        "tf32": cuda_available(),
        "world_size": derived.world_size,
        "grad_accum_steps": derived.grad_accum_steps,
        "data_fingerprint": stats.get("fingerprint"),
    }


def _git_sha() -> str | None:
    source = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sha.stdout.strip() or None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hardware() -> dict:
    """Without a GPU, without importing torch (seconds of a driver's start): its build, CUDA or not, is in the
    version under packages (2.x.y+cu128, +cpu)."""
    info = {"machine": platform.machine(), "cpu_model": cpu_model(), "cpus": os.cpu_count(), "cuda": None}
    if cuda_available():
        import torch

        info["cuda"] = torch.version.cuda
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info

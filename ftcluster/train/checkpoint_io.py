"""A checkpoint's contents, written and read by the ranks (collective): DeepSpeed's model, optimizer and
scheduler shards, and every rank's RNG states. Where a checkpoint lives, how it is completed and which one a
resume takes is checkpoint.py's, which the launching process uses without importing torch.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ftcluster.train.checkpoint import TAG, begin, commit, read_state, step_path
from ftcluster.train.safe_load import weights_only_loads
from ftcluster.util import atomic, dist


def save(engine, output_dir: str | Path, step: int, trainer_state: dict, keep_last: int,
         exclude_frozen: bool) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    tmp = begin(output_dir, step) if dist.rank() == 0 else atomic.pending(step_path(output_dir, step))
    dist.barrier()
    save_engine(engine, tmp, exclude_frozen)
    dist.barrier()
    final = step_path(output_dir, step)
    if dist.rank() == 0:
        commit(tmp, {"step": step, **trainer_state}, keep_last)
    dist.barrier()
    return final


def save_engine(engine, folder: Path, exclude_frozen: bool) -> None:
    """Collective within the engine's group: its DeepSpeed shards and each rank's RNG state."""
    engine.save_checkpoint(str(folder), tag=TAG, exclude_frozen_parameters=exclude_frozen)
    torch.save(_rng_state(), Path(folder) / f"rng_rank{dist.rank()}.pt")


def load(engine, checkpoint: Path, exclude_frozen: bool) -> dict:
    """Restores model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    load_engine(engine, checkpoint, exclude_frozen)
    return read_state(checkpoint)


def load_engine(engine, folder: Path, exclude_frozen: bool) -> None:
    # A checkpoint folder can be handed over by anyone: nothing in it may run code when unpickled, including
    # inside DeepSpeed's load_checkpoint, which calls torch.load(weights_only=False) itself.
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True, load_module_strict=not exclude_frozen)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load {folder}")
        rng_file = Path(folder) / f"rng_rank{dist.rank()}.pt"
        if rng_file.is_file():  # absent when the world size changed; data order does not depend on it
            _set_rng_state(torch.load(rng_file))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

"""Atomic, resumable checkpoints under output_dir/checkpoints/step-N/.

A checkpoint is written into a hidden `.tmp-step-N` folder by every rank, completed with
trainer_state.json by rank 0 after a barrier, and only then renamed to `step-N`. A crash at any point
leaves either the previous checkpoints untouched or a `.tmp-*` folder that nothing ever reads.
Each holds DeepSpeed's model/optimizer/scheduler shards (tag `state`), each rank's RNG states, and the
trainer state (step, data position).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ftcluster.util import atomic, dist

TAG = "state"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Partial ones (.tmp-*) are never listed."""
    root = checkpoints_dir(output_dir)
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


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


def step_path(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step}"


def begin(output_dir: str | Path, step: int) -> Path:
    """The hidden folder a checkpoint is written into, empty (whatever a crashed attempt left is discarded)."""
    return atomic.begin_folder(step_path(output_dir, step))


def commit(tmp: Path, trainer_state: dict, keep_last: int) -> Path:
    """Complete a checkpoint: trainer_state.json last, then the rename that makes it visible, then the
    pruning to the newest keep_last (every path that saves goes through here, SPMD ranks and RL alike)."""
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    final = tmp.with_name(f"step-{trainer_state['step']}")
    atomic.swap_into_place(tmp, final)
    prune(final.parent.parent, keep_last)
    return final


def save_engine(engine, folder: Path, exclude_frozen: bool) -> None:
    """Collective within the engine's group: its DeepSpeed shards and each rank's RNG state."""
    engine.save_checkpoint(str(folder), tag=TAG, exclude_frozen_parameters=exclude_frozen)
    torch.save(_rng_state(), Path(folder) / f"rng_rank{dist.rank()}.pt")


def prune(output_dir: str | Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (0 keeps them all)."""
    for stale in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(stale)


def load(engine, checkpoint: Path, exclude_frozen: bool) -> dict:
    """Restores model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    load_engine(engine, checkpoint, exclude_frozen)
    return read_state(checkpoint)


def load_engine(engine, folder: Path, exclude_frozen: bool) -> None:
    load_path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=not exclude_frozen)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder}")
    rng_file = Path(folder) / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():  # absent when the world size changed; data order does not depend on it
        _set_rng_state(torch.load(rng_file, weights_only=False))


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

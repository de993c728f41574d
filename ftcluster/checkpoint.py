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

from ftcluster import dist
from ftcluster.atomic import swap_into_place

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
    root = checkpoints_dir(output_dir)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier attempt
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=TAG, exclude_frozen_parameters=exclude_frozen)
    torch.save(_rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.rank() == 0:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        swap_into_place(tmp, final)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    for stale in complete_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(stale)


def load(engine, checkpoint: Path, exclude_frozen: bool) -> dict:
    """Restores model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    load_path, _ = engine.load_checkpoint(str(checkpoint), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=not exclude_frozen)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint}")
    rng_file = checkpoint / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():  # absent when the world size changed; data order does not depend on it
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return read_state(checkpoint)


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

"""Atomic, durable, resumable checkpoints under output_dir/checkpoints/step-N/.

A checkpoint is written into a hidden `.tmp-step-N` folder by every rank, completed with
trainer_state.json by rank 0 after a barrier, synced to stable storage (every file and folder), and only
then renamed to `step-N` (the parent folder synced after). A crash, or a power loss, at any point leaves
either the previous checkpoints untouched or a `.tmp-step-*` folder that nothing reads and the next start
removes (clean_partial). Each holds DeepSpeed's model/optimizer/scheduler shards (tag `state`), each rank's
RNG states, and the trainer state (step, data position, and the size of every file written: `files`).

Which checkpoint a resume takes (latest_checkpoint): the newest whose state reads and whose files are all
there at their recorded size; an unreadable one is skipped with a message. One timeline: a run resumed from
a checkpoint older than the newest (resume=PATH, or an unreadable newest) moves the newer ones out of the
way, into checkpoints/abandoned-<UTC time>/ (abandon_after), where nothing looks for a checkpoint: resume=auto,
The launcher's restarts of the workers (the newest of the same launch) and keep-last-K (pruning) only ever see the checkpoints
of the run's current history. Nothing is deleted; resume=PATH to an abandoned one switches back.

The ranks write and read what is inside (checkpoint_io.py); this module, which imports no torch, is also the
launching process's.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from ftcluster.util import atomic

TAG = "state"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PARTIAL_DIR = re.compile(r"^\.tmp-step-\d+$")  # atomic.pending(step_path(...)): a checkpoint being written
ABANDONED_PREFIX = "abandoned-"


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


def latest_checkpoint(output_dir: str | Path, on_skip: Callable[[Path, str], None] | None = None) -> Path | None:
    """The newest usable checkpoint; each newer one that is not usable is passed to on_skip with the reason."""
    for path in reversed(complete_checkpoints(output_dir)):
        problem = unusable(path)
        if problem is None:
            return path
        if on_skip is not None:
            on_skip(path, problem)
    return None


def unusable(checkpoint: Path) -> str | None:
    """Why a resume cannot use this checkpoint (its state unreadable, a file missing or cut short), or None."""
    try:
        state = read_state(checkpoint)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return f"{STATE_FILE} holds no step"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{STATE_FILE} cannot be read ({exc})"
    files = state.get("files")
    if files is None:  # written before checkpoints listed their files: the engine's at least
        return None if any(checkpoint.rglob("*model_states.pt")) else "it holds no model states (*model_states.pt)"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def clean_partial(output_dir: str | Path) -> list[Path]:
    """At start: remove the `.tmp-step-N` folders an interrupted save left (nothing else). Returns them."""
    root = checkpoints_dir(output_dir)
    partial = [p for p in root.iterdir() if p.is_dir() and _PARTIAL_DIR.match(p.name)] if root.is_dir() else []
    for path in partial:
        shutil.rmtree(path)
    return partial


def start_history(output_dir: str | Path, resume_from: Path | None) -> None:
    """At a run's start, by its one writer: the partial saves of a crashed attempt removed, and the checkpoints
    past the one it resumes from (none: past step 0) set aside as another timeline (abandon_after)."""
    for path in clean_partial(output_dir):
        print(f"[ftcluster] removed {path}, a checkpoint an interrupted save left incomplete", flush=True)
    step = read_state(resume_from)["step"] if resume_from is not None else 0
    aside = abandon_after(output_dir, step)
    if aside is not None:
        print(f"[ftcluster] the checkpoints past step {step} belong to an abandoned timeline (or are unusable): "
              f"moved to {aside}", flush=True)


def abandon_after(output_dir: str | Path, step: int) -> Path | None:
    """Move every checkpoint past `step` (another timeline, or unusable) into checkpoints/abandoned-<UTC time>/,
    so that nothing takes them for this run's; returns that folder, or None when there were none."""
    newer = [p for p in complete_checkpoints(output_dir) if int(_STEP_DIR.match(p.name).group(1)) > step]
    if not newer:
        return None
    root = checkpoints_dir(output_dir)
    aside = root / f"{ABANDONED_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    while aside.exists():  # two abandonments within a second
        aside = aside.with_name(aside.name + "-")
    aside.mkdir()
    for path in newer:
        path.rename(aside / path.name)
    atomic.fsync_path(aside)
    atomic.fsync_path(root)
    return aside


def step_path(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step}"


def begin(output_dir: str | Path, step: int) -> Path:
    """The hidden folder a checkpoint is written into, empty (whatever a crashed attempt left is discarded)."""
    return atomic.begin_folder(step_path(output_dir, step))


def commit(tmp: Path, trainer_state: dict, keep_last: int) -> Path:
    """Complete a checkpoint: trainer_state.json last (with every file's size), all synced, then the rename
    that makes it visible, then the pruning to the newest keep_last (every path that saves goes through here,
    SPMD ranks and RL alike)."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "files": files}, indent=2))
    final = tmp.with_name(f"step-{trainer_state['step']}")
    atomic.durable_swap(tmp, final)
    prune(final.parent.parent, keep_last)
    return final


def prune(output_dir: str | Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (0 keeps them all)."""
    for stale in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(stale)

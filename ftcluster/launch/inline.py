"""launcher=inline: the worker entry called right here, in this process, as a world of one.

No Ray, no child process: a breakpoint in a stage stops in the terminal that ran `ftcluster train`, a
profiler sees the training loop, and tests check one rank's numerics in seconds (the libraries are
imported once per test session). The rank gets the environment every launcher gives it (RANK,
LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for the duration of the call; the
environment is restored afterwards. Trade-off: one worker only, and no fault isolation (a crash in
native code ends this process); PPO and GRPO, whose roles are Ray actors, need launcher=local.
"""

from __future__ import annotations

import os
from typing import Callable

from omegaconf import DictConfig

from ftcluster.errors import ConfigError, UserError
from ftcluster.util.net import free_port

# The world of one this process joined on its first inline run, kept for the life of the process.
# ftcluster.util.dist.setup builds the torch process group on the first run and DeepSpeed keeps the
# groups it derived from it (ZeRO's data-parallel group...): a destroyed group cannot be swapped in under
# them, so the group stays, and every later inline run must present the same rank, size and rendezvous
# address, or code that reads them from the environment (LOCAL_RANK for the device, DeepSpeed's own
# checks) would see another world than the group it runs in.
_WORLD: dict[str, str] = {}


def launch(entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
    """entry(payload) here, as rank 0 of 1. Its exceptions propagate unchanged (a UserError stays one)."""
    if cfg.launcher.workers != 1:  # validate() refuses this first; kept for callers that skip it
        raise ConfigError("launcher.workers", f"got {cfg.launcher.workers}; launcher=inline runs one worker in "
                                              f"this process. Use launcher.workers=1, or launcher=local or "
                                              f"launcher=processes for more")
    if not _WORLD:
        _WORLD.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    environment = dict(os.environ)
    os.environ.update(_WORLD)
    try:
        entry(payload)
    finally:
        os.environ.clear()
        os.environ.update(environment)


def control(entry: Callable[[dict, object], None], payload: dict, cfg: DictConfig) -> None:
    raise UserError("launcher=inline runs sft, rm and dpo in this process; the roles of PPO and GRPO are Ray "
                    "actors: use launcher=local")

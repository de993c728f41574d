"""The environment every worker process gets, whichever launcher starts it (Ray rank actors or launcher=processes)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ftcluster.observe.placement import REPORT_DIR_ENV, nccl_timeout_s


def worker_env(cfg: DictConfig, backend: str) -> dict[str, str]:
    """Environment of every worker process. Under NCCL ftcluster's stall diagnosis (observe/watchdog.py, at
    launcher.collective_timeout_s) must fire before NCCL's watchdog aborts the process: NCCL's timeout, and the
    heartbeat monitor that kills a stuck NCCL watchdog, are set later (nccl_timeout_s). Async error handling
    stays on (1: tear the process down), set here so that Ray does not pick for us; a timeout also dumps
    NCCL's flight recorder (the last collectives of each rank) into output_dir for a post mortem."""
    env = {REPORT_DIR_ENV: str(Path(cfg.output_dir).resolve())}
    if backend == "nccl":
        nccl_s = nccl_timeout_s(cfg.launcher.collective_timeout_s)
        env.update(TORCH_NCCL_ASYNC_ERROR_HANDLING="1", TORCH_NCCL_DUMP_ON_TIMEOUT="1",
                   TORCH_NCCL_TRACE_BUFFER_SIZE="2000",
                   TORCH_FR_DUMP_TEMP_FILE=str(Path(cfg.output_dir).resolve() / "nccl_trace_rank_"),
                   TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC=str(nccl_s + 60))
    return env

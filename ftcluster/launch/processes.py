"""launcher=processes: one process per worker on this machine, without Ray (the torchrun model).

For a single machine where Ray is not installed or not wanted: a workstation, one node of an allocation,
a GPU box that cannot install packages. Each rank gets RANK, LOCAL_RANK, WORLD_SIZE and a master address on
loopback, and runs the same worker entry as under Ray. The first rank to fail ends the run: the others are
stopped rather than left waiting in a collective until launcher.collective_timeout_s. The driver starts the
ranks before the payload exists (start_early): their libraries are imported while it checks the run and
prepares the data. On CPU the ranks are forked from one interpreter that imported them once; on GPU each is
a fresh interpreter (launch/rank_processes.py says why, and how signals reach them).
"""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.connection import wait
from typing import Callable

from omegaconf import DictConfig

from ftcluster.errors import UserError, WorkerFailed
from ftcluster.launch.rank_processes import ForkedRanks, SpawnedRanks
from ftcluster.launch.worker_env import worker_env
from ftcluster.util import hardware
from ftcluster.util.net import free_port

# How long the ranks get to exit on their own before they are killed: after success, their interpreters' teardown;
# after a failure, the others' collectives break within a moment, or they are stuck in one for good.
GRACE_S = 5.0
FAILED_GRACE_S = 2.0


def launch(entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
    Ranks(entry, cfg).launch(payload)


def start_early(entry: Callable[[dict], None], cfg: DictConfig, data_on_cluster: bool) -> "Ranks":
    """The ranks, started now: `entry`'s module (torch, transformers, DeepSpeed: seconds) is imported while the
    driver checks the run and prepares the data (once before the fork on CPU, by each rank on GPU), then they
    wait for the payload. The caller launches them (Ranks.launch) or closes them. They hold no cluster
    resources, so whether the data preparation uses a cluster (`data_on_cluster`) changes nothing."""
    return Ranks(entry, cfg)


class Ranks:
    """launcher.workers rank processes; each runs the entry once it is handed the payload."""

    def __init__(self, entry: Callable[[dict], None], cfg: DictConfig):
        context = multiprocessing.get_context("spawn")
        use_gpu = _use_gpu(cfg)
        self.cfg, self.backend = cfg, "nccl" if use_gpu else "gloo"
        envs = rank_environment(cfg.launcher.workers, cfg.launcher.cpus_per_worker, use_gpu, free_port())
        self.reports, self.inboxes, ends = [], [], []
        for _ in range(cfg.launcher.workers):
            report, send = context.Pipe(duplex=False)
            inbox, post = context.Pipe(duplex=False)
            self.reports.append(report)
            self.inboxes.append(post)
            ends.append((inbox, send))
        # Forked on a Linux CPU machine only: elsewhere fork is unsafe (macOS's system libraries), and on GPUs
        # the forking process must not have touched CUDA (launch/rank_processes.py)
        forked = not use_gpu and sys.platform.startswith("linux")
        self.group = (ForkedRanks if forked else SpawnedRanks)(entry, envs, ends)
        for inbox, send in ends:  # the ranks hold these ends; ours closed, a dead rank's pipe reads as EOF
            inbox.close()
            send.close()

    def launch(self, payload: dict) -> None:
        """entry(payload) on every rank; raises the first failure. The ranks are gone afterwards."""
        # What needs output_dir (hang reports, NCCL's timeouts and traces): set in each rank before it runs.
        env = worker_env(self.cfg, self.backend)
        failure = None
        try:
            for post in self.inboxes:
                try:
                    post.send((payload, env))
                except (BrokenPipeError, ConnectionResetError):  # died while starting: _wait_all says how
                    pass
            failure = _wait_all(self.group, self.reports)
        finally:
            if not self.group.join(GRACE_S if failure is None else FAILED_GRACE_S):
                self.group.kill()
        if failure is not None:
            raise failure

    def close(self) -> None:
        """No payload is coming: the ranks have run nothing of the entry (they are importing, or waiting), so
        they are killed at once. Nothing when they already ran."""
        self.group.kill()


def control(entry: Callable, payload: dict, cfg: DictConfig) -> None:
    raise UserError("launcher=processes runs SPMD stages only; PPO and GRPO place one Ray actor group per role "
                    "(use launcher=local)")


def rank_environment(workers: int, cpus_per_worker: int, use_gpu: bool, port: int) -> list[dict]:
    """What each rank's process needs to join the group (torch's env:// rendezvous) and to size itself."""
    base = {"WORLD_SIZE": str(workers), "LOCAL_WORLD_SIZE": str(workers), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TOKENIZERS_PARALLELISM": "false"}
    # A rank computes with its own share of the cores only, as a Ray worker does (OMP_NUM_THREADS = its CPUs):
    # N ranks with a thread per core each would oversubscribe the machine N times.
    base["OMP_NUM_THREADS"] = str(cpus_per_worker)
    if not use_gpu:
        # DeepSpeed would probe for a device when imported, and warn in every rank that it fell back to the CPU.
        base.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return [{**base, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(workers)]


def _wait_all(group, pipes: list) -> Exception | None:
    """Until every rank has reported success, or one has failed or died: its error."""
    waiting = dict(zip(pipes, range(len(pipes))))
    while waiting:
        for pipe in wait(list(waiting)):
            rank = waiting.pop(pipe)
            try:
                kind, message = pipe.recv()
            except EOFError:  # died without a word: killed, out of host memory, a crash in native code
                return WorkerFailed(f"worker process died: {group.death(rank)}")
            if kind == "user":
                return UserError(message)
            if kind == "failed":
                return WorkerFailed(f"worker rank {rank} failed: {message}")
    return None


def _use_gpu(cfg: DictConfig) -> bool:
    if cfg.launcher.use_gpu is not None:
        return cfg.launcher.use_gpu
    return hardware.cuda_available()  # without torch on a machine with no GPU (a second before the ranks start)


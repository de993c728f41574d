"""launcher=processes: one process per worker on this machine, without Ray (the torchrun model).

For a single machine where Ray is not installed or not wanted: a workstation, one node of an allocation,
a GPU box that cannot install packages. Each rank is a fresh interpreter (spawned, so no CUDA or thread
state is inherited) that gets RANK, LOCAL_RANK, WORLD_SIZE and a master address on loopback, and runs the
same worker entry as under Ray. The first rank to fail ends the run: the others are stopped rather than
left waiting in a collective until launcher.collective_timeout_s. The driver starts the ranks before the
payload exists (start_early): they import the entry's libraries while it checks the run and prepares the data.

Signals (Linux): a rank ignores SIGTERM and SIGUSR1, so that one sent to the whole process group (systemd,
`kill -- -PGID`) is left to the driver, whose stop request (ftcluster.train.stop) ends every rank after the
same step, with a checkpoint. The ranks start with both blocked (the mask is inherited across spawn), so one
that arrives while a rank's interpreter starts is not its death either. A rank never outlives the driver:
it asks the kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), whatever killed the driver
(SIGKILL, a second SIGTERM, a crash); elsewhere than Linux that guarantee is absent.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig

from ftcluster.errors import UserError, WorkerFailed
from ftcluster.launch.worker_env import worker_env
from ftcluster.util.dist import free_port
from ftcluster.util.env import environment
from ftcluster.util.text import tail

# How long the other ranks get to exit on their own once one has failed, before they are killed.
GRACE_S = 5.0
# What the driver handles (a stop request) and the ranks ignore.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}
_PR_SET_PDEATHSIG = 1


def launch(entry: Callable[[dict], None], payload: dict, cfg: DictConfig) -> None:
    Ranks(entry, cfg).launch(payload)


def start_early(entry: Callable[[dict], None], cfg: DictConfig) -> "Ranks":
    """The ranks' interpreters, started now: each imports `entry`'s module (torch, transformers, DeepSpeed:
    seconds) while the driver checks the run and prepares the data, then waits for the payload. The caller
    launches them (Ranks.launch) or closes them."""
    return Ranks(entry, cfg)


class Ranks:
    """launcher.workers rank processes; each runs the entry once it is handed the payload."""

    def __init__(self, entry: Callable[[dict], None], cfg: DictConfig):
        context = multiprocessing.get_context("spawn")
        use_gpu = _use_gpu(cfg)
        self.cfg, self.backend = cfg, "nccl" if use_gpu else "gloo"
        env = rank_environment(cfg.launcher.workers, cfg.launcher.cpus_per_worker, use_gpu, free_port())
        self.reports, self.inboxes, self.procs = [], [], []
        for rank in range(cfg.launcher.workers):
            report, send = context.Pipe(duplex=False)
            inbox, post = context.Pipe(duplex=False)
            proc = context.Process(target=_run_rank, args=(entry, inbox, send), name=f"ftcluster-rank{rank}")
            # The rank's interpreter starts with its environment already set, as torchrun's do: it imports torch
            # while unpickling (or preloading) its entry, first thing, and torch reads OMP_NUM_THREADS at that
            # import only (set any later, every rank would start a thread per core of the machine).
            with environment(env[rank]), _blocked(STOP_SIGNALS):
                proc.start()
            send.close()  # the child holds its ends; ours closing lets a dead child's pipe read as EOF
            inbox.close()
            self.reports.append(report)
            self.inboxes.append(post)
            self.procs.append(proc)

    def launch(self, payload: dict) -> None:
        """entry(payload) on every rank; raises the first failure. The ranks are gone afterwards."""
        # What needs output_dir (hang reports, NCCL's timeouts and traces): set in each rank before it runs.
        env = worker_env(self.cfg, self.backend)
        try:
            for post in self.inboxes:
                try:
                    post.send((payload, env))
                except (BrokenPipeError, ConnectionResetError):  # died while starting: _wait_all says how
                    pass
            failure = _wait_all(self.procs, self.reports)
        finally:
            _stop(self.procs)
        if failure is not None:
            raise failure

    def close(self) -> None:
        """No payload is coming: the ranks have run nothing of the entry (they are importing, or waiting), so
        they are killed at once. Nothing when they already ran."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


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
        base["CUDA_VISIBLE_DEVICES"] = ""
    return [{**base, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(workers)]


@contextmanager
def _blocked(signals: set) -> Iterator[None]:
    """Blocks `signals` in this thread while a child is started: the child inherits the mask, and its own
    handling (_ignore_stop_signals) is in place before they reach it. Here they are delivered on unblock."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _ignore_stop_signals() -> None:
    """First thing in a rank: the stop signals ignored, then unblocked (one pending is discarded); and death
    with the driver."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        driver = multiprocessing.parent_process().pid
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != driver:  # the driver died before the request was in place: it will not fire
            os._exit(1)


def _run_rank(entry: Callable[[dict], None], inbox, report) -> None:
    _ignore_stop_signals()
    preload = getattr(entry, "preload", None)  # an entry by name (launch/entry.py): imported while we wait
    if preload is not None:
        preload()
    try:
        payload, env = inbox.recv()
    except EOFError:  # the driver closed us without a payload, or is gone
        raise SystemExit(0) from None
    os.environ.update(env)
    try:
        entry(payload)
    except UserError as exc:  # said as the worker said it, like launcher=local does
        report.send(("user", str(exc)))
        raise SystemExit(1) from None
    except BaseException as exc:
        traceback.print_exc()  # the whole of it in this rank's output; the run's error carries the tail
        report.send(("failed", f"{type(exc).__name__}: {exc}\n{tail(traceback.format_exc(), 15)}"))
        raise SystemExit(1) from None
    report.send(("ok", ""))


def _wait_all(procs: list, pipes: list) -> Exception | None:
    """Until every rank has reported success, or one has failed or died: its error."""
    waiting = dict(zip(pipes, range(len(procs))))
    while waiting:
        for pipe in wait(list(waiting)):
            rank = waiting.pop(pipe)
            try:
                kind, message = pipe.recv()
            except EOFError:  # died without a word: killed, out of host memory, a crash in native code
                procs[rank].join()
                return WorkerFailed(f"worker process died: rank {rank} (exit code {procs[rank].exitcode})")
            if kind == "user":
                return UserError(message)
            if kind == "failed":
                return WorkerFailed(f"worker rank {rank} failed: {message}")
    return None


def _stop(procs: list) -> None:
    deadline = time.monotonic() + GRACE_S
    for proc in procs:
        proc.join(timeout=max(deadline - time.monotonic(), 0))
    for proc in procs:
        if proc.is_alive():
            proc.kill()  # not terminate(): a rank ignores SIGTERM
            proc.join()


def _use_gpu(cfg: DictConfig) -> bool:
    if cfg.launcher.use_gpu is not None:
        return cfg.launcher.use_gpu
    return torch.cuda.is_available()

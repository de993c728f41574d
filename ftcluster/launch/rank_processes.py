"""The rank processes of launcher=processes, two ways, behind one interface (start, deaths, wait, kill):

- ForkedRanks (CPU, Linux): one spawned interpreter imports the entry's libraries (torch, transformers, DeepSpeed:
  seconds of CPU each time) and forks every rank from itself. N ranks pay the imports once instead of N times,
  which on a small machine is most of the time to the first step. multiprocessing's own forkserver is not used:
  it is one per driver process, keeps the environment of its first start for every later run in that process,
  and blocks Process.start() until its preloading ends.
- SpawnedRanks (GPU, and systems other than Linux): a fresh interpreter per rank. A process that forks ranks
  must not have touched CUDA, and the libraries probe the devices when imported (DeepSpeed picks its
  accelerator so); a spawned rank inherits no such state. On macOS fork is unsafe in any case.

Either way a rank starts with the stop signals ignored and death with its parent (PR_SET_PDEATHSIG), has the
entry's module imported (by itself, or before the fork), then runs `serve`: the payload from its inbox, the
entry, and one report (ok, a user error, a failure).

Signals (Linux): the driver starts the group with SIGTERM and SIGUSR1 blocked (the mask is inherited across
spawn and fork), and a rank ignores both: one sent to the whole process group (systemd, `kill -- -PGID`) is left
to the driver, whose stop request ends every rank after the same step, with a checkpoint. A rank never outlives
its parent (the driver, or the interpreter it was forked from, which dies with the driver): the kernel sends it
SIGKILL when the parent dies, whatever killed it; elsewhere than Linux that guarantee is absent.
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

from ftcluster.errors import UserError
from ftcluster.util.env import environment
from ftcluster.util.text import tail

# What the driver handles (a stop request) and the ranks ignore.
STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}
_PR_SET_PDEATHSIG = 1
_CONTEXT = multiprocessing.get_context("spawn")


class SpawnedRanks:
    """One fresh interpreter per rank, started with that rank's environment."""

    def __init__(self, entry: Callable[[dict], None], envs: list[dict], ends: list[tuple]):
        self.procs = []
        for rank, (inbox, report) in enumerate(ends):
            proc = _CONTEXT.Process(target=_spawned_rank, args=(entry, inbox, report), name=f"ftcluster-rank{rank}")
            # The rank's interpreter starts with its environment already set, as torchrun's do: torch reads
            # OMP_NUM_THREADS when imported only (set any later, every rank would start a thread per core).
            with environment(envs[rank]), blocked(STOP_SIGNALS):
                proc.start()
            self.procs.append(proc)

    def death(self, rank: int) -> str:
        """Which process died, for a rank whose pipe closed without a report, and its exit code."""
        self.procs[rank].join()
        return f"rank {rank} (exit code {self.procs[rank].exitcode})"

    def alive(self) -> list[bool]:
        return [proc.is_alive() for proc in self.procs]

    def join(self, timeout: float) -> bool:
        """True when every rank has exited within `timeout` seconds."""
        deadline = _deadline(timeout)
        for proc in self.procs:
            proc.join(timeout=_left(deadline))
        return not any(self.alive())

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()  # not terminate(): a rank ignores SIGTERM
            proc.join()


class ForkedRanks:
    """One spawned interpreter (the parent) imports the entry's module, forks the ranks, reaps them and reports
    their ids and exit codes."""

    def __init__(self, entry: Callable[[dict], None], envs: list[dict], ends: list[tuple]):
        shared = {key: value for key, value in envs[0].items() if key not in _PER_RANK}
        per_rank = [{key: env[key] for key in _PER_RANK} for env in envs]
        self.pids: dict[int, int] | None = None  # rank -> process id, once forked
        self.codes: dict[int, int] = {}
        self.status, status_end = _CONTEXT.Pipe(duplex=False)
        self.parent = _CONTEXT.Process(target=_fork_ranks, args=(entry, per_rank, ends, status_end),
                                       name="ftcluster-ranks")
        # What every rank shares is in the parent's environment from its start (torch reads OMP_NUM_THREADS
        # when imported, in the parent); what differs is set in each rank after the fork.
        with environment(shared), blocked(STOP_SIGNALS):
            self.parent.start()
        status_end.close()
        self.workers = len(envs)

    def death(self, rank: int, timeout: float = 10.0) -> str:
        """Which process died, for a rank whose pipe closed without a report, and its exit code: the rank, as
        its parent reaped it, or the parent itself when it died before forking (its imports failed, or it was
        killed)."""
        deadline = _deadline(timeout)
        while rank not in self.codes and self._read(_left(deadline)):
            pass
        if rank not in self.codes and self.pids is None:
            self.parent.join(_left(deadline))
            return f"the process that imports the ranks' libraries, before any rank started (exit code " \
                   f"{self.parent.exitcode}; its error is above)"
        return f"rank {rank} (exit code {self.codes.get(rank)})"

    def alive(self) -> list[bool]:
        """Per rank: forked and not yet exited, or still to be forked (the parent is importing)."""
        self._drain()
        parent = self.parent.is_alive()
        return [parent and rank not in self.codes for rank in range(self.workers)]

    def join(self, timeout: float) -> bool:
        """True when every rank has exited within `timeout` seconds (the parent exits after its last rank)."""
        self.parent.join(timeout)
        return not self.parent.is_alive()

    def kill(self) -> None:
        self._drain()
        if self.pids is None:  # not forked yet (or the news is on its way): the ranks die with their parent
            self.parent.kill()
        else:
            for rank, pid in self.pids.items():
                if rank not in self.codes:
                    _kill(pid)  # SIGKILL: a rank ignores SIGTERM; its parent reaps it and exits after the last
        self.parent.join()
        self._drain()

    def _drain(self) -> None:
        """Every message the parent has sent so far."""
        while self._read(0):
            pass

    def _read(self, timeout: float) -> bool:
        """One message from the parent within `timeout` seconds; False when none came (or none can)."""
        try:
            if not self.status.poll(timeout):
                return False
            message = self.status.recv()
        except (EOFError, OSError):
            return False
        if isinstance(message, dict):
            self.pids = message
        else:
            rank, code = message
            self.codes[rank] = code
        return True


# What differs between the ranks of one machine; the rest of their environment is shared.
_PER_RANK = ("RANK", "LOCAL_RANK")


def _fork_ranks(entry, per_rank: list[dict], ends: list[tuple], status) -> None:
    """The parent of ForkedRanks: the entry's libraries imported once, a rank forked per inbox (multiprocessing's
    fork start method, from this process, which runs no thread of its own: a fork copies only the calling one),
    then the ranks waited for and their exits reported."""
    die_with_parent(multiprocessing.parent_process().pid)
    # Ctrl-C reaches the whole process group: the driver answers it (and stops the ranks); this supervisor
    # would only print a KeyboardInterrupt of its own. The ranks get Python's usual handler back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _preload(entry)
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=_forked_rank, args=(entry, per_rank, ends, status, rank, os.getpid()),
                          name=f"ftcluster-rank{rank}") for rank in range(len(ends))]
    for proc in ranks:
        proc.start()
    for inbox, report in ends:
        inbox.close()
        report.close()
    status.send({rank: proc.pid for rank, proc in enumerate(ranks)})
    running = {proc.sentinel: rank for rank, proc in enumerate(ranks)}
    while running:
        for sentinel in wait(list(running)):
            rank = running.pop(sentinel)
            ranks[rank].join()
            status.send((rank, ranks[rank].exitcode))


def _forked_rank(entry, per_rank: list[dict], ends: list[tuple], status, rank: int, parent: int) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Only this rank's ends stay open here: a rank that dies must leave its pipes with no writer (the driver
    # reads that as its death), and a copy held by another rank would keep them open.
    status.close()
    for other, (inbox, report) in enumerate(ends):
        if other != rank:
            inbox.close()
            report.close()
    os.environ.update(per_rank[rank])
    inbox, report = ends[rank]
    raise SystemExit(serve(entry, inbox, report))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # exited already
        pass


def _spawned_rank(entry, inbox, report) -> None:
    die_with_parent(multiprocessing.parent_process().pid)
    _preload(entry)
    raise SystemExit(serve(entry, inbox, report))


def serve(entry: Callable[[dict], None], inbox, report) -> int:
    """A rank: the payload (and the environment that needs output_dir) from the inbox, the entry, one report;
    the exit code. No payload (the driver closed the inbox) is exit 0 having run nothing."""
    try:
        payload, env = inbox.recv()
    except EOFError:
        return 0
    os.environ.update(env)
    try:
        entry(payload)
    except UserError as exc:  # said as the worker said it, like launcher=local does
        report.send(("user", str(exc)))
        return 1
    except BaseException as exc:
        traceback.print_exc()  # the whole of it in this rank's output; the run's error carries the tail
        report.send(("failed", f"{type(exc).__name__}: {exc}\n{tail(traceback.format_exc(), 15)}"))
        return 1
    report.send(("ok", ""))
    return 0


def die_with_parent(parent: int) -> None:
    """First thing in a rank (and in ForkedRanks' parent): the stop signals ignored, then unblocked (one
    pending is discarded); and death with `parent`, the process that started this one."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request was in place: it will not fire
            os._exit(1)


def _preload(entry) -> None:
    preload = getattr(entry, "preload", None)  # an entry by name (launch/entry.py): imported before the payload
    if preload is not None:
        preload()


@contextmanager
def blocked(signals: set) -> Iterator[None]:
    """Blocks `signals` in this thread while a child is started: the child inherits the mask, and its own
    handling (die_with_parent) is in place before they reach it. Here they are delivered on unblock."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _deadline(timeout: float) -> float:
    return time.monotonic() + timeout


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)

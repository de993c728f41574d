"""Names the rank behind a hang, and records where every rank runs.

A rank that stalls (stuck I/O, a deadlock, a stopped process) leaves the others blocked in a
collective until launcher.collective_timeout_s runs out; gloo and NCCL then fail with a message that
names no peer. So every rank publishes a heartbeat (time, step) to the process group's store from a
daemon thread, and the rank whose collective timed out reads them all and names the ranks that went
quiet, with their node and pid from the placement every rank shares at start (output_dir/workers.json).

Under NCCL no collective raises in Python: a hung one blocks the next device sync, and NCCL's own watchdog
aborts the process when its process-group timeout runs out. So a second daemon thread watches this rank's
progress: when no step has finished for launcher.collective_timeout_s it writes the diagnosis to
<report_dir>/hang-rank-<r>.txt and stderr. The launchers give NCCL a longer timeout (nccl_timeout_s), so the
named diagnosis exists before the abort, and the launcher reports it instead of "worker died".
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as torch_dist

from ftcluster.errors import CollectiveTimeout
from ftcluster.observe.placement import HANG_REPORT, PLACEMENT_FILE, REPORT_DIR_ENV, describe_rank
from ftcluster.util import dist
from ftcluster.util.atomic import write_text

_KEY = "ftcluster/heartbeat/{}"


def gather_placement(output_dir: str) -> list[dict]:
    """Collective: every rank's node, host, address and pid, in rank order; rank 0 writes workers.json."""
    me = {"rank": dist.rank(), "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
          "host": socket.gethostname(), "ip": _node_ip(), "pid": os.getpid(),
          "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
    placement = dist.all_gather_objects(me)
    if dist.rank() == 0:
        write_text(Path(output_dir) / PLACEMENT_FILE, json.dumps(placement, indent=2))
    return placement


def _node_ip() -> str:
    if not os.environ.get("FTCLUSTER_IN_RAY"):  # a rank of launcher=processes or inline: no Ray to import (0.3 s)
        return "127.0.0.1"
    import ray

    return ray.util.get_node_ip_address()


class Watchdog:
    """Heartbeats from a daemon thread, and the diagnosis of a collective that timed out."""

    def __init__(self, placement: list[dict], timeout_s: int, report_dir: str | None = None):
        self.placement = placement
        self.timeout_s = timeout_s
        self.interval_s = max(0.5, min(10.0, timeout_s / 6))
        self.step = 0
        self.report_dir = report_dir or os.environ.get(REPORT_DIR_ENV)
        self._progress_at = time.monotonic()
        self._store = _default_store()
        self._stopped = threading.Event()
        self._thread = None
        if self._store is not None and len(placement) > 1:
            self._thread = threading.Thread(target=self._publish, name="ftcluster-heartbeat", daemon=True)
            self._thread.start()
        if len(placement) > 1:
            threading.Thread(target=self._watch_progress, name="ftcluster-stall", daemon=True).start()

    def beat(self, step: int) -> None:
        self.step = step
        self._progress_at = time.monotonic()

    def _watch_progress(self) -> None:
        """Once per stall: the diagnosis when no step finished for timeout_s (see the module docstring)."""
        reported_at = None
        while not self._stopped.wait(self.interval_s):
            if time.monotonic() - self._progress_at < self.timeout_s or reported_at == self._progress_at:
                continue
            reported_at = self._progress_at
            report = str(self.diagnose(TimeoutError(f"no step finished for {self.timeout_s} s")))
            print(f"[ftcluster] {report}", file=sys.stderr, flush=True)
            if self.report_dir:
                try:
                    write_text(Path(self.report_dir) / HANG_REPORT.format(dist.rank()), report + "\n")
                except OSError:  # the report in the log is what matters; a full disk must not hide it
                    pass

    def close(self) -> None:
        self._stopped.set()

    def _publish(self) -> None:
        key = _KEY.format(dist.rank())
        while not self._stopped.is_set():
            try:
                self._store.set(key, json.dumps([time.time(), self.step]))
            except Exception:  # the store's host is gone; the collective timing out will say so
                return
            self._stopped.wait(self.interval_s)

    def diagnose(self, error: BaseException) -> CollectiveTimeout:
        me = dist.rank()
        where = describe_rank(self.placement[me] if me < len(self.placement) else None, me)
        head = (f"{where} waited longer than launcher.collective_timeout_s={self.timeout_s} in a collective at step "
                f"{self.step + 1}")
        quiet, unknown = self._quiet_ranks()
        if unknown:
            return CollectiveTimeout(f"{head}, and the process group's store (hosted by rank 0) does not answer: "
                                     f"{describe_rank(self._entry(0), 0)} stalled or died. ({_first_line(error)})")
        if not quiet:
            behind = self._ranks_behind()
            where = (f"; ranks at an earlier step than this one: {behind}" if behind else
                     ", so a rank is stuck inside the step (a slow kernel or I/O)")
            return CollectiveTimeout(f"{head}; every rank's heartbeat is recent{where}. ({_first_line(error)})")
        named = "; ".join(f"{describe_rank(self._entry(r), r)} " + (
            f"silent for {age:.0f} s, last at step {step + 1}" if step >= 0 else "never sent a heartbeat")
            for r, age, step in quiet)
        return CollectiveTimeout(f"{head}. Ranks that stopped responding (stalled or died): {named}. "
                                 f"({_first_line(error)})")

    def _ranks_behind(self) -> str:
        """Live ranks whose last finished step is behind this rank's: under NCCL the one that did not reach
        the collective this rank waits in."""
        if self._store is None:
            return ""
        try:
            steps = {r: json.loads(self._store.get(_KEY.format(r)))[1] for r in range(len(self.placement))
                     if self._store.check([_KEY.format(r)])}
        except Exception:
            return ""
        return "; ".join(f"{describe_rank(self._entry(r), r)} at step {s + 1}" for r, s in sorted(steps.items())
                         if s < self.step)

    def _entry(self, rank: int) -> dict | None:
        return self.placement[rank] if rank < len(self.placement) else None

    def _quiet_ranks(self) -> tuple[list[tuple[int, float, int]], bool]:
        if self._store is None:
            return [], True
        now, stale_after = time.time(), 3 * self.interval_s
        quiet = []
        try:
            self._store.set_timeout(timedelta(seconds=5))
            for rank in range(len(self.placement)):
                key = _KEY.format(rank)
                if not self._store.check([key]):
                    quiet.append((rank, float("inf"), -1))
                    continue
                beat_time, step = json.loads(self._store.get(key))
                if now - beat_time > stale_after:
                    quiet.append((rank, now - beat_time, step))
        except Exception:
            return [], True
        return [q for q in quiet if q[0] != dist.rank()], False


def is_timeout(error: BaseException) -> bool:
    """gloo: 'Timed out waiting Nms for recv operation'; NCCL's watchdog: 'Watchdog caught collective
    operation timeout'."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][-300:] if lines else type(error).__name__


def _default_store():
    if not torch_dist.is_initialized():
        return None
    try:
        return torch_dist.distributed_c10d._get_default_store()
    except Exception:  # a private torch API: without it there is no diagnosis, never a failure
        return None

"""Stop on request, with a checkpoint: how a run survives SLURM preemption and time limits.

The driver turns SIGUSR1 (SLURM's `--signal=B:USR1@T` before a time limit, or `kill -USR1` by hand)
into a file in output_dir, which every rank can see on the shared file system. At each step boundary
the ranks agree (one all-reduce of one number) on whether any of them saw it, so all stop after the
same step, write one checkpoint and return; the driver exits with StoppedOnRequest.EXIT_CODE and resume=auto continues.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from ftcluster.util import dist

REQUEST_FILE = ".stop-requested"


def request_file(output_dir: str | Path) -> Path:
    return Path(output_dir) / REQUEST_FILE


def install_signal_handler(output_dir: str | Path) -> None:
    """Driver side: SIGUSR1 asks the workers to checkpoint and stop."""
    path = request_file(output_dir)
    path.unlink(missing_ok=True)  # left by an earlier, preempted attempt

    def _request(signum, frame):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        print("[ftcluster] SIGUSR1: the workers will checkpoint and stop after the current step", flush=True)

    if threading.current_thread() is threading.main_thread():  # (Python takes signals there only)
        signal.signal(signal.SIGUSR1, _request)


def seen(output_dir: str | Path) -> bool:
    """Whether this process sees the request: the whole check where one process decides (the RL controller)."""
    return request_file(output_dir).exists()


def requested(output_dir: str | Path) -> bool:
    """Collective: True on every rank when any rank sees the request."""
    return dist.all_reduce_sum([float(seen(output_dir))])[0].item() > 0

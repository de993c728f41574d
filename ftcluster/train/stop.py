"""Stop on request, with a checkpoint: how a run survives preemption, time limits and service stops.

SIGTERM (systemd, `timeout`, `scancel`, Kubernetes) and SIGUSR1 (SLURM's `--signal=B:USR1@T` before a time
limit, or `kill -USR1` by hand) to the driver mean the same: checkpoint after the current step and exit
StoppedOnRequest.EXIT_CODE (75), whatever the launcher. The driver turns the signal into a file in
output_dir, which every rank can see on the shared file system. At each step boundary the ranks agree (one
all-reduce of one number) on whether any of them saw it, so all stop after the same step, write one
checkpoint and return; resume=auto continues. A second SIGTERM is not a request: it kills the driver
(the default action), and with it every launcher=processes rank (they die with their parent).

No signal is lost at start: `ftcluster train` calls stop_early() first thing, before it imports anything heavy.
From then until the run's handler is in place (handling_signals, around the launch) a stop signal is only
recorded, never acted on where the main thread happens to be (inside a library, half through a write). The
driver looks at the record between its phases (check_early): before anything is written and again before
the launch, it ends the command with exit 75 and nothing trained ("run me again"). A signal after the last
look is handed over to handling_signals, which turns it into the request file at once: the run stops at its
first step boundary with a checkpoint and exit 75. Either way not the default death (143), nor ignored. A
second SIGTERM during start-up kills, as it does later. The one window left is the interpreter's own start,
before any code of ours runs.

This module imports no torch (the CLI imports it first thing); the collective check imports it lazily.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ftcluster.errors import StoppedOnRequest

REQUEST_FILE = ".stop-requested"
# What asks a run to checkpoint and stop. The ranks of launcher=processes ignore both (the driver's request
# stops them: ftcluster.launch.processes).
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StoppedBeforeTraining(BaseException):
    """A stop signal that came before the workers were launched: nothing was trained, nothing to keep. A
    BaseException, as KeyboardInterrupt is: raised wherever start-up happens to be, no `except Exception` on
    the way (Hydra's, a library's) may take it for an error of its own."""

    EXIT_CODE = StoppedOnRequest.EXIT_CODE

    def __init__(self, signame: str):
        super().__init__(f"stopped on request ({signame}) before training began; nothing was trained or "
                         f"checkpointed. Run the same command (resume=auto) to start or continue the run")


def request_file(output_dir: str | Path) -> Path:
    return Path(output_dir) / REQUEST_FILE


def _main_thread() -> bool:  # Python takes signals in the main thread only
    return threading.current_thread() is threading.main_thread()


# The stop signal recorded by stop_early's handler (its name), until check_early or handling_signals takes it.
_early: dict = {"signal": None, "terms": 0}


def stop_early() -> dict:
    """The first thing `ftcluster train` does: from now until handling_signals, a stop signal is recorded (and
    acted on by check_early or handling_signals); a second SIGTERM gets the default action. Returns the
    handlers it replaced, for restore()."""
    _early.update(signal=None, terms=0)
    if not _main_thread():
        return {}

    def _record(signum, frame):
        if signum == signal.SIGTERM:
            _early["terms"] += 1
            if _early["terms"] > 1:  # the sender insists: die as if unhandled
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
        _early["signal"] = _early["signal"] or signal.Signals(signum).name

    _record.early = True

    return {sig: signal.signal(sig, _record) for sig in SIGNALS}


def check_early() -> None:
    """Between the driver's phases before the launch: a stop signal recorded since stop_early ends the command
    here (StoppedBeforeTraining, exit 75), at a point where nothing is half-written."""
    if _early["signal"] is not None:
        name, _early["signal"] = _early["signal"], None
        raise StoppedBeforeTraining(name)


def restore(handlers: dict) -> None:
    """The handlers stop_early replaced, back (the CLI runs in-process in tests; a signal to that process must
    not be taken for a stop request once the command is over)."""
    if _main_thread():
        for sig, handler in handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@contextmanager
def handling_signals(output_dir: str | Path) -> Iterator[None]:
    """Driver side, around the launch: SIGTERM and SIGUSR1 ask the workers to checkpoint and stop; a second
    SIGTERM kills. The handlers in place before are restored afterwards (tests call the driver in-process)."""
    path = request_file(output_dir)
    path.unlink(missing_ok=True)  # left by an earlier, preempted attempt
    if not _main_thread():
        yield
        return
    terms = 0

    def _ask(name: str, when: str = "") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        print(f"[ftcluster] {name}{when}: the workers will checkpoint and stop after the current step (exit 75; "
              f"resume=auto continues)", flush=True)

    def _request(signum, frame):
        nonlocal terms
        if signum == signal.SIGTERM:
            terms += 1
            if terms > 1:  # the sender insists: die as if unhandled (launcher=processes ranks die with it)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
        _ask(signal.Signals(signum).name)

    before = {sig: signal.signal(sig, _request) for sig in SIGNALS}
    early, _early["signal"] = _early["signal"], None
    if early is not None:  # came after the driver's last check_early: handed over, the workers stop at step 1
        terms = _early["terms"]
        _ask(early, " (during start-up)")
    try:
        yield
    finally:
        for sig, handler in before.items():  # (stop_early's is over: training began)
            early = handler is None or getattr(handler, "early", False)
            signal.signal(sig, signal.SIG_DFL if early else handler)


def seen(output_dir: str | Path) -> bool:
    """Whether this process sees the request: the whole check where one process decides (the RL controller)."""
    return request_file(output_dir).exists()


def requested(output_dir: str | Path) -> bool:
    """Collective: True on every rank when any rank sees the request."""
    from ftcluster.util import dist  # not at the top: it imports torch, and the CLI imports this module first

    return dist.all_reduce_sum([float(seen(output_dir))])[0].item() > 0

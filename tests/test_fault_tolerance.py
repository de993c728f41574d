"""Failures mid-run, caused for real: a worker SIGKILLed, a worker stalled (SIGSTOP). (A stop request,
SIGUSR1, is tested through SLURM in test_slurm.py.)

Each run is a real `ftcluster train` (Ray rank actors, DeepSpeed, gloo); the test finds its worker
processes from output_dir/workers.json and signals one of them.
"""

import contextlib
import json
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import LONG, LONG_STEPS, assert_same_weights, last_step, losses, train
from ftcluster.errors import WorkerFailed

# Slow tier: long runs on Ray, killed and stalled workers.
pytestmark = pytest.mark.slow


class Background:
    """`ftcluster train` in a thread of this process, on the Ray cluster the other tests share (so its
    start-up is paid once); the test meanwhile signals the run's worker processes."""

    def __init__(self, output_dir: Path, *overrides: str):
        self.output_dir, self.error = output_dir, None
        self.thread = threading.Thread(target=self._run, args=overrides, daemon=True)
        self.thread.start()

    def _run(self, *overrides: str) -> None:
        try:
            train(self.output_dir, *overrides)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def workers(self, count: int = 2, timeout: float = 180) -> list[psutil.Process]:
        """The worker processes, from the placement the workers record at start (rank order)."""
        placement = self.output_dir / "workers.json"
        self.wait_for(lambda: placement.is_file() and len(json.loads(placement.read_text())) == count,
                      "the workers to start", timeout)
        return [psutil.Process(w["pid"]) for w in json.loads(placement.read_text())]

    def wait_for(self, predicate, what: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while not predicate():
            assert self.thread.is_alive(), f"the run ended before {what}: {self.error!r}"
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> BaseException | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not end within {timeout} s"
        return self.error


def test_sigkilled_worker_is_restarted_from_the_newest_checkpoint(uninterrupted, tmp_path):
    run = Background(tmp_path / "run", *LONG, "launcher.max_failures=1")
    victim = run.workers()[1]
    run.wait_for(lambda: (run.output_dir / "checkpoints" / "step-3").is_dir(), "the first checkpoint")
    victim.send_signal(signal.SIGKILL)
    assert run.finish() is None
    restarted = [w["pid"] for w in json.loads((run.output_dir / "workers.json").read_text())]
    assert victim.pid not in restarted, "the worker group was not restarted"
    assert losses(run.output_dir) == pytest.approx(losses(uninterrupted), rel=1e-6)
    assert sorted(losses(run.output_dir)) == list(range(1, LONG_STEPS + 1))
    assert_same_weights(run.output_dir / "final", uninterrupted / "final")


def test_stalled_worker_fails_the_run_within_the_collective_timeout(tmp_path):
    run = Background(tmp_path / "run", "strategy=zero2", "trainer.max_steps=100000",
                     "launcher.collective_timeout_s=10")
    victim = run.workers()[1]
    run.wait_for(lambda: last_step(run.output_dir) >= 2, "two logged steps")
    victim.send_signal(signal.SIGSTOP)
    stalled_at = time.time()
    try:
        error = run.finish(timeout=120)
    finally:  # Ray kills it too, in its own time; it must not hold a CPU of the shared cluster meanwhile
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    elapsed = time.time() - stalled_at
    assert isinstance(error, WorkerFailed), repr(error)
    assert elapsed < 10 + 30, f"the run took {elapsed:.0f} s to fail after a worker stalled"
    message = str(error)
    assert "collective_timeout_s=10" in message, message
    assert f"rank 1 (node {socket.gethostname()}" in message and f"pid {victim.pid}" in message, message

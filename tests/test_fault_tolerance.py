"""Failures mid-run, caused for real: a worker SIGKILLed, a worker stalled (SIGSTOP), a stop request.

Each run is a real `ftcluster train` process with its own Ray cluster; the test finds its Ray Train
worker processes (children of the run's raylet) and signals one of them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import LONG, LONG_STEPS, TINY, assert_same_weights, last_step, losses, train
from ftcluster.stop import EXIT_CODE



def start(output_dir: Path, *overrides: str) -> subprocess.Popen:
    args = [*TINY, *overrides, f"output_dir={output_dir}"]
    return subprocess.Popen([sys.executable, "-m", "ftcluster.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def train_workers(run: subprocess.Popen, count: int = 2, timeout: float = 180) -> list[psutil.Process]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [p for p in psutil.Process(run.pid).children(recursive=True) if _is_train_worker(p)]
        if len(found) == count:
            return found
        assert run.poll() is None, run.communicate()[1][-3000:]
        time.sleep(0.2)
    pytest.fail("the run's Ray Train workers did not appear")


def _is_train_worker(proc: psutil.Process) -> bool:
    try:
        return "RayTrainWorker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def wait_for(predicate, run: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert run.poll() is None, f"the run ended before {what}: {run.communicate()[1][-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def finish(run: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = run.communicate(timeout=timeout)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    return run.returncode, out, err


def test_sigkilled_worker_is_restarted_from_the_newest_checkpoint(uninterrupted, tmp_path):
    out = tmp_path / "run"
    run = start(out, *LONG, "launcher.max_failures=1")
    victim = train_workers(run)[1]
    wait_for(lambda: (out / "checkpoints" / "step-3").is_dir(), run, "the first checkpoint")
    victim.send_signal(signal.SIGKILL)
    code, stdout, stderr = finish(run)
    assert code == 0, stderr[-3000:]
    resumed = [line for line in (stdout + stderr).splitlines() if "resumed from" in line]
    assert resumed, "the workers were not restarted from a checkpoint"
    assert losses(out) == pytest.approx(losses(uninterrupted), rel=1e-6)
    assert sorted(losses(out)) == list(range(1, LONG_STEPS + 1))
    assert_same_weights(out / "final", uninterrupted / "final")


def test_stalled_worker_fails_the_run_within_the_collective_timeout(tmp_path):
    out = tmp_path / "run"
    run = start(out, "strategy=zero2", "trainer.max_steps=100000", "launcher.collective_timeout_s=10")
    victim = train_workers(run)[1]
    wait_for(lambda: last_step(out) >= 2, run, "two logged steps")
    victim.send_signal(signal.SIGSTOP)
    stalled_at = time.time()
    code, _, stderr = finish(run, timeout=120)
    elapsed = time.time() - stalled_at
    assert code == 1, stderr[-3000:]
    assert elapsed < 10 + 45, f"the run took {elapsed:.0f} s to fail after a worker stalled"
    message = stderr.strip().splitlines()[-1]
    placement = {w["pid"]: w for w in json.loads((out / "workers.json").read_text())}
    stalled = placement[victim.pid]
    assert "collective_timeout_s=10" in message, message
    assert f"rank {stalled['rank']} (node {stalled['node']}" in message and f"pid {victim.pid}" in message, message
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE


def test_sigusr1_checkpoints_stops_and_resume_completes(uninterrupted, tmp_path):
    out = tmp_path / "run"
    run = start(out, *LONG)
    wait_for(lambda: last_step(out) >= 4, run, "four logged steps")
    run.send_signal(signal.SIGUSR1)
    code, _, stderr = finish(run)
    assert code == EXIT_CODE, stderr[-3000:]
    stopped_at = max(losses(out))
    assert 4 <= stopped_at < LONG_STEPS
    assert (out / "checkpoints" / f"step-{stopped_at}" / "trainer_state.json").is_file()
    assert not (out / "final").exists()

    train(out, *LONG, "resume=auto")
    assert losses(out) == pytest.approx(losses(uninterrupted), rel=1e-6)
    assert_same_weights(out / "final", uninterrupted / "final")

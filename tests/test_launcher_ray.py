"""launcher=ray: join a Ray cluster started by hand (`ray start --head`), as on a real cluster."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, cli
from ftcluster.track import read_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A head node in its own process group (stopped by that group, never by `ray stop`)."""
    port = free_port()
    temp_dir = Path("/tmp") / f"ftc-ray-{os.getpid()}-{port}"  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp_dir}"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:  # ready when the GCS port accepts connections
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("ray start --head did not come up in 60 s")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)


def test_train_joins_a_running_ray_cluster(ray_head, tmp_path):
    address, env = ray_head
    run = tmp_path / "run"
    result = cli("train", *TINY, "launcher=ray", f"launcher.address={address}", "strategy=zero1",
                 "trainer.max_steps=3", f"output_dir={run}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
    assert (run / "final" / "model.safetensors").is_file()

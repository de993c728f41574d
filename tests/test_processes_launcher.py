"""launcher=processes: ranks as plain local processes, with Ray not importable at all.

The training run is the real CLI in a fresh interpreter whose `import ray` fails (as on a machine without
Ray), checked against the single-process reference like the Ray-placed runs are. The failure cases drive
the launcher with small entries (tests/launcher_entries.py): a rank's error must end the run at once and
name the rank, even while another rank waits in a collective that will never complete.
"""

import json
import time

import psutil
import pytest
from omegaconf import OmegaConf

from helpers import TINY, cli
from ftcluster.errors import UserError
from ftcluster.launch import processes
from ftcluster.errors import WorkerFailed
from launcher_entries import report_environment, wait_in_a_collective_or_fail
from test_train_distributed import assert_matches_reference

# Most tests here are in the slow tier: several processes each (the ranks, a fresh CLI without Ray). The
# rank-environment test is cheap (two ranks of a tiny entry) and keeps the launcher in the fast tier.

# Makes `import ray` fail and importlib.util.find_spec("ray") answer None, as if Ray were not installed.
NO_RAY = "import sys\nsys.modules['ray'] = None\n"


@pytest.fixture
def without_ray(tmp_path) -> dict:
    """The environment of a process that cannot import Ray."""
    blocker = tmp_path / "no_ray"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_RAY)
    return {"PYTHONPATH": str(blocker)}


@pytest.mark.slow
def test_trains_without_ray_and_matches_the_reference(tmp_path, without_ray):
    run = tmp_path / "run"
    result = cli("train", *TINY, "launcher=processes", "strategy=zero2", "trainer.max_steps=6",
                 f"output_dir={run}", env=without_ray)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_matches_reference(run)
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_ray_launcher_without_ray_says_so_and_names_the_alternative(tmp_path, without_ray):
    result = cli("train", *TINY, "trainer.max_steps=6", f"output_dir={tmp_path / 'run'}", env=without_ray)
    assert result.returncode == 2
    assert "place workers with Ray, which cannot be imported here" in result.stderr
    assert "use launcher=processes" in result.stderr and "Traceback" not in result.stderr


def _cfg(workers=2):
    return OmegaConf.create({"launcher": {"workers": workers, "cpus_per_worker": 1, "use_gpu": False}})


@pytest.mark.slow
@pytest.mark.parametrize("fail_with, error, message", [
    ("bug", WorkerFailed, "worker rank 1 failed: ValueError: boom on rank 1"),
    ("user", UserError, "data.path: bad record on rank 1"),
    ("crash", WorkerFailed, "worker process died: rank 1 (exit code 9)"),
])
def test_a_failing_rank_ends_the_run_and_the_waiting_rank_is_stopped(tmp_path, fail_with, error, message):
    pid_file = tmp_path / "rank0.pid"
    started = time.monotonic()
    with pytest.raises(error) as raised:
        processes.launch(wait_in_a_collective_or_fail, {"pid_file": str(pid_file), "fail_with": fail_with}, _cfg())
    assert type(raised.value) is error and message in str(raised.value)
    assert time.monotonic() - started < 60  # not the collective timeout (30 min)
    rank0 = int(pid_file.read_text())
    assert not psutil.pid_exists(rank0) or psutil.Process(rank0).status() == psutil.STATUS_ZOMBIE


def test_each_rank_gets_its_rank_and_a_cpu_share(tmp_path):
    processes.launch(report_environment, {"dir": str(tmp_path)}, _cfg(workers=2))
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["RANK"] for s in seen] == ["0", "1"] and [s["LOCAL_RANK"] for s in seen] == ["0", "1"]
    assert {s["WORLD_SIZE"] for s in seen} == {"2"} and {s["MASTER_ADDR"] for s in seen} == {"127.0.0.1"}
    assert {s["OMP_NUM_THREADS"] for s in seen} == {"1"} and {s["CUDA_VISIBLE_DEVICES"] for s in seen} == {""}
    # What torch computes with: it reads OMP_NUM_THREADS once, when imported (this entry's module imports it).
    assert [s["torch_threads"] for s in seen] == [1, 1]

"""launcher=processes: ranks as plain local processes, with Ray not importable at all.

The training run is the real CLI in a fresh interpreter whose `import ray` fails (as on a machine without
Ray), checked against the single-process reference like the Ray-placed runs are. The failure cases drive
the launcher with small entries (tests/launcher_entries.py): a rank's error must end the run at once and
name the rank, even while another rank waits in a collective that will never complete.
"""

import json
import re
import sys
import time
import types
from datetime import timedelta

import psutil
import pytest
import torch
import torch.distributed as torch_dist
from omegaconf import OmegaConf

from helpers import TINY, cli, refused
from ftcluster.errors import UserError
from ftcluster.launch import processes, rank_processes
from ftcluster.launch.entry import EntryByName
from ftcluster.errors import WorkerFailed
from ftcluster.util import dist
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


def test_ranks_started_early_are_stopped_when_the_data_is_refused(capsys, monkeypatch, tmp_path):
    """The ranks start once the config is valid, before the data is read (they import torch meanwhile); a bad
    record refuses the run at its line and the ranks, which have run nothing, are gone with it."""
    started = []

    class WatchedRanks(processes.Ranks):
        def __init__(self, *args):
            super().__init__(*args)
            started.append(self)

        def close(self):
            self.alive_at_close = self.group.alive()
            super().close()

    monkeypatch.setattr(processes, "Ranks", WatchedRanks)
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n{"instruction": 3}\n')
    line = refused(capsys, "train", *TINY, "launcher=processes", "data=custom", f"data.path={data}", "data.format=alpaca",
                   f"output_dir={tmp_path / 'run'}")
    assert f"{data}:2" in line
    assert len(started) == 1, "the ranks were not started before the data was prepared"
    ranks = started[0]
    assert ranks.alive_at_close == [True, True]  # still importing or waiting for their payload
    assert ranks.group.alive() == [False, False]
    # Killed: while their parent imported (it goes, and no rank was forked), or once forked (each rank goes).
    group = ranks.group
    assert group.parent.exitcode == -9 if group.pids is None else group.codes == {0: -9, 1: -9}


def _cfg(workers=2, output_dir="."):
    return OmegaConf.create({"output_dir": str(output_dir),
                             "launcher": {"workers": workers, "cpus_per_worker": 1, "use_gpu": False,
                                          "collective_timeout_s": 60}})


@pytest.mark.slow
@pytest.mark.parametrize("fail_with, error, message", [
    ("bug", WorkerFailed, "worker rank 1 failed: ValueError: boom on rank 1"),
    ("user", UserError, "data.path: bad record on rank 1"),
    ("crash", WorkerFailed, "worker process died: rank 1 (exit code 9)"),
])
def test_a_failing_rank_ends_the_run_and_the_waiting_rank_is_stopped(tmp_path, fail_with, error, message, rank_group):
    pid_file = tmp_path / "rank0.pid"
    started = time.monotonic()
    with pytest.raises(error) as raised:
        processes.launch(wait_in_a_collective_or_fail, {"pid_file": str(pid_file), "fail_with": fail_with}, _cfg())
    assert type(raised.value) is error and message in str(raised.value)
    assert time.monotonic() - started < 60  # not the collective timeout (30 min)
    rank0 = int(pid_file.read_text())
    assert not psutil.pid_exists(rank0) or psutil.Process(rank0).status() == psutil.STATUS_ZOMBIE


@pytest.fixture(params=["forked", "spawned"])
def rank_group(request, monkeypatch) -> str:
    """Both ways of starting ranks: forked from one interpreter (on CPU) and spawned one by one (what a GPU
    machine gets), the second forced here where there is no GPU."""
    if request.param == "spawned":
        monkeypatch.setattr(processes, "ForkedRanks", rank_processes.SpawnedRanks)
    return request.param


def test_an_entry_that_cannot_be_imported_names_the_process_that_died(capfd, rank_group):
    """The entry's module fails to import where the ranks start: in the one interpreter the ranks would be
    forked from (it dies before any rank exists, and the error says so), or in each spawned rank."""
    with pytest.raises(WorkerFailed) as raised:
        processes.launch(EntryByName("no_such_module_of_entries", "entry"), {}, _cfg())
    expected = {"forked": "worker process died: the process that imports the ranks' libraries, before any rank "
                          "started (exit code 1; its error is above)",
                "spawned": r"worker process died: rank [01] \(exit code 1\)"}[rank_group]
    assert re.fullmatch(expected if rank_group == "spawned" else re.escape(expected), str(raised.value))
    assert "ModuleNotFoundError: No module named 'no_such_module_of_entries'" in capfd.readouterr().err


def test_each_rank_gets_its_rank_and_a_cpu_share(tmp_path, rank_group):
    processes.launch(report_environment, {"dir": str(tmp_path)}, _cfg(workers=2, output_dir=tmp_path))
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # The shared worker environment (launch/worker_env.py), as Ray's workers get it: where hang reports go.
    assert {s["FTCLUSTER_RUN_DIR"] for s in seen} == {str(tmp_path.resolve())}
    assert [s["RANK"] for s in seen] == ["0", "1"] and [s["LOCAL_RANK"] for s in seen] == ["0", "1"]
    assert {s["WORLD_SIZE"] for s in seen} == {"2"} and {s["MASTER_ADDR"] for s in seen} == {"127.0.0.1"}
    assert {s["OMP_NUM_THREADS"] for s in seen} == {"1"} and {s["CUDA_VISIBLE_DEVICES"] for s in seen} == {""}
    # What torch computes with: it reads OMP_NUM_THREADS once, when imported (this entry's module imports it).
    assert [s["torch_threads"] for s in seen] == [1, 1]


# ==== Each rank on its own GPU: what a CUDA machine would see, recorded on this one ========================

class FakeCuda:
    """torch.cuda as a rank's process sees it on an 8-GPU machine: a current device per process, set by
    set_device, and the calls in order, beside those that create the process group."""

    def __init__(self, monkeypatch, group_exists: bool):
        self.calls, self.current = [], 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch_dist, "is_initialized", lambda: group_exists)
        # DeepSpeed as setup() uses it: init_distributed is what creates (or reuses) the group.
        ops = types.SimpleNamespace(__compatible_ops__={})
        fake = types.SimpleNamespace(ops=ops, init_distributed=self.init_distributed)
        monkeypatch.setitem(sys.modules, "deepspeed", fake)
        monkeypatch.setitem(sys.modules, "deepspeed.ops", ops)
        # setup() makes the collective timeout torch's default; put the real defaults back afterwards.
        c10d = torch_dist.distributed_c10d
        monkeypatch.setattr(c10d, "default_pg_timeout", c10d.default_pg_timeout)
        monkeypatch.setattr(c10d, "default_pg_nccl_timeout", c10d.default_pg_nccl_timeout)

    def set_device(self, index):
        self.current = int(index)
        self.calls.append(("set_device", self.current))

    def init_distributed(self, dist_backend, timeout):
        self.calls.append(("init_distributed", dist_backend, timeout))


def _rank_environment(monkeypatch, rank: int) -> None:
    env = processes.rank_environment(4, 1, use_gpu=True, port=29500)[rank]
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_a_rank_of_launcher_processes_takes_its_gpu_before_it_joins_the_group(monkeypatch):
    """Rank 3 of four: set_device(3) before the NCCL group exists (NCCL binds the group to the current device,
    and the placement gather stages its tensors there), and dist.device() says cuda:3 from then on."""
    cuda = FakeCuda(monkeypatch, group_exists=False)
    _rank_environment(monkeypatch, rank=3)
    dist.setup(timeout_s=60)
    assert cuda.calls == [("set_device", 3), ("init_distributed", "nccl", timedelta(seconds=60))]
    assert dist.device() == torch.device("cuda", 3)


def test_a_launcher_that_made_the_group_keeps_the_device_it_chose(monkeypatch):
    """A Ray rank actor gets its device set before the entry runs (not always index LOCAL_RANK), and an RL actor sees one GPU
    with LOCAL_RANK 0: setup() leaves the device alone there, and dist.device() follows the launcher's choice."""
    cuda = FakeCuda(monkeypatch, group_exists=True)
    _rank_environment(monkeypatch, rank=1)
    cuda.current = 5  # what the launcher made current
    dist.setup(timeout_s=60)
    assert [call[0] for call in cuda.calls] == ["init_distributed"]
    assert dist.device() == torch.device("cuda", 5)

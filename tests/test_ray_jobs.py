"""launcher=ray with a dashboard address: the run submitted as a Ray Job, `ftcluster jobs`, and the
launch/ scripts that bring a cluster up and down. One head (started by launch/start_head.sh) serves
the whole module; it and everything else here is stopped by pid (launch/stop.sh), never `ray stop`."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import TINY
from ftcluster.cli import main
from ftcluster.observe.track import read_metrics
from ftcluster.util.net import free_port

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"


def alive(pid: int) -> bool:
    """Whether anything is left of the process group that `ray start` (pid) leads."""
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


def sh(*args, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head with its dashboard on free ports, a per-module state dir and a short Ray temp dir."""
    state = tmp_path_factory.mktemp("ray-state")
    port, dash = free_port(), free_port()
    temp_dir = f"/tmp/ftc-ray-{os.getpid()}-{port}"  # Ray's socket paths must stay short
    # Token auth is always on (launch/ray_auth.sh); every client here uses the head's token, ~/.ray/auth_token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "FTCLUSTER_RAY_DIR": str(state),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Fixed default ports would collide with any other Ray node on this machine.
    started = sh(LAUNCH / "start_head.sh", "--port", port, "--dashboard-port", dash, "--num-cpus=2",
                 f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
                 f"--ray-client-server-port={free_port()}", env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int((state / "head.pid").read_text())
    patch = pytest.MonkeyPatch()  # for the in-process `ftcluster jobs` calls
    patch.setenv("RAY_AUTH_MODE", "token")
    from ftcluster.launch.cluster import use_token_auth

    use_token_auth(start=False)  # this process's Ray clients too (Ray reads the mode once, at import)
    yield SimpleNamespace(port=port, dashboard=f"http://127.0.0.1:{dash}", env=env, state=state, pid=pid,
                          temp_dir=temp_dir, printed=started.stdout)
    patch.undo()
    stopped = sh(LAUNCH / "stop.sh", env=env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not alive(pid)
    assert not list(state.glob("*.pid"))
    for folder in (temp_dir, f"{temp_dir}-w"):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the jobs ship as their working_dir: small, with a data file broken on line 2."""
    folder = tmp_path_factory.mktemp("workdir")
    (folder / "bad.jsonl").write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n{"instruction": \n')
    return folder


def ftcluster(*args, cwd, env, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcluster.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def finished_job(head, workdir, tmp_path_factory):
    run = tmp_path_factory.mktemp("job") / "run"
    result = ftcluster("train", *TINY, "launcher=ray", f"launcher.address={head.dashboard}", "trainer.max_steps=3",
                       f"output_dir={run}", cwd=workdir, env=head.env)
    found = re.search(r"submitted Ray Job (ftcluster-\d{8}-\d{6}-[0-9a-f]{4})", result.stdout)
    return SimpleNamespace(result=result, run=run, job_id=found and found.group(1))


@pytest.mark.slow
def test_train_runs_as_a_ray_job(finished_job):
    result = finished_job.result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert finished_job.job_id, result.stdout[-3000:]
    # The job's own log, streamed while it ran: the data report and the driver's last line.
    assert "[ftcluster] data train:" in result.stdout
    assert "[ftcluster] done:" in result.stdout
    assert [r["step"] for r in read_metrics(finished_job.run) if "loss" in r] == [1, 2, 3]
    assert (finished_job.run / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_job_that_fails_gives_its_exit_code_and_log(head, workdir, tmp_path):
    # bad.jsonl passes the submitting side's check (the file exists) and fails when the job reads it.
    result = ftcluster("train", *TINY, "launcher=ray", f"launcher.address={head.dashboard}", "data.path=bad.jsonl",
                       f"output_dir={tmp_path / 'run'}", cwd=workdir, env=head.env)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    ended = re.search(r"Ray Job ftcluster-\S+ ended FAILED, driver exit code 2; last \d+ lines of its log:",
                      result.stderr)
    assert ended, result.stderr[-3000:]
    assert "bad.jsonl:2" in result.stderr[ended.end():]  # the driver's one-line error, from the job's log


@pytest.mark.slow
def test_jobs_list_status_logs(head, finished_job, capsys, monkeypatch):
    job = finished_job.job_id
    assert main(["jobs", "list", "--address", head.dashboard]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(job)]
    assert len(listed) == 1 and "SUCCEEDED" in listed[0] and "python -m ftcluster.cli train" in listed[0]

    monkeypatch.setenv("RAY_ADDRESS", head.dashboard)  # the default address when --address is not given
    assert main(["jobs", "status", job]) == 0
    status = capsys.readouterr().out
    assert f"{job}: SUCCEEDED" in status and "driver exit code: 0" in status

    assert main(["jobs", "logs", job]) == 0
    assert "[ftcluster] done:" in capsys.readouterr().out
    assert main(["jobs", "logs", job, "--follow"]) == 0  # a finished job: its whole log, then its exit code
    assert "[ftcluster] done:" in capsys.readouterr().out

    assert main(["jobs", "status", "ftcluster-no-such-job"]) == 2
    assert "no job 'ftcluster-no-such-job'" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_leaves_the_job_running_and_jobs_stop_stops_it(head, capsys):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.dashboard)
    job = client.submit_job(entrypoint="echo started; sleep 300")
    # Ctrl-C's default action in the follower, however this suite was started: a shell running it in the background
    # without job control (`cmd &` in a script) hands every child SIGINT ignored, and Python keeps that.
    follow = subprocess.Popen([sys.executable, "-m", "ftcluster.cli", "jobs", "logs", job, "--follow", "--address",
                               head.dashboard], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=head.env,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(120, follow.kill)
    watchdog.start()
    for line in follow.stdout:  # the job's first line, streamed: the follower is following
        if line.strip() == "started":
            break
    follow.send_signal(signal.SIGINT)
    _, err = follow.communicate(timeout=60)
    watchdog.cancel()
    assert follow.returncode == 130, err
    assert "keeps running" in err and f"ftcluster jobs stop {job}" in err and "Traceback" not in err
    assert client.get_job_status(job) == JobStatus.RUNNING

    assert main(["jobs", "stop", job, "--address", head.dashboard]) == 0
    assert f"{job}: STOPPED" in capsys.readouterr().out
    assert client.get_job_status(job) == JobStatus.STOPPED


@pytest.mark.parametrize("how", ["submit", "join", "auto"])
def test_unreachable_address_fails_fast_and_touches_no_output(tmp_path, capsys, monkeypatch, how):
    """A cluster that is not there is said within seconds, before output_dir exists (a run folder left behind
    would make the corrected command ask for resume=auto). "auto" is where Ray would look: RAY_ADDRESS here; a
    head that stopped since it was recorded on the machine is the same case (Ray would retry for minutes)."""
    port = free_port()
    dead = f"127.0.0.1:{port}"  # nothing listens there
    address = {"submit": f"http://{dead}", "join": dead, "auto": "auto"}[how]
    if how == "auto":
        monkeypatch.setenv("RAY_ADDRESS", dead)
    started = time.time()
    code = main(["train", *TINY, "launcher=ray", f"launcher.address={address}", f"output_dir={tmp_path / 'run'}"])
    assert time.time() - started < 10
    assert code == 2
    err = capsys.readouterr().err
    # (Ray writes this machine's own address for 127.0.0.1 where it looks for "auto")
    assert f"launcher.address={address}" in err and "nothing answers at " in err and f":{port} (" in err, err
    assert "launch/start_head.sh" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_an_address_that_is_not_a_dashboard(head, tmp_path, capsys):
    address = f"http://127.0.0.1:{head.port}"  # the GCS port, a common mix-up with the dashboard's
    assert main(["train", *TINY, "launcher=ray", f"launcher.address={address}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"launcher.address={address}" in err and "not as a Ray dashboard" in err


@pytest.mark.slow
def test_dry_run_shows_the_job_and_submits_nothing(head, workdir, tmp_path, capsys, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.chdir(workdir)
    tricky = """data.system_prompt="It's $HOME \\"x\\" ; `echo no`\""""  # Hydra reads: It's $HOME "x" ; `echo no`
    before = len(JobSubmissionClient(head.dashboard).list_jobs())
    run = tmp_path / "run"
    assert main(["train", *TINY, "launcher=ray", f"launcher.address={head.dashboard}", tricky,
                 f"output_dir={run}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    entrypoint = shlex.split(re.search(r"^entrypoint: (.*)$", out, re.M).group(1))
    assert entrypoint[:4] == ["python", "-m", "ftcluster.cli", "train"]
    # The user's overrides byte for byte, then output_dir made absolute and the job's own address.
    assert entrypoint[4:] == [*TINY, "launcher=ray", f"launcher.address={head.dashboard}", tricky,
                              f"output_dir={run}", f"output_dir={run}", "launcher.address=auto"]
    runtime_env = json.loads(out.split("runtime_env: ", 1)[1])
    assert runtime_env["working_dir"] == str(workdir)
    assert ".git" in runtime_env["excludes"] and "/runs" in runtime_env["excludes"]
    assert runtime_env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    assert len(JobSubmissionClient(head.dashboard).list_jobs()) == before


def test_runtime_env_user_keys_win_and_env_vars_merge(tmp_path, monkeypatch):
    from ftcluster.config import compose
    from ftcluster.launch.ray_jobs import job_runtime_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose([*TINY, "launcher=ray", "launcher.address=http://127.0.0.1:8265", "output_dir=runs/a"])
    cfg.output_dir = str(tmp_path / "runs" / "a")
    cfg.launcher.runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "true", "SEED": 7}, "pip": ["rich"]}
    env = job_runtime_env(cfg)
    assert env["working_dir"] == str(tmp_path) and "/runs/a" in env["excludes"]
    assert env["pip"] == ["rich"]
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "true" and env["env_vars"]["SEED"] == "7"
    assert env["env_vars"]["WANDB_MODE"] == "disabled" and env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    cfg.launcher.runtime_env = {"excludes": ["big"]}
    assert job_runtime_env(cfg)["excludes"] == ["big"]
    cfg.launcher.runtime_env, cfg.launcher.working_dir = {}, None
    assert "working_dir" not in job_runtime_env(cfg) and "excludes" not in job_runtime_env(cfg)


@pytest.mark.slow
def test_launch_scripts_join_and_stop_a_worker(head):
    assert f"launcher.address=http://127.0.0.1:{head.dashboard.rsplit(':', 1)[1]}" in head.printed
    assert "launch/join_worker.sh" in head.printed
    from ray.util.state import list_nodes

    joined = sh(LAUNCH / "join_worker.sh", "--num-cpus=1", f"--temp-dir={head.temp_dir}-w",
                f"--dashboard-agent-listen-port={free_port()}", f"127.0.0.1:{head.port}", env=head.env)
    assert joined.returncode == 0, joined.stdout + joined.stderr
    worker = int((head.state / "worker-1.pid").read_text())
    alive_nodes = [n for n in list_nodes(address=head.dashboard) if n.state == "ALIVE"]
    assert len(alive_nodes) == 2

    stopped = sh(LAUNCH / "stop.sh", "worker-1", env=head.env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not alive(worker) and alive(head.pid)
    assert not (head.state / "worker-1.pid").exists()
    # The head (stopped by the fixture, with launch/stop.sh and no arguments) still serves.
    assert head.pid == int((head.state / "head.pid").read_text())


@pytest.mark.slow
def test_launch_scripts_refuse_bad_input(head, tmp_path):
    env = {**head.env, "FTCLUSTER_RAY_DIR": str(tmp_path)}
    started = time.time()
    joined = sh(LAUNCH / "join_worker.sh", f"127.0.0.1:{free_port()}", env=env)
    assert joined.returncode == 1 and "nothing answers" in joined.stderr and time.time() - started < 10
    again = sh(LAUNCH / "start_head.sh", env=head.env)  # a head from this state dir is already running
    assert again.returncode == 1 and "already running" in again.stderr
    for script in ("start_head.sh", "join_worker.sh", "stop.sh"):
        shown = sh(LAUNCH / script, "--help", env=env)
        assert shown.returncode == 0 and shown.stdout.startswith("usage: launch/")

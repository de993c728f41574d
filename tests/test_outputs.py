"""No command writes over what it did not create, and one process writes a run: `export`, `data` and `eval`
refuse an --out / output_dir holding anything else (the input, a run, the user's files) and replace only their
own marked earlier output with --overwrite; train refuses an empty or foreign output_dir and holds a lock on
its run that a second launch cannot take while the holder lives. Every check on real files, byte for byte.
And what a run prints: its step bar only where the output is a terminal, unless asked."""

import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ftcluster.cli import main
from ftcluster.errors import UserError
from ftcluster.run import lock
from ftcluster.util.outputs import MARKER, mark_folder, sidecar_of
from helpers import INLINE, TINY, refused, train

BUNDLED = Path(__file__).parent.parent / "ftcluster" / "assets" / "data" / "json_extract"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) by its bytes' hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-step inline run of the tiny model with a checkpoint at step 2 (half a minute on 2 busy cores)."""
    out = tmp_path_factory.mktemp("outputs") / "run"
    train(out, *INLINE, "trainer.max_steps=2", "trainer.global_batch=4", "trainer.save_every_steps=2")
    return out


@pytest.fixture
def run_files(tmp_path) -> Path:
    """What export and a launch look at before they write anything, without training: a run's config.yaml,
    manifest.json and a complete checkpoint's trainer_state.json (the refusals come first)."""
    from ftcluster.config import compose, to_yaml
    from ftcluster.train import checkpoint

    out = tmp_path / "run"
    step = checkpoint.checkpoints_dir(out) / "step-2"
    step.mkdir(parents=True)
    (step / checkpoint.STATE_FILE).write_text(json.dumps({"step": 2, "world_size": 1}))
    (out / "config.yaml").write_text(to_yaml(compose([*TINY, *INLINE, f"output_dir={out}"])))
    (out / "manifest.json").write_text("{}")
    (out / "final").mkdir()
    (out / "final" / "config.json").write_text("{}")
    (out / "notes.md").write_text("the user's own notes on this run")
    return out


# ==== export ============================================================================================

@pytest.mark.slow
def test_a_finished_run_leaves_no_lock_and_is_marked_as_a_run(run):
    assert not (run / lock.LOCK_FILE).exists()
    assert json.loads((run / MARKER).read_text())["command"] == "train"


def test_export_into_a_folder_with_notes_is_refused(run_files, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_bytes(b"my notes\n")
    for extra in ([], ["--overwrite"]):
        err = refused(capsys, "export", str(run_files / "checkpoints" / "step-2"), "--out", str(mine), *extra)
        assert str(mine) in err and "notes.txt" in err and "new or empty folder" in err
    assert snapshot(mine) == {"notes.txt": hashlib.sha256(b"my notes\n").hexdigest()}


def test_export_into_its_own_run_folder_is_refused(run_files, capsys):
    run = run_files
    before = snapshot(run)
    for out in (run, run.parent, run / "final", run / "checkpoints" / "step-2" / "x"):
        err = refused(capsys, "export", str(run / "checkpoints" / "step-2"), "--out", str(out), "--overwrite")
        assert str(out) in err
    assert snapshot(run) == before


@pytest.mark.slow
def test_export_twice_needs_overwrite_and_replaces_only_its_own_output(run, tmp_path, capsys):
    step, out = str(run / "checkpoints" / "step-2"), tmp_path / "exported"
    assert main(["export", step, "--out", str(out)]) == 0
    assert json.loads((out / MARKER).read_text())["command"] == "ftcluster export"
    assert "config.json" in json.loads((out / MARKER).read_text())["names"]
    err = refused(capsys, "export", step, "--out", str(out))
    assert "earlier output of ftcluster export" in err and "--overwrite" in err
    assert main(["export", step, "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").is_file()
    (out / "notes.txt").write_text("mine")  # the folder holds something of the user's now: not export's to replace
    err = refused(capsys, "export", step, "--out", str(out), "--overwrite")
    assert "notes.txt" in err and (out / "notes.txt").read_text() == "mine"


# ==== data tools ========================================================================================

def test_dedup_into_the_parent_of_a_saved_split_is_refused(tmp_path, capsys):
    import datasets

    ds = tmp_path / "DS"
    for split, n in (("train", 6), ("test", 3)):
        datasets.Dataset.from_list([{"text": f"{split} record {i}"} for i in range(n)]).save_to_disk(str(ds / split))
    before = snapshot(ds)
    err = refused(capsys, "data", "dedup", str(ds / "train"), "--out", str(ds))
    assert str(ds) in err and "input" in err
    refused(capsys, "data", "dedup", str(ds / "train"), "--out", str(ds / "test"), "--overwrite")
    assert snapshot(ds) == before


def test_contamination_out_onto_the_training_file_is_refused(tmp_path, capsys):
    train_file = tmp_path / "train.jsonl"
    train_file.write_bytes((BUNDLED / "train.jsonl").read_bytes())
    before = train_file.read_bytes()
    for extra in ([], ["--overwrite"]):
        err = refused(capsys, "data", "contamination", str(train_file), str(BUNDLED / "eval.jsonl"),
                      "--out", str(train_file), *extra)
        assert "would overwrite the input" in err and str(train_file) in err
    assert train_file.read_bytes() == before


def test_data_outputs_are_replaced_only_when_marked_and_asked(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"record {i % 4}"}) + "\n" for i in range(8)))
    out = tmp_path / "clean" / "out.jsonl"
    assert main(["data", "dedup", str(src), "--out", str(out)]) == 0
    assert json.loads(sidecar_of(out).read_text())["command"] == "ftcluster data dedup"
    assert "--overwrite" in refused(capsys, "data", "dedup", str(src), "--out", str(out))
    assert main(["data", "dedup", str(src), "--out", str(out), "--overwrite"]) == 0
    out.write_text("edited by hand\n")  # no longer what dedup wrote
    refused(capsys, "data", "dedup", str(src), "--out", str(out), "--overwrite")
    assert out.read_text() == "edited by hand\n"
    # a file of the user's where scrub's report would go
    (tmp_path / "clean" / "s.scrub.json").write_text("mine")
    assert "s.scrub.json" in refused(capsys, "data", "scrub", str(src), "--out", str(tmp_path / "clean" / "s.jsonl"))
    assert not (tmp_path / "clean" / "s.jsonl").exists()

    split = tmp_path / "split"
    assert main(["data", "split", str(src), "--eval-fraction", "0.25", "--out", str(split)]) == 0
    assert "--overwrite" in refused(capsys, "data", "split", str(src), "--eval-fraction", "0.25", "--out", str(split))
    assert main(["data", "split", str(src), "--eval-fraction", "0.25", "--out", str(split), "--overwrite"]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    refused(capsys, "data", "split", str(src), "--eval-fraction", "0.25", "--out", str(mine), "--overwrite")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_eval_into_a_folder_of_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    err = refused(capsys, "eval", "eval.model=tiny", "eval.baseline=null", f"eval.output_dir={tmp_path}")
    assert "eval.output_dir" in err and "notes.txt" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ==== train's output_dir ================================================================================

def launch(capsys, out, *extra) -> str:
    return refused(capsys, "train", *TINY, *INLINE, "trainer.max_steps=1", *extra, f"output_dir={out}")


def test_an_empty_output_dir_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, "train", *TINY, *INLINE, "output_dir=")
    assert "output_dir" in err and "empty" in err
    assert list(tmp_path.iterdir()) == []


def test_an_output_dir_with_a_foreign_file_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_bytes(b"keep me")
    for resume in ("never", "auto"):
        err = launch(capsys, tmp_path, f"resume={resume}")
        assert str(tmp_path) in err and "notes.txt" in err
    assert snapshot(tmp_path) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()}


def _lock_record(pid: int, host: str | None = None) -> dict:
    return {"host": host or socket.gethostname(), "pid": pid, "pid_start": lock._pid_start(pid),
            "boot_id": lock._boot_id(), "started_at": "2026-01-01T00:00:00Z", "id": "holder"}


def test_a_second_launch_while_the_lock_is_held_is_refused(run_files, capsys):
    run = run_files
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (run / lock.LOCK_FILE).write_text(json.dumps(_lock_record(holder.pid)))
        before = snapshot(run)
        err = launch(capsys, run, "resume=auto", "trainer.max_steps=3")
        assert f"pid {holder.pid}" in err and f"host {socket.gethostname()}" in err and str(run) in err
        assert snapshot(run) == before  # nothing written, the holder's lock included
    finally:
        holder.kill()
        holder.wait()
        (run / lock.LOCK_FILE).unlink()


def test_a_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: the pid is free
    (tmp_path / lock.LOCK_FILE).write_text(json.dumps(_lock_record(gone.pid)))
    held = lock.acquire(tmp_path)
    try:
        assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        assert f"pid {gone.pid} is gone" in capsys.readouterr().out
    finally:
        lock.release(tmp_path)
    assert not (tmp_path / lock.LOCK_FILE).exists() and held.path.parent == tmp_path


def test_a_live_pid_that_is_another_process_now_is_stale(tmp_path):
    record = {**_lock_record(os.getppid()), "pid_start": 1}  # the pid lives, but started at another time
    (tmp_path / lock.LOCK_FILE).write_text(json.dumps(record))
    lock.acquire(tmp_path)
    lock.release(tmp_path)


def test_a_lock_from_another_host_is_taken_over_only_when_not_refreshed(tmp_path):
    path = tmp_path / lock.LOCK_FILE
    path.write_text(json.dumps(_lock_record(12345, host="other-node")))
    with pytest.raises(UserError, match="host other-node, pid 12345"):
        lock.acquire(tmp_path)  # fresh: its holder's heartbeat is alive
    old = time.time() - lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    lock.acquire(tmp_path)
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    lock.release(tmp_path)
    assert not path.exists()


def test_the_submitting_side_takes_no_lock(tmp_path):
    out = tmp_path / "job"
    lock.check_submission(out)  # writes nothing: a refused request leaves no folder behind
    assert not out.exists()
    out.mkdir()
    mark_folder(out, "train", names=[])  # what the SLURM submitter does once the cluster accepts the request
    assert sorted(p.name for p in out.iterdir()) == [MARKER]  # a run folder now, unlocked for the job
    (out / "ftcluster.sbatch").write_text("#!/bin/bash\n")  # what the submitter writes next
    lock.claim(out)  # the job's own `ftcluster train`
    assert (out / lock.LOCK_FILE).is_file()
    lock.release(out)


def test_a_sweep_trial_folder_is_the_trial_run_s_own(tmp_path):
    """The sweep writes the trial's record, and its SLURM backend's Hydra job .hydra/ and a log, before the run."""
    trial = tmp_path / "trials" / "point_000"
    (trial / ".hydra").mkdir(parents=True)
    (trial / "trial.json").write_text(json.dumps({"trial": "point_000", "status": "submitted"}))
    (trial / "train.log").write_text("")
    lock.claim(trial)
    lock.release(trial)
    assert sorted(p.name for p in trial.iterdir()) == sorted([".hydra", MARKER, "train.log", "trial.json"])


def test_a_run_that_fails_while_preparing_releases_its_lock_and_stays_a_run(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + '{"instruction": "x"}\n')
    out = tmp_path / "run"
    err = launch(capsys, out, f"data.path={data}", "data.eval_path=null", "data.format=alpaca")
    assert "bad.jsonl:2" in err
    assert not (out / lock.LOCK_FILE).exists()
    # what it left is its own: the next launch into it is not refused as a folder of other files
    from ftcluster.util.outputs import check_run_dir

    assert check_run_dir(str(out), lock.OWN_NAMES) == out


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    held = lock.acquire(tmp_path)
    try:
        old = time.time() - 3600
        os.utime(held.path, (old, old))
        deadline = time.time() + 10
        while held.path.stat().st_mtime < time.time() - 60 and time.time() < deadline:
            time.sleep(0.05)
        assert held.path.stat().st_mtime > time.time() - 60
    finally:
        lock.release(tmp_path)


def test_a_requeued_slurm_job_takes_over_its_earlier_attempt_s_lock(tmp_path, monkeypatch):
    path = tmp_path / lock.LOCK_FILE
    path.write_text(json.dumps({**_lock_record(12345, host="other-node"), "slurm_job": "77:0"}))
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: the lock is fresh and held
    with pytest.raises(UserError, match="host other-node"):
        lock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued
    lock.acquire(tmp_path)
    assert json.loads(path.read_text())["slurm_job"] == "77:1"
    lock.release(tmp_path)


def test_the_step_bar_is_drawn_on_a_terminal_only_unless_asked(tmp_path, capfd, monkeypatch):
    """tracking.progress null (the default): a bar when the command's output is a terminal; in a log file its
    redraws would repeat around every line. true or false decides either way; config.yaml keeps what was asked."""
    import sys

    run = [*TINY, *INLINE, "tracking=default", "trainer.max_steps=2"]
    train(tmp_path / "log-file", *run)  # pytest captures stderr: no terminal
    assert "step/s" not in capfd.readouterr().err
    assert "progress: null" in (tmp_path / "log-file" / "config.yaml").read_text()

    train(tmp_path / "asked", *run, "tracking.progress=true")
    assert "step/s" in capfd.readouterr().err

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(tmp_path / "terminal", *run)
    assert "step/s" in capfd.readouterr().err
    train(tmp_path / "declined", *run, "tracking.progress=false")
    assert "step/s" not in capfd.readouterr().err

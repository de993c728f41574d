"""`ftcluster sweep` and `ftcluster bench` write only where they may: a sweep's output_dir and bench's --work are
new, empty or the same command's earlier, marked output, and locked against a second sweep or bench while one
lives; bench's report in --results (a folder reports share) replaces only its own earlier report, with
--overwrite. Every refusal names the path and leaves the folder byte for byte as it was; none starts Ray."""

import hashlib
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from omegaconf import open_dict

from ftcluster.bench import hardware, report
from ftcluster.bench.main import COMMAND as BENCH, WORK_NAMES
from ftcluster.cli import main
from ftcluster.config import compose
from ftcluster.errors import ConfigError
from ftcluster.run import lock
from ftcluster.sweep import command as sweep_command
from ftcluster.sweep.plan import make_plan
from ftcluster.util.outputs import MARKER, mark_files, mark_folder, read_marker
from helpers import TINY, refused

SWEEP = [*TINY, "launcher.workers=1", "sweep.params.optim.lr=grid(1e-3, 1e-2)", "sweep.search=grid"]
# One cell on launcher=inline: seconds, no Ray.
SUITE = ("base: [model=tiny, data=json_extract, peft=none, tracking=none, launcher=inline, launcher.workers=1,"
         " trainer.max_seq_len=256, trainer.micro_batch_per_device=2, trainer.global_batch=8]\n"
         "warmup_steps: 1\nmeasure_steps: 2\nmatrix: {strategy: [zero0]}\n")


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def holder():
    """A live process of this host, to stand as a lock's holder."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def hold(folder: Path, pid: int) -> None:
    record = {"host": socket.gethostname(), "pid": pid, "pid_start": lock._pid_start(pid),
              "boot_id": lock._boot_id(), "started_at": "2026-01-01T00:00:00Z", "id": "holder"}
    (folder / lock.LOCK_FILE).write_text(json.dumps(record))


def sweep_plan(out: Path):
    """The sweep's config and plan as `ftcluster sweep` makes them, with output_dir resolved."""
    overrides, params = sweep_command.split_params([*SWEEP, f"output_dir={out}"])
    cfg = compose(overrides)
    with open_dict(cfg.sweep.params):
        cfg.sweep.params.update(params)
    cfg.output_dir = str(out.resolve())
    return cfg, make_plan(cfg)


# ==== sweep ==============================================================================================

def test_a_sweep_into_a_folder_of_the_user_s_files_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"keep me")
    err = refused(capsys, "sweep", *SWEEP, f"output_dir={out}")
    assert f"output_dir {out} is not empty" in err and "notes.txt" in err and "new or empty folder" in err, err
    assert snapshot(out) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()}  # no marker, spec or lock


def test_a_sweep_folder_is_marked_locked_and_continued_only_with_resume_auto(tmp_path):
    out = tmp_path / "sweep"
    cfg, plan = sweep_plan(out)
    assert sweep_command.claim(out, cfg, plan.space) is False
    marker = read_marker(out)
    assert marker["command"] == "ftcluster sweep"
    names = {"sweep.yaml", "trials", "best.yaml", "sweep.csv", "sweep_optim.lr.png", lock.LOCK_FILE}
    assert names <= set(marker["names"])
    assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release(out)
    assert not (out / lock.LOCK_FILE).exists()
    (out / "trials" / "trial_0").mkdir(parents=True)  # a trial started: the sweep is under way
    with pytest.raises(ConfigError, match="already holds a sweep. Continue it with resume=auto"):
        sweep_command.claim(out, cfg, plan.space)
    assert not (out / lock.LOCK_FILE).exists()  # a refused claim leaves no lock behind
    cfg.resume = "auto"
    assert sweep_command.claim(out, cfg, plan.space) is True
    lock.release(out)
    (out / "notes.txt").write_text("mine")  # the user's file beside the sweep's: not the sweep's folder any more
    with pytest.raises(Exception, match="notes.txt"):
        sweep_command.claim(out, cfg, plan.space)


def test_a_second_sweep_while_one_runs_is_refused_naming_it(tmp_path, capsys, holder):
    out = tmp_path / "sweep"
    cfg, plan = sweep_plan(out)
    sweep_command.claim(out, cfg, plan.space)
    lock.release(out)
    hold(out, holder.pid)
    before = snapshot(out)
    err = refused(capsys, "sweep", *SWEEP, f"output_dir={out}", "resume=auto")
    assert f"pid {holder.pid}" in err and f"host {socket.gethostname()}" in err and str(out) in err, err
    assert snapshot(out) == before  # the holder's lock, marker and spec untouched


# ==== bench ==============================================================================================

def suite(tmp_path: Path) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(SUITE)
    return str(path)


def report_files(results: Path) -> list[Path]:
    return report.files(results, report.stem("mine", hardware.machine_name()))


def test_bench_work_folder_of_the_user_s_files_is_refused_untouched(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    (work / "notes.txt").write_bytes(b"keep me")
    err = refused(capsys, "bench", f"suite={suite(tmp_path)}", "--work", str(work), "--results", str(results))
    assert f"--work {work} is not empty" in err and "notes.txt" in err, err
    assert snapshot(work) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()}
    assert not results.exists()


def test_bench_report_over_a_file_it_did_not_write_is_refused(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    results.mkdir()
    md = report_files(results)[2]
    md.write_bytes(b"my own notes\n")
    err = refused(capsys, "bench", f"suite={suite(tmp_path)}", "--work", str(work), "--results", str(results))
    assert f"{md} already exists and is a file that ftcluster bench did not write" in err, err
    assert snapshot(results) == {md.name: hashlib.sha256(b"my own notes\n").hexdigest()}
    assert not work.exists()  # refused before any cell ran


def test_bench_replaces_its_own_earlier_report_only_with_overwrite(tmp_path, capsys):
    work, results = tmp_path / "work", tmp_path / "results"
    results.mkdir()
    jsonl = report_files(results)[0]
    jsonl.write_text("{}\n")
    mark_files([jsonl], BENCH)  # an earlier report of bench's, as its sidecar records it
    err = refused(capsys, "bench", f"suite={suite(tmp_path)}", "--work", str(work), "--results", str(results))
    assert f"{jsonl} is an earlier output of ftcluster bench; pass --overwrite" in err, err
    assert jsonl.read_text() == "{}\n"
    code = main(["bench", f"suite={suite(tmp_path)}", "--work", str(work), "--results", str(results), "--overwrite"])
    assert code == 0, capsys.readouterr().err
    (record,) = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert record["status"] == "ok"
    assert read_marker(work)["command"] == BENCH and not (work / lock.LOCK_FILE).exists()
    # Run again: the work folder is bench's own (its cells are skipped), the report needs --overwrite again.
    err = refused(capsys, "bench", f"suite={suite(tmp_path)}", "--work", str(work), "--results", str(results))
    assert "pass --overwrite" in err


def test_a_second_bench_into_a_work_folder_in_use_is_refused_naming_it(tmp_path, capsys, holder):
    work, results = tmp_path / "work", tmp_path / "results"
    mark_folder(work, BENCH, WORK_NAMES)
    hold(work, holder.pid)
    before = snapshot(work)
    err = refused(capsys, "bench", f"suite={suite(tmp_path)}", "--work", str(work), "--results", str(results))
    assert f"pid {holder.pid}" in err and str(work) in err, err
    assert snapshot(work) == before and MARKER in before


def test_bench_work_and_results_may_not_overlap(tmp_path, capsys):
    err = refused(capsys, "bench", f"suite={suite(tmp_path)}", "--work", str(tmp_path / "w"), "--results",
                  str(tmp_path / "w" / "results"))
    assert "overlap" in err and str(tmp_path / "w") in err
    assert not (tmp_path / "w").exists()

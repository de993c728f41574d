"""What survives a stop, a kill, a crash or a power loss, checked on real files, processes and signals.

Signals: SIGTERM to a running `ftcluster train` (launcher=processes, sent to its whole process group as
systemd does) checkpoints and exits 75, and resume=auto ends where an uninterrupted run ends; SIGKILL of
the driver leaves no rank alive; a signal while the command is still importing stops it cleanly (75), not
with the default death (143), and one recorded after the driver's last look is handed to the run's handler;
SIGTERM under launcher=local checkpoints, exits 75 and resumes; the RL controller stops on a NaN loss.
Durability: checkpoints synced before their rename; resume=auto skips an unusable newest checkpoint and says
so; a torn metrics line and partial `.tmp-step-*` folders are dropped at start (only those); JSON Lines with
U+2028 read back as written. Timelines: resuming from an older checkpoint sets the newer ones aside, byte for
byte, where neither resume=auto nor pruning sees them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from omegaconf import OmegaConf

from helpers import TINY, last_step, ranks_held
from ftcluster.observe import track
from ftcluster.run.preflight import resolve_resume
from ftcluster.train import checkpoint, checkpoint_io
from ftcluster.util import atomic

# Two ranks on plain processes: long enough to interrupt after a couple of steps.
STEPS = 16
PROCESSES = [*TINY, "launcher=processes", "strategy=zero2", f"trainer.max_steps={STEPS}"]
INLINE_RUN = [*TINY, "launcher=inline", "launcher.workers=1"]


class WritingEngine:
    """DeepSpeed's side of a save, as files: what checkpoint_io.save and commit are tested on without a model."""

    def save_checkpoint(self, save_dir, tag, exclude_frozen_parameters):
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)


def save(root: Path, *steps: int, keep_last: int = 0) -> None:
    for step in steps:
        checkpoint_io.save(WritingEngine(), root, step, {"data": {}}, keep_last=keep_last, exclude_frozen=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start(out: Path, *overrides: str) -> subprocess.Popen:
    """The real CLI in a fresh process, in its own process group (so that the test can signal all of it)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.Popen([sys.executable, "-m", "ftcluster.cli", "train", *overrides, f"output_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PATH": path})


def wait_for(proc: subprocess.Popen, predicate, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended ({proc.returncode}) before {what}: {err[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for `sig` (the SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    mask = int(next(line for line in status.split("\n") if line.startswith("SigCgt:")).split()[1], 16)
    return bool(mask >> (sig - 1) & 1)


def rank_pids(out: Path) -> list[int]:
    return [w["pid"] for w in json.loads((out / "workers.json").read_text())]


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# ==== Signals ============================================================================================

@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The uninterrupted run the stopped and resumed one must reproduce."""
    out = tmp_path_factory.mktemp("whole")
    proc = start(out, *PROCESSES)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resume_reaches_the_uninterrupted_result(whole, tmp_path):
    out = tmp_path / "run"
    proc = start(out, *PROCESSES)
    wait_for(proc, lambda: last_step(out) >= 2, "two logged steps")
    with ranks_held(out) as ranks:
        os.killpg(proc.pid, signal.SIGTERM)  # driver and ranks alike, as systemd or `kill -- -PGID` would
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "resume=auto continues" in err
    newest = checkpoint.latest_checkpoint(out)
    assert newest is not None and checkpoint.unusable(newest) is None
    stopped_at = checkpoint.read_state(newest)["step"]
    assert 2 <= stopped_at < STEPS
    assert all(gone(pid) for pid in ranks)

    proc = start(out, *PROCESSES, "resume=auto")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    resumed = {r["step"]: r["loss"] for r in track.read_metrics(out) if "loss" in r}
    reference = {r["step"]: r["loss"] for r in track.read_metrics(whole) if "loss" in r}
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_sigkilled_driver_leaves_no_rank_alive(tmp_path):
    out = tmp_path / "run"
    proc = start(out, *TINY, "launcher=processes", "strategy=zero2", "trainer.max_steps=100000")
    wait_for(proc, lambda: last_step(out) >= 1 and (out / "workers.json").is_file(), "a logged step")
    ranks = rank_pids(out)
    assert all(not gone(pid) for pid in ranks)
    proc.send_signal(signal.SIGKILL)  # the driver only: nothing of ours runs after this
    proc.communicate(timeout=60)
    deadline = time.time() + 30
    while not all(gone(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert all(gone(pid) for pid in ranks), f"ranks outlived the driver: {[p for p in ranks if not gone(p)]}"


@pytest.mark.slow
def test_sigterm_under_launcher_inline_checkpoints_and_exits_75(tmp_path):
    """The driver is the rank: the same request file, seen at the step boundary."""
    out = tmp_path / "run"
    proc = start(out, *INLINE_RUN, "trainer.max_steps=100000")
    wait_for(proc, lambda: last_step(out) >= 2, "two logged steps")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    newest = checkpoint.latest_checkpoint(out)
    assert newest is not None and checkpoint.read_state(newest)["step"] >= 2


@pytest.mark.slow
def test_a_second_sigterm_kills_the_driver_and_its_ranks(tmp_path):
    out = tmp_path / "run"
    proc = start(out, *TINY, "launcher=processes", "strategy=zero2", "trainer.max_steps=100000")
    wait_for(proc, lambda: last_step(out) >= 1 and (out / "workers.json").is_file(), "a logged step")
    ranks = rank_pids(out)
    proc.send_signal(signal.SIGTERM)
    wait_for(proc, lambda: (out / ".stop-requested").exists(), "the stop request")  # two at once may merge into one
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    deadline = time.time() + 30
    while not all(gone(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert all(gone(pid) for pid in ranks)


def test_a_signal_while_the_command_starts_stops_it_cleanly(tmp_path):
    """From the first line of `ftcluster train` on (before torch, Hydra or the data are imported), SIGTERM
    ends the command with 75 and a message, not the default death (143) with nothing said."""
    out = tmp_path / "run"
    proc = start(out, *TINY, "launcher=inline", "launcher.workers=1", "trainer.max_steps=2")
    wait_for(proc, lambda: catches(proc.pid, signal.SIGTERM), "the handler", timeout=60)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "before training began" in err and "Traceback" not in err
    assert checkpoint.latest_checkpoint(out) is None


def test_sigusr1_while_the_command_starts_exits_75_with_output_dir_untouched(tmp_path):
    """The handler records the signal as the command's first act; the driver acts on it between its phases, here
    before anything is written: no run folder, no lock."""
    out = tmp_path / "run"
    proc = start(out, *TINY, "launcher=inline", "launcher.workers=1", "trainer.max_steps=2")
    wait_for(proc, lambda: catches(proc.pid, signal.SIGUSR1), "the handler", timeout=60)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped on request (SIGUSR1) before training began" in err and "Traceback" not in err
    assert not out.exists()


def test_a_signal_recorded_at_start_is_handed_to_the_run_s_handler(tmp_path):
    """A stop signal after the driver's last look (between preparation and the launch) is not lost: the run's
    handler turns it into the request file the workers stop on at their first step boundary. Real signals, to
    this process."""
    from ftcluster.train import stop

    replaced = stop.stop_early()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded, not acted on: this test goes on
        with stop.handling_signals(tmp_path):
            assert stop.seen(tmp_path)
        stop.check_early()  # taken over by the handler: nothing left to end the command with
        stop.stop_early()  # (the run's handler put the default actions back when it ended)
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(stop.StoppedBeforeTraining, match=r"stopped on request \(SIGTERM\) before training"):
            stop.check_early()
    finally:
        stop.restore(replaced)
    assert signal.getsignal(signal.SIGTERM) == replaced[signal.SIGTERM]


@pytest.mark.slow
def test_sigterm_under_launcher_local_checkpoints_exits_75_and_resume_finishes(tmp_path):
    """launcher=local (a Ray cluster the driver starts): SIGTERM to the driver checkpoints after the current step
    and exits 75; resume=auto continues from that checkpoint to the end. The resume runs under
    launcher=processes: a checkpoint does not depend on the launcher that wrote it, resuming under launcher=local
    is test_resume_export's, and a second Ray start here cost the suite some 15 s."""
    out = tmp_path / "run"
    local = [*TINY, "launcher=local", "launcher.workers=1", "strategy=zero2", f"trainer.max_steps={STEPS}"]
    proc = start(out, *local)
    wait_for(proc, lambda: last_step(out) >= 2, "two logged steps", timeout=600)
    with ranks_held(out):
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    newest = checkpoint.latest_checkpoint(out)
    assert newest is not None and checkpoint.unusable(newest) is None
    stopped_at = checkpoint.read_state(newest)["step"]
    assert 2 <= stopped_at < STEPS and not (out / "final").exists()
    proc = start(out, *local, "launcher=processes", "resume=auto")
    out_text, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    steps = sorted(r["step"] for r in track.read_metrics(out) if "loss" in r)
    assert steps == list(range(1, STEPS + 1)) and (out / "final").is_dir()


@pytest.mark.slow
def test_the_rl_controller_stops_on_a_non_finite_loss_naming_the_step(tmp_path):
    """GRPO: a reward too large for float32 (finite as Python reads it) makes the advantages, and so the loss,
    NaN at step 1; the controller stops there, naming the step, and saves nothing of that step."""
    rewards = tmp_path / "huge_rewards.py"
    # Every sample: a group with one such reward already turns NaN, but which completions have odd length (the
    # earlier condition) depends on sampling, and a step whose samples all scored 0 trained on finite numbers.
    rewards.write_text("def huge(prompt, completion, **fields):\n    return 1e300\n")
    out = tmp_path / "run"
    proc = start(out, *TINY, "stage=grpo", "launcher.workers=1", f"stage.rl.reward_fn={rewards}:huge",
                 "stage.rl.prompts_per_step=2", "stage.rl.samples_per_prompt=2", "trainer.global_batch=4",
                 "stage.rl.max_new_tokens=8", "trainer.max_steps=3", "trainer.save_every_steps=1")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 2, err[-3000:]
    assert "step 1: non-finite loss=nan" in err and "trainer.on_nonfinite=stop" in err, err[-3000:]
    assert checkpoint.latest_checkpoint(out) is None and not (out / "final").exists()


# ==== Durability =========================================================================================

def test_a_checkpoint_is_synced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, Path.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(self, target):
        events.append(("rename", str(self), str(target)))
        return real_replace(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "replace", replace)
    save(tmp_path, 3)
    final = tmp_path / "checkpoints" / "step-3"
    tmp = atomic.pending(final)
    renamed = events.index(("rename", str(tmp), str(final)))
    synced_before = {path for kind, path, *_ in events[:renamed] if kind == "fsync"}
    written = {str(tmp / name) for name in snapshot(final)} | {str(tmp), str(tmp / checkpoint.TAG)}
    assert written <= synced_before
    assert ("fsync", str(final.parent)) in events[renamed:]


def test_resume_auto_skips_an_unusable_newest_checkpoint_and_says_so(tmp_path, capsys):
    save(tmp_path, 2, 4, 6, 8)
    root = tmp_path / "checkpoints"
    state = root / "step-8" / checkpoint.STATE_FILE
    state.write_text(state.read_text()[:40])  # trainer_state.json cut short
    (root / "step-6" / checkpoint.TAG / "mp_rank_00_model_states.pt").unlink()  # an engine file missing
    weights = root / "step-4" / checkpoint.TAG / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[:10])  # cut short
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "resume": "auto", "trainer": {"max_steps": 10}})
    assert resolve_resume(cfg, SimpleNamespace(world_size=1)) == root / "step-2"
    said = capsys.readouterr().out
    for step, why in ((8, "trainer_state.json cannot be read"), (6, "state/mp_rank_00_model_states.pt is missing"),
                      (4, "state/mp_rank_00_model_states.pt has 10 bytes, 700 were written")):
        assert f"skipping the checkpoint {root / f'step-{step}'}: {why}" in said
    # resume=PATH to an unusable one is refused, with the reason
    cfg.resume = str(root / "step-6")
    with pytest.raises(Exception, match="cannot be resumed: state/mp_rank_00_model_states.pt is missing"):
        resolve_resume(cfg, SimpleNamespace(world_size=1))


def test_start_removes_partial_saves_only_and_sets_unusable_ones_aside(tmp_path):
    save(tmp_path, 2, 4)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-6" / checkpoint.TAG).mkdir(parents=True)  # a save cut short
    (root / ".tmp-step-6" / checkpoint.TAG / "half.pt").write_bytes(b"x")
    (root / ".tmp-notes").mkdir()
    (root / ".tmp-step-7.txt").write_text("mine")
    (root / "step-4" / checkpoint.STATE_FILE).write_text("{")  # unusable: resume=auto takes step-2
    kept = {name: snapshot(root / name) for name in ("step-2", ".tmp-notes")}
    unusable = snapshot(root / "step-4")
    checkpoint.start_history(tmp_path, checkpoint.latest_checkpoint(tmp_path))
    assert not (root / ".tmp-step-6").exists()
    assert (root / ".tmp-step-7.txt").read_text() == "mine"
    assert {name: snapshot(root / name) for name in kept} == kept
    (aside,) = root.glob("abandoned-*")
    assert snapshot(aside / "step-4") == unusable
    assert checkpoint.latest_checkpoint(tmp_path) == root / "step-2"


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 6, "lo')
    assert [r["step"] for r in track.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    track.truncate_metrics(tmp_path, after_step=5)
    assert (tmp_path / "metrics.jsonl").read_bytes() == "".join(rows).encode()
    track.truncate_metrics(tmp_path, after_step=3)
    assert (tmp_path / "metrics.jsonl").read_bytes() == "".join(rows[:3]).encode()


def test_json_lines_with_unicode_line_separators_read_back_as_written(tmp_path):
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "tracking": {"progress": False, "wandb": {"enabled": False},
                                                                       "tensorboard": False}})
    tracker = track.Tracker(cfg, 0, 2)
    samples = [{"step": 1, "completion": "line\u2028separator\u2029paragraph\x85next\x1cfile\rcr", "reward": 1.0},
               {"step": 2, "completion": "plain", "reward": 0.5}]
    tracker.log_rows(track.ROLLOUTS_FILE, samples)
    tracker.log(1, {"loss": 0.5, "note": "a\u2028b"})
    tracker.close()
    written = (tmp_path / track.ROLLOUTS_FILE).read_bytes()
    assert "\u2028".encode() in written  # kept as is, not escaped
    assert track.read_metrics(tmp_path, track.ROLLOUTS_FILE) == samples
    assert track.read_metrics(tmp_path) == [{"step": 1, "loss": 0.5, "note": "a\u2028b"}]
    track.truncate_metrics(tmp_path, 2, track.ROLLOUTS_FILE)
    assert (tmp_path / track.ROLLOUTS_FILE).read_bytes() == written


# ==== Timelines ==========================================================================================

def test_resuming_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    save(tmp_path, 2, 4, 6)
    root = tmp_path / "checkpoints"
    abandoned = {name: snapshot(root / name) for name in ("step-4", "step-6")}
    checkpoint.start_history(tmp_path, root / "step-2")  # resume=PATH to step-2
    (aside,) = root.glob("abandoned-*")
    assert {p.name: snapshot(p) for p in aside.iterdir()} == abandoned
    assert checkpoint.latest_checkpoint(tmp_path) == root / "step-2"
    # the new timeline saves step-3, step-5 with keep-last 2: the abandoned ones neither count nor go
    save(tmp_path, 3, 5, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-3", "step-5"]
    assert checkpoint.latest_checkpoint(tmp_path) == root / "step-5"
    assert {p.name: snapshot(p) for p in aside.iterdir()} == abandoned
    # resume=auto from here continues the new timeline: nothing set aside
    checkpoint.start_history(tmp_path, checkpoint.latest_checkpoint(tmp_path))
    assert len(list(root.glob("abandoned-*"))) == 1


@pytest.mark.slow
def test_resume_auto_never_jumps_back_into_an_abandoned_timeline(tmp_path):
    """A run to step 6 (checkpoints 2, 4, 6), resumed from step 2 and stopped at 3: resume=auto continues from 3,
    not from the abandoned 6 (which would call the run complete), and ends with the first run's losses."""
    out = tmp_path / "run"
    steps = [*INLINE_RUN, "trainer.max_steps=6", "trainer.save_every_steps=2", "trainer.keep_last_checkpoints=5"]
    for extra in ([], [f"resume={out / 'checkpoints' / 'step-2'}", "trainer.stop_after_steps=3"], ["resume=auto"]):
        if extra[:1] == ["resume=auto"]:
            first = {r["step"]: r["loss"] for r in track.read_metrics(tmp_path / "first") if "loss" in r}
        proc = start(out, *steps, *extra)
        said, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        if not extra:
            (tmp_path / "first").mkdir()
            (tmp_path / "first" / "metrics.jsonl").write_bytes((out / "metrics.jsonl").read_bytes())
            abandoned = {name: snapshot(out / "checkpoints" / name) for name in ("step-4", "step-6")}
    assert "step-3 at step 3" in said
    (aside,) = (out / "checkpoints").glob("abandoned-*")
    assert {p.name: snapshot(p) for p in aside.iterdir()} == abandoned
    resumed = {r["step"]: r["loss"] for r in track.read_metrics(out) if "loss" in r}
    assert sorted(resumed) == list(range(1, 7)) and resumed == pytest.approx(first, rel=1e-5)

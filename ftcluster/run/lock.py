"""One writer per run: the driver holds `output_dir/.ftcluster.lock` for the whole life of the run.

The lock is a file created with O_CREAT|O_EXCL, which is atomic on a local disk and on NFS alike (fcntl and flock
locks are not reliably honoured across NFS clients). It records the holder's host, pid, the pid's start time
(/proc, so a reused pid is told apart) and the host's boot id. A heartbeat thread touches it every HEARTBEAT_S
seconds while the run lives; it is removed when the driver exits, on success, on an error and on a stop.

A lock is stale, and is taken over (saying so), when
- its holder ran on this host and its pid is gone, is another process now, or the host has rebooted since;
- its holder ran on another host and it has not been touched for STALE_AFTER_S seconds (the holder's heartbeat
  stopped: the process or its node died). That compares the file's modification time, set by the file server,
  with this host's clock: keep the nodes' clocks in sync (NTP) to within a fraction of it.
- it was taken by an earlier attempt of this same SLURM job, which SLURM requeued (same job id, another restart
  count): SLURM ended that attempt before starting this one, perhaps on another node.
Otherwise the launch is refused, naming the holder. The submitting side of launcher=slurm or a Ray Job takes no
lock: the job runs `ftcluster train` again, and that process takes it.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from ftcluster.errors import UserError
from ftcluster.train.stop import REQUEST_FILE
from ftcluster.util.outputs import check_run_dir, is_run, mark_folder

LOCK_FILE = ".ftcluster.lock"
HEARTBEAT_S = 20.0
# Six missed heartbeats: room for NFS attribute caching (up to 60 s by default) and some clock skew.
STALE_AFTER_S = 6 * HEARTBEAT_S

# What ftcluster itself may leave in a run folder before the run's config.yaml: the lock, a stop request, a sweep
# trial's record (ftcluster.sweep.trial writes it before the trial's run starts).
TRIAL_RECORD = "trial.json"
OWN_NAMES = (LOCK_FILE, REQUEST_FILE, TRIAL_RECORD)

_held: dict[Path, "RunLock"] = {}


def check_output_dir(value) -> Path:
    """Before anything else (writes nothing): output_dir is set, and no live process is running in it."""
    if value is None or not str(value).strip():
        check_run_dir(value)  # refuses it: an empty output_dir would mean the current folder
    out = Path(str(value)).resolve()
    check_free(out)
    return out


def claim(output_dir: str | Path) -> "RunLock":
    """Right before the first write: output_dir is new, empty or a run (refused otherwise, untouched); then the
    lock, and the marker that makes the folder a run from its first file on (a run that dies while preparing its
    data is still recognised as one when it is launched again)."""
    out = _check_folder(output_dir)
    lock = acquire(out)
    if not is_run(out):
        mark_folder(out, "train", names=[])
    return lock


def _check_folder(output_dir: str | Path) -> Path:
    """check_run_dir, except in a sweep trial's folder: the sweep made it for this run, and its SLURM backend's
    Hydra job writes there (.hydra/, a log) before the run starts."""
    record = Path(output_dir) / TRIAL_RECORD
    try:
        if "trial" in json.loads(record.read_text()):
            return Path(output_dir).resolve()
    except (OSError, ValueError, TypeError):
        pass
    return check_run_dir(output_dir, (*OWN_NAMES, *_job_logs(Path(output_dir))))


def _job_logs(folder: Path) -> list[str]:
    """Inside a SLURM job, the job's own log in the run folder (`sbatch --output=RUN/slurm.log` on the template,
    as a user may submit it): SLURM creates it before the run starts."""
    if "SLURM_JOB_ID" not in os.environ or not folder.is_dir():
        return []
    return [p.name for p in folder.iterdir() if p.is_file() and p.name.startswith("slurm") and p.suffix in (".log", ".out")]


def check_submission(output_dir: str | Path) -> None:
    """The submitting side of a SLURM or Ray job: the same refusals as claim(), writing nothing and taking no lock
    (the job's own `ftcluster train` takes it; the SLURM submitter marks the folder once the cluster has accepted
    the request's shape, before it writes its script there)."""
    out = _check_folder(output_dir)
    check_free(out)


class RunLock:
    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record
        self.owner = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ftcluster-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._ours():
                print(f"[ftcluster] warning: the lock {self.path} is no longer this run's; another process took it "
                      f"over", flush=True)
                return
            try:
                os.utime(self.path)
            except OSError:
                pass

    def _ours(self) -> bool:
        return (_read(self.path) or {}).get("id") == self.record["id"]

    def release(self) -> None:
        self._stop.set()
        if self._ours():
            self.path.unlink(missing_ok=True)


def lock_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / LOCK_FILE


def check_free(output_dir: str | Path) -> None:
    """Refuse now if a live process holds the run (writes nothing): for the checks before a launch or a submission."""
    path = lock_path(output_dir)
    holder = _read(path)
    if path.exists() and _stale_reason(path, holder) is None:
        raise _in_use(Path(output_dir), path, holder)


def acquire(output_dir: str | Path) -> RunLock:
    """Take the lock of `output_dir` (created if need be) for this process until release() or exit."""
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
              "boot_id": _boot_id(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "heartbeat_s": HEARTBEAT_S, "stale_after_s": STALE_AFTER_S, "slurm_job": _slurm_job(),
              "id": uuid.uuid4().hex}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(out, path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        lock = RunLock(path, record)
        _held[out] = lock
        return lock
    raise _in_use(out, path, _read(path))


def release(output_dir: str | Path) -> None:
    """Release the lock this thread took on output_dir (a refused second launch releases nothing)."""
    out = Path(output_dir).resolve()
    lock = _held.get(out)
    if lock is not None and lock.owner == threading.get_ident():
        del _held[out]
        lock.release()


@atexit.register
def _release_all() -> None:
    for lock in list(_held.values()):
        lock.release()
    _held.clear()


def _take_over_if_stale(out: Path, path: Path) -> None:
    """Move a stale lock aside; raise when it is held. Two launches may find the same stale lock: the lock is
    renamed to a name of this process's own and checked to be the one judged stale before it is removed, and a
    fresh lock moved by mistake is put back (a hard link, which fails rather than replace a newer one)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    holder = _parse(raw)
    reason = _stale_reason(path, holder)
    if reason is None:
        raise _in_use(out, path, holder)
    aside = path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another launch moved it first
    if aside.read_bytes() != raw:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    who = f"host {holder.get('host')}, pid {holder.get('pid')}" if holder else "an unreadable record"
    print(f"[ftcluster] taking over the stale lock {path} ({who}: {reason})", flush=True)


def _stale_reason(path: Path, holder: dict | None) -> str | None:
    """Why the lock at `path` no longer protects a live run, or None while it does."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    if not holder or "pid" not in holder:
        # A lock being written right now reads empty for a moment: only an old one is abandoned.
        return f"unreadable and not touched for {age:.0f} s" if age > STALE_AFTER_S else None
    ours = _slurm_job()
    if ours and holder.get("slurm_job") and holder["slurm_job"] != ours \
            and holder["slurm_job"].split(":")[0] == ours.split(":")[0]:
        # SLURM requeued this job (preemption, a node failure), which ended the earlier attempt first; the new one
        # may start on another node at once, before that attempt's heartbeat would look stale.
        return f"an earlier attempt ({holder['slurm_job']}) of this requeued SLURM job"
    if holder.get("host") == socket.gethostname():
        if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
            return "the host has rebooted since"
        pid = int(holder["pid"])
        if not _alive(pid):
            return f"pid {pid} is gone"
        start = _pid_start(pid)
        if holder.get("pid_start") is not None and start is not None and start != holder["pid_start"]:
            return f"pid {pid} is another process now"
        return None
    if age > STALE_AFTER_S:
        return f"not refreshed for {age:.0f} s (stale after {STALE_AFTER_S:.0f} s)"
    return None


def _in_use(out: Path, path: Path, holder: dict | None) -> UserError:
    holder = holder or {}
    return UserError(f"output_dir={out} is in use by another ftcluster process: host {holder.get('host', '?')}, "
                     f"pid {holder.get('pid', '?')}, started {holder.get('started_at', '?')} (lock {path}). Wait for "
                     f"it to finish or stop it (kill -USR1 PID checkpoints and stops it), or choose another "
                     f"output_dir; if that process is gone, the lock is taken over by itself once stale (on another "
                     f"host after {STALE_AFTER_S:.0f} s without a heartbeat)")


def _read(path: Path) -> dict | None:
    try:
        return _parse(path.read_bytes())
    except OSError:
        return None


def _parse(raw: bytes) -> dict | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _pid_start(pid: int) -> int | None:
    """The pid's start time in clock ticks since boot (/proc/PID/stat field 22); None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _slurm_job() -> str | None:
    """JOB_ID:RESTART_COUNT inside a SLURM job: a requeued job keeps its id and counts its restarts."""
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}:{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None

"""What every benchmark here shares: waiting for a quiet machine, describing it (CPU, package versions,
git state), running one side of a comparison as a subprocess while sampling its process tree
(threads, load, peak memory per process), and timing the steps of a Hugging Face `Trainer` (or a TRL
trainer, its subclass) inside such a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ftcluster.util.hardware import cpu_model

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BUSY_PATTERN = re.compile(r"ftcluster train|pytest")


# ----------------------------------------------------------------------------------------------------------
# Machine state

def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (ppid, cmd)
    return table


def _descendants(root: int, table: dict) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def _ancestors(pid: int, table: dict) -> set[int]:
    out = set()
    while pid in table and pid not in out and pid > 1:
        out.add(pid)
        pid = table[pid][0]
    return out


def busy_processes() -> list[str]:
    """Other processes running ftcluster training or pytest (this process, its parents and children excluded)."""
    table = _process_table()
    mine = _ancestors(os.getpid(), table) | _descendants(os.getpid(), table)
    return [f"{pid}: {cmd[:120]}" for pid, (_, cmd) in sorted(table.items())
            if pid not in mine and BUSY_PATTERN.search(cmd)]


def load1() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_wait_s: float, threshold: float, poll_s: float = 15.0) -> dict:
    started = time.time()
    while True:
        busy, load = busy_processes(), load1()
        waited = time.time() - started
        if not busy and load < threshold:
            return {"quiet": True, "waited_s": round(waited), "load1": load, "busy": []}
        if waited >= max_wait_s:
            return {"quiet": False, "waited_s": round(waited), "load1": load, "busy": busy}
        print(f"[bench] waiting for a quiet machine ({waited:.0f}/{max_wait_s:.0f} s): load1={load:.2f}, "
              f"{len(busy)} busy process(es)", flush=True)
        time.sleep(poll_s)


def versions(packages: list[str]) -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_state() -> dict:
    def run(*args):
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"sha": run("rev-parse", "HEAD").strip() or None,
            "dirty_files": len([line for line in run("status", "--porcelain").splitlines() if line.strip()])}


def environment(packages: list[str]) -> dict:
    """The machine and the software a measurement ran on, as its report states them."""
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "versions": versions(packages), "git": git_state()}


class Monitor:
    """Samples a child's process tree while it runs: which processes, the training worker's OMP_NUM_THREADS,
    each process's peak resident memory (the kernel's VmHWM, so no peak between samples is missed) and the
    load average; afterwards waits for the whole tree to be gone before the next run starts."""

    def __init__(self, root_pid: int, trainer_pattern: str | None = None):
        self.root, self.pids, self.loads, self.omp = root_pid, set(), [], {}
        self.trainer_pattern = trainer_pattern
        self.peak_rss_mib: dict[str, float] = {}  # "pid command" -> MiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            table = _process_table()
            tree = _descendants(self.root, table) | {self.root}
            self.pids |= tree
            for pid in tree:
                cmd = table.get(pid, (0, ""))[1]
                trains = pid == self.root or (self.trainer_pattern and re.search(self.trainer_pattern, cmd))
                if trains and cmd[:300] not in self.omp:
                    try:
                        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                        omp = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"OMP_NUM_THREADS=")), None)
                        self.omp[cmd[:300]] = omp
                    except OSError:
                        pass
                peak = _peak_rss_mib(pid)
                if peak is not None:
                    label = f"{pid} {cmd[:300]}"
                    self.peak_rss_mib[label] = max(peak, self.peak_rss_mib.get(label, 0.0))
            self.loads.append(load1())
            self._stop.wait(1.0)

    def peak_of(self, pattern: str) -> float | None:
        """The highest peak RSS (MiB) among the processes whose command line matches `pattern`."""
        peaks = [mib for label, mib in self.peak_rss_mib.items() if re.search(pattern, label)]
        return max(peaks) if peaks else None

    def finish(self, linger_s: float = 60.0) -> list[int]:
        self._stop.set()
        self._thread.join()
        deadline = time.time() + linger_s
        while time.time() < deadline:
            alive = [p for p in self.pids if Path(f"/proc/{p}").exists()]
            if not alive:
                return []
            time.sleep(0.5)
        return [p for p in self.pids if Path(f"/proc/{p}").exists()]


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# ----------------------------------------------------------------------------------------------------------
# Runs

def _env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def run_logged(cmd: list[str], log: Path, threads: int, trainer_pattern: str | None = None) -> dict:
    """Run `cmd` with `threads` threads, its output in `log`; trainer_pattern names the process that trains
    (a regular expression on its command line) for the peak-memory figure."""
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(threads), cwd=str(REPO))
        monitor = Monitor(proc.pid, trainer_pattern)
        rc = proc.wait()
    lingering = monitor.finish()
    wall = time.time() - started
    if rc != 0:
        raise RuntimeError(f"{cmd[0]} exited {rc}; see {log}:\n" + log.read_text()[-3000:])
    out = {"wall_s": round(wall, 1), "omp_num_threads": monitor.omp, "load1_during": _summary(monitor.loads),
           "lingering_pids": lingering, "log": str(log)}
    if trainer_pattern:
        out["trainer_peak_rss_mib"] = monitor.peak_of(trainer_pattern)
    return out


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def run_worker(script: Path, flag: str, spec: dict, work: Path, tag: str, threads: int) -> dict:
    """Run the other side of a comparison: `script flag SPEC` in a subprocess, `spec` (what to train) written to
    SPEC as JSON. The worker writes its figures to spec["result"]; they come back merged with the run's own
    (log, threads, load, the worker's peak memory)."""
    spec = {**spec, "result": str(work / f"{tag}.json")}
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(script), flag, str(spec_path)]
    info = run_logged(cmd, work / f"{tag}.log", threads, trainer_pattern=flag)
    return {"tag": tag, "command": " ".join(map(shlex.quote, cmd)), **json.loads(Path(spec["result"]).read_text()),
            **info}


# ----------------------------------------------------------------------------------------------------------
# Inside a worker: the Hugging Face side's step times and losses

def start_worker(spec_path: str) -> dict:
    """What a worker does first: read its spec, take the threads it was given (before any torch work) and
    quiet transformers' logging."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(spec["threads"])
    hf_logging.set_verbosity_error()
    return spec


def step_timer(steps: list[dict], counts: dict | None = None):
    """A TrainerCallback that appends one row per optimizer step to `steps`: `time_s`, a whole iteration of the
    Trainer's loop (on_step_end to on_step_end: fetching and collating the step's micro-batches, forward/backward,
    clipping, optimizer, its per-step logging), the comparable figure to ftcluster's own step time; `core_time_s`,
    on_step_begin to on_step_end (without the fetching and the logging); and what `counts` holds (the caller adds
    to it per micro-batch; it is zeroed after each step)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            steps.append({"step": state.global_step, "time_s": now - self.last, "core_time_s": now - self.begin,
                          **(counts or {})})
            for key in counts or {}:
                counts[key] = 0
            self.last = now

    return StepTimer()


def add_logged_losses(steps: list[dict], trainer) -> None:
    """Give each step row the loss the Trainer logged for it (logging_steps=1: the step's own loss)."""
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h}
    for s in steps:
        s["loss"] = losses.get(s["step"])


def add_run_arguments(p: argparse.ArgumentParser, steps: int) -> None:
    """The options every side-by-side benchmark takes: the batch, steps and rounds, and the machine."""
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=steps, help="measured steps")
    p.add_argument("--warmup", type=int, default=5, help="steps run and left out of the figures")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", type=float, default=1200, help="seconds to wait for a quiet machine (0: don't)")
    p.add_argument("--quiet-load", type=float, default=0.5, help="1-min load average that counts as quiet")
    p.add_argument("--workdir", help="where the runs go (default: a new temp folder)")
    p.add_argument("--out", help="report folder (default: benchmarks/results; the work folder with --smoke)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")


def folders(a: argparse.Namespace, prefix: str) -> tuple[Path, Path]:
    """The work folder (--workdir, else a new temp folder) and the report folder (--out, else
    benchmarks/results, or the work folder's results/ for a --smoke run), both created."""
    work = Path(a.workdir or tempfile.mkdtemp(prefix=prefix)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out).resolve() if a.out else (work / "results" if a.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[bench] work folder {work}", flush=True)
    return work, out


def drop_run_weights(a: argparse.Namespace, work: Path) -> None:
    """Once the report is written: the runs' checkpoints and exported models leave the temp work folder this
    script made (a SmolLM2 run left 8 GiB of them in /tmp, each ftcluster run's last checkpoint holding Adam's
    states); logs, metrics and reports stay. A --workdir the user named keeps everything."""
    if a.workdir:
        return
    weights = [*work.glob("runs/*/checkpoints"), *work.glob("runs/*/final")]  # the baselines save nothing
    freed = sum(f.stat().st_size for folder in weights for f in folder.rglob("*") if f.is_file())
    for folder in weights:
        shutil.rmtree(folder)
    if weights:
        print(f"[bench] removed the runs' checkpoints and final models from {work} ({freed / 2**20:,.0f} MiB; "
              f"--workdir keeps them)", flush=True)
